"""Checkpoints: a state_dict plus plain metadata, loaded with weights_only=True, every
field checked at load time (CheckpointError names the field); and ensemble files, which
hold several such members and one calibration for them all, and load the same way.
"""

from __future__ import annotations

import datetime
import json
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from cxr import calib, imagefiles, network, runtime

CHECKPOINT_FORMAT = "cxr-mobilenetv2/1"

ENSEMBLE_FORMAT = "cxr-mobilenetv2-ensemble/1"  # members (checkpoints) and one calibration

MAX_MEMBERS = 20  # an ensemble file's members (the size limit allows about 25)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "mobilenet_cxr.pth"  # shipped

class CheckpointError(Exception):
    pass

def save_checkpoint(path, state_dict: dict, meta: dict, typicality: dict | None = None) -> None:
    """A state_dict plus plain metadata (and the typicality statistics: tensors and
    numbers), written atomically."""
    payload = {"format": CHECKPOINT_FORMAT, **_member(state_dict, meta, typicality)}
    runtime.write_atomic(path, lambda f: torch.save(payload, f))

def save_ensemble(path, members, calibration: calib.Calibration, meta: dict) -> None:
    """An ensemble file: the members [(model, its meta)] (weights, metadata, typicality
    statistics) and the one calibration they predict with, written atomically."""
    payload = {"format": ENSEMBLE_FORMAT, "meta": json.loads(json.dumps(meta)),
               "members": [_member(m.state_dict(), mm, getattr(m, "typicality", None))
                           for m, mm in members],
               "calibration": calibration.to_dict()}
    runtime.write_atomic(path, lambda f: torch.save(payload, f))

def _member(state_dict: dict, meta: dict, typicality) -> dict:
    out = {"state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
           "meta": json.loads(json.dumps(meta))}  # plain types only
    if typicality is not None:
        out["typicality"] = typicality
    return out

class Loaded(NamedTuple):
    """A model file, loaded: members [(model in eval mode, metadata)] (one for a
    checkpoint), the calibration they predict with, and their image size."""
    members: list
    calibration: calib.Calibration
    image_size: int

def load_model(path=None, device="cpu") -> Loaded:
    """A checkpoint or an ensemble file (none: the shipped DEFAULT_MODEL), everything in
    it checked first (check_checkpoint per member, the calibration); a bad file is
    refused (CheckpointError, one line naming the file and the field). An ensemble
    file's members keep their own metadata; they predict with the file's calibration."""
    path = Path(path or DEFAULT_MODEL)
    payload = _read(path)
    try:
        if not (isinstance(payload, dict) and payload.get("format") == ENSEMBLE_FORMAT):
            members = [_built(payload, device)]
            return Loaded(members, calibration_of(members[0][1]), _image_size(members[0][1]))
        meta = payload.get("meta", _MISSING)
        _require(isinstance(meta, dict), "meta", meta, "a dictionary")
        _check_plain(meta, "meta")
        _check_plain(payload.get("calibration"), "calibration")
        found = payload.get("members", _MISSING)
        _require(isinstance(found, list) and 2 <= len(found) <= MAX_MEMBERS, "members",
                 _Count(len(found)) if isinstance(found, list) else found,
                 f"a list of 2 to {MAX_MEMBERS} checkpoints")
        members = []
        for i, m in enumerate(found):
            try:
                _require(isinstance(m, dict), "member", m, "a dictionary")
                members.append(_built({**m, "format": CHECKPOINT_FORMAT}, device))
            except CheckpointError as e:
                raise CheckpointError(f"members[{i}]: {e}") from None
        sizes = {_image_size(m) for _, m in members}
        if len(sizes) != 1:
            raise CheckpointError(f"ensemble members use different image sizes {sorted(sizes)}")
        own = [calibration_of(m) for _, m in members]
        cal = _calibration(lambda: calib.Calibration.from_dict(
            payload.get("calibration", _MISSING), own), "calibration")
        return Loaded(members, cal, sizes.pop())
    except CheckpointError as e:
        raise CheckpointError(f"{runtime.display_name(path)}: {e}") from None

def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Build the model from a checkpoint; returns (model in eval mode, metadata). The
    typicality statistics, where the checkpoint has them, are model.typicality (else
    None). Everything in the file is checked first (check_checkpoint): a file that is not
    one, or whose model could not give a valid probability, is refused (CheckpointError,
    one line naming the file and the field)."""
    path = Path(path)
    payload = _read(path)
    try:
        return _built(payload, device)
    except CheckpointError as e:
        raise CheckpointError(f"{runtime.display_name(path)}: {e}") from None

def _read(path: Path):
    """torch.load(weights_only=True) of a file that is a torch.save archive of bounded
    size; CheckpointError naming the file otherwise."""
    name = runtime.display_name(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {name}")
    try:
        with imagefiles.open_regular(path, MAX_CHECKPOINT_BYTES, CheckpointError) as f:
            _check_archive(f)
            try:
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # torch.load's errors on a damaged or foreign file
                raise CheckpointError(f"not a loadable checkpoint ({type(e).__name__})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None

def _built(payload, device) -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata) of a checkpoint payload, checked first."""
    model, _ = network.build_model(pretrained=False)
    check_checkpoint(payload, model)
    model.load_state_dict(payload["state_dict"])
    model.typicality = payload.get("typicality")
    return model.to(device).eval(), payload["meta"]

class _Count(int):
    """A list's length in a message, instead of its (long) contents."""
    def __repr__(self):
        return f"a list of {int(self)}"

def _image_size(meta: dict) -> int:
    return meta["preprocessing"]["image_size"]

def base_meta(image_size: int, intensity: str = "none") -> dict:
    return {
        "class_names": network.CLASS_NAMES,
        "architecture": "torchvision.models.mobilenet_v2, classifier[1]=Linear(1280, 2)",
        "preprocessing": {
            "color": "greyscale 8-bit, replicated to 3 channels",
            "resize": f"{image_size}x{image_size} bilinear (aspect ratio not kept)",
            "image_size": image_size,
            "intensity": intensity,
            "mean": network.IMAGENET_MEAN,
            "std": network.IMAGENET_STD,
        },
        "torch_version": torch.__version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }

# What a checkpoint may hold. Everything read from one is checked here, at load time,
# so that no later step trusts a size, a cut or a type from the file.
IMAGE_SIZE_RANGE = (32, 1024)  # MobileNetV2 needs 32 px; 1024 px costs ~0.3 GB per image

MAX_CHECKPOINT_BYTES = 256 * 2**20  # the shipped checkpoints have 10 MB

def check_checkpoint(payload, model: nn.Module) -> None:
    """Raises CheckpointError naming the first field of a loaded checkpoint that is
    missing, of the wrong type or out of bounds: its metadata, its weights (which must
    be exactly the model's tensors, finite) and its typicality statistics."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a {CHECKPOINT_FORMAT} checkpoint")
    meta = payload.get("meta", _MISSING)
    _require(isinstance(meta, dict), "meta", meta, "a dictionary")
    _check_plain(meta, "meta")
    _require(meta.get("class_names") == network.CLASS_NAMES, "meta.class_names",
             meta.get("class_names", _MISSING), repr(network.CLASS_NAMES))
    pre = meta.get("preprocessing", _MISSING)
    _require(isinstance(pre, dict), "meta.preprocessing", pre, "a dictionary")
    size, (lo, hi) = pre.get("image_size", _MISSING), IMAGE_SIZE_RANGE
    _require(calib.is_int(size) and lo <= size <= hi, "meta.preprocessing.image_size", size,
             f"an integer from {lo} to {hi}")
    _require(pre.get("intensity", "none") in network.INTENSITIES, "meta.preprocessing.intensity",
             pre.get("intensity"), f"one of {', '.join(network.INTENSITIES)}")
    calibration_of(meta)
    for key, ok, rule in (  # read back by experiments/ (upgrade_checkpoint.py, ...)
            ("seed", calib.is_int, "an integer"),
            ("recipe", lambda v: isinstance(v, str), "a recipe's name"),
            ("recipe_fields", lambda v: v is None or isinstance(v, dict), "a dictionary"),
            ("metrics", lambda v: isinstance(v, dict), "a dictionary"),
            ("val_fraction", lambda v: calib.is_number(v) and 0 < v < 1, "a number within (0, 1)"),
            ("calib_fraction", lambda v: v is None or calib.is_number(v) and 0 <= v < 1,
             "a number within [0, 1)")):
        if key in meta:
            _require(ok(meta[key]), f"meta.{key}", meta[key], rule)
    _check_state_dict(payload.get("state_dict", _MISSING), model.state_dict())
    if payload.get("typicality") is not None:
        _check_typicality(payload["typicality"], model.last_channel)

def _check_plain(value, field: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{field} holds something other than plain data (numbers, "
                              "strings, lists and dictionaries)") from None

def _check_state_dict(state, expected: dict) -> None:
    """The weights must be exactly the model's tensors (names, shapes, types), finite."""
    _require(isinstance(state, dict), "state_dict", state, "a dictionary of tensors")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(f"weights do not fit MobileNetV2 ({len(missing)} missing, "
                              f"{len(extra)} unexpected, first: {_shown((missing or extra)[0])})")
    for k, ref in expected.items():
        _require(_is_dense(state[k]) and state[k].shape == ref.shape and state[k].dtype == ref.dtype,
                 f"state_dict[{k!r}]", state[k], f"a {ref.dtype} tensor of shape {tuple(ref.shape)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{len(bad)} weight tensor(s) hold NaN or infinity "
                              f"(first: {bad[0]}): refusing a model that cannot answer")

def _check_typicality(stats, features: int) -> None:
    """The typicality statistics (fit_typicality): finite tensors whose shapes fit the
    model's features and each other, a finite cut > 0 and a level within (0, 1)."""
    _require(isinstance(stats, dict), "typicality", stats, "a dictionary")

    def tensor(key, shape, integer=False):
        v = stats.get(key, _MISSING)
        kind = "an integer" if integer else "a floating-point"
        _require(_is_dense(v) and v.dim() == len(shape) and (integer != v.is_floating_point())
                 and not v.is_complex() and v.dtype != torch.bool
                 and all(n is None or n == m for n, m in zip(shape, v.shape)),
                 f"typicality.{key}", v, f"{kind} tensor of shape "
                 + str(tuple("n" if n is None else n for n in shape)).replace("'", ""))
        _require(integer or bool(torch.isfinite(v).all()), f"typicality.{key}", v, "finite")
        return v

    k = tensor("components", (None, features)).shape[0]
    _require(k >= 1, "typicality.components", stats["components"], "at least one component")
    tensor("pca_mean", (features,))
    tensor("class_means", (len(network.CLASS_NAMES), k))
    tensor("precision", (k, k))
    tensor("train_scores", (None,))
    tensor("val_scores", (None,))
    n = tensor("reference_z", (None, k)).shape[0]
    labels = tensor("reference_labels", (n,), integer=True)
    _require(bool(((labels >= 0) & (labels < len(network.CLASS_NAMES))).all()),
             "typicality.reference_labels", labels, f"class indices 0 to {len(network.CLASS_NAMES) - 1}")
    cut, level = stats.get("cut", _MISSING), stats.get("level", _MISSING)
    _require(calib.is_number(cut) and cut > 0, "typicality.cut", cut, "a finite number > 0")
    _require(calib.is_number(level) and 0 < level < 1, "typicality.level", level,
             "a number within (0, 1)")

_MISSING = calib.MISSING  # a field the file does not have

def _require(ok: bool, field: str, value, rule: str) -> None:
    """Raises CheckpointError "<field> <value> (must be <rule>)" unless ok."""
    if not ok:
        raise CheckpointError(f"{field} {_shown(value)} (must be {rule})")

def _shown(value) -> str:
    """A field's value in a message: short, and never a tensor's contents."""
    if value is _MISSING:
        return "missing"
    if torch.is_tensor(value):
        return f"is a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = f"{value:g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

def _is_dense(value) -> bool:
    """A plain tensor whose elements are all stored in the file (an expanded tensor of
    a huge shape over a few stored numbers would cost its full size to compute with)."""
    return (torch.is_tensor(value) and value.layout == torch.strided
            and value.numel() * value.element_size() <= value.untyped_storage().nbytes())

def _check_archive(f) -> None:
    """A checkpoint is torch.save's zip archive, whose entries unpack to at most
    MAX_CHECKPOINT_BYTES (torch.load would inflate a compressed entry of any size)."""
    try:
        with zipfile.ZipFile(f) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except Exception as e:  # zipfile's errors on a damaged or foreign file
        raise CheckpointError(f"not a loadable checkpoint (not a torch.save archive: "
                              f"{type(e).__name__})") from None
    if unpacked > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"unpacks to {unpacked:,} bytes, more than the "
                              f"{MAX_CHECKPOINT_BYTES:,} allowed")
    f.seek(0)

def calibration_of(meta: dict) -> calib.Calibration:
    """A checkpoint's stored calibration (calib.Calibration.from_meta); CheckpointError
    naming the field of meta.calibration that is not a valid one."""
    return _calibration(lambda: calib.Calibration.from_meta(meta), "meta.calibration")

def _calibration(read, where: str) -> calib.Calibration:
    """read(), its CalibrationError turned into the CheckpointError naming the field."""
    try:
        return read()
    except calib.CalibrationError as e:
        raise CheckpointError(f"{where}{'.' + e.field if e.field else ''} {_shown(e.value)} "
                              f"(must be {e.rule})") from None
