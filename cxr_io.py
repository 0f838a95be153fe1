"""Files and folders: everything between a path on disk and an 8-bit grey image, plus
the small plumbing the scripts share (output folders, atomic writes, argument types).

What must never differ between training and prediction (class names, preprocessing,
model, checkpoint, calibration, inference, metrics) lives in cxr_common, which uses this.
Functions here raise exceptions (ImageReadError for an unusable file, with a one-line
reason); only the scripts turn them into messages and exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import math
import os
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                    ".dicom"}
MAX_PIXELS = 60_000_000  # 60 MP: larger than any radiograph, small enough to decode
MIN_SIDE = 16
# An image with no structure is refused before the model sees it. Every one of the 5,856
# Kermany images and the samples has a grey-level spread (sd) of at least 19 and a
# correlation between horizontal neighbours of at least 0.95 at 224 px (0.57 between
# neighbouring blocks of a 32 x 32 grid); a blank film has sd 0, and white noise has
# correlation near 0 at both scales (noise of 32 px or more). A colour picture is refused
# too: radiographs are grey (the dataset's RGB JPEGs have no pixel with any chroma).
MIN_GREY_SD = 5.0
MIN_NEIGHBOUR_CORR = (0.5, 0.35)  # neighbouring pixels, neighbouring blocks
MAX_COLOURED_SHARE = 0.25  # share of a 32 x 32 thumbnail's pixels with chroma > 16


# ---------------------------------------------------------------------------------
# Reading one file: any supported format becomes an 8-bit grey PIL image.
# ---------------------------------------------------------------------------------


class ImageReadError(Exception):
    """A file that cannot be used as an X-ray; the message names the file."""


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
    if _is_dicom(path):
        return _read_dicom(path)
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
            return _pil_to_gray(img)
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


# Characters a name may hold that would act on a terminal or hide what it says: control
# characters (newline, carriage return, ESC, DEL, C1), line and paragraph separators, and
# invisible format characters (bidi overrides and isolates, zero-width characters).
HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_name(path) -> str:
    """A path as one line of plain text, safe to print and to store as a name.

    Bytes that are not UTF-8 show as \\xNN; control, line-separator and invisible format
    characters as \\n, \\xNN or \\uNNNN; a backslash (where it is not the path separator)
    as \\\\, so two different paths never look alike. Everything else is kept.
    """
    text = str(path)
    try:
        text = os.fsencode(text).decode("utf-8", "surrogateescape")
    except UnicodeError:  # a str path holding lone surrogates: escaped one by one below
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\" and os.sep != "\\":
            out.append("\\\\")
        elif ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif unicodedata.category(ch) in HIDDEN_CATEGORIES:
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def printable_console() -> None:
    """Let stdout and stderr print any character: one the console's encoding lacks (a
    unicode file name on an ASCII or POSIX-locale console) shows as \\uNNNN instead of
    raising UnicodeEncodeError in the middle of a run. Scripts call this first."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


# Text starting with one of these is a formula to a spreadsheet (OWASP, CSV injection); '
# is included so that csv_value can undo csv_cell exactly.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value):
    """A value for a CSV cell that a spreadsheet shows as text and never runs: text that
    starts with = + - @ tab, carriage return or ' gets a leading ' (OWASP's advice).
    Other values are returned unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def csv_value(text: str) -> str:
    """The text of a cell written with csv_cell, as it was before."""
    return text[1:] if text.startswith("'") else text


# ---------------------------------------------------------------------------------
# Folders: which files are images, and which class folder they sit in.
# ---------------------------------------------------------------------------------


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
            if p.suffix.lower() in IMAGE_EXTENSIONS or _is_dicom(p):
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


# ---------------------------------------------------------------------------------
# Run plumbing: output folders, atomic writes, devices, worker processes.
# ---------------------------------------------------------------------------------


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
    raise FileExistsError(f"could not create a new run folder under {parent}")


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


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exit_on(*errors):
    """For scripts: turn the named exceptions into a one-line 'error: ...' exit."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {e}") from None


def pick_device(name: str = "auto") -> torch.device:
    """auto: the GPU when there is one, else the CPU (with its allocator tuned)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        tune_cpu_allocator()
    return torch.device(name)


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


def device_name(text: str) -> str:
    """--device: auto, cpu or cuda (refused when no CUDA GPU is available)."""
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"choose auto, cpu or cuda, not {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda asked for, but no CUDA GPU is available")
    return text


def folder_or_new(text: str) -> str:
    """A folder to write into: may exist as a folder or not at all, never as a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{display_name(text)} exists and is not a folder")
    return text


# ---------------------------------------------------------------------------------
# Decoder internals.
# ---------------------------------------------------------------------------------


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


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


def _pil_to_gray(img: Image.Image) -> Image.Image:
    """Any PIL mode (16-bit, float, RGBA, CMYK, palette, 1-bit) to 8-bit 'L'."""
    if img.mode == "L":
        return img
    if img.mode == "YCbCr":  # a JPEG decoded without colour conversion: Y is the grey
        return img.getchannel("Y")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray(_scale_by_bit_depth(np.asarray(img)), mode="L")
    if img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if img.mode in ("P", "CMYK", "LAB", "HSV", "1"):
        img = img.convert("RGB")
    return img.convert("L")


def _scale_by_bit_depth(array: np.ndarray) -> np.ndarray:
    """High-bit-depth integers to uint8, keeping brightness: 16-bit data is divided by
    257, 12-bit data (max < 4096, common in 16-bit containers) by 4095/255, etc."""
    top = int(array.max()) if array.size else 0
    if top < 0 or array.min() < 0:
        return _to_uint8(array)
    bits = max(8, min(32, top.bit_length()))
    return np.round(array.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)


def _to_uint8(array: np.ndarray) -> np.ndarray:
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


def _read_dicom(path: Path) -> Image.Image:
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
    gray = _to_uint8(np.asarray(arr))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark
    return Image.fromarray(gray, mode="L")
