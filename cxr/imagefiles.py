"""Reading images: everything between a path on disk and an 8-bit grey image (PNG, JPEG,
TIFF, ... and DICOM with the optional pydicom), and the refusals (not an image,
truncated, huge, colour, not a radiograph, not a regular file). Functions raise
ImageReadError with a one-line reason; only the scripts print it.
"""

from __future__ import annotations

import os
import stat
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 60_000_000  # 60 MP: larger than any radiograph, small enough to decode

MAX_PIXEL_BYTES = 2 * MAX_PIXELS  # the pixel data of a 60 MP image at 16 bits

MAX_DICOM_BYTES = MAX_PIXEL_BYTES + 16_000_000  # and 16 MB for the rest of a DICOM file

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

# What a chest film has that a picture of something else lacks: the layout of the average
# film (dark lungs either side of a bright midline) and fine detail (ribs, vessels, grain).
# FILM_LAYOUT: the 8 x 8 block means of the shipped model's 5,216 training films (its
# train, validation and calibration splits), rounded. 99% of those films correlate with
# it at 0.59 or more and keep at least 2.3% of their grey-level variance in detail finer
# than a 32 x 32 grid (experiments/radiograph_checks.py). predict.py withholds the
# verdict only from an atypical image that is below either (unlike_a_film).
FILM_LAYOUT = ((77, 103, 127, 158, 158, 126, 101, 73), (76, 128, 137, 154, 154, 138, 126, 74),
               (63, 132, 118, 153, 159, 124, 131, 62), (55, 126, 110, 163, 174, 129, 127, 53),
               (52, 115, 113, 171, 182, 145, 119, 50), (50, 106, 115, 169, 183, 152, 111, 48),
               (52, 128, 159, 182, 185, 162, 119, 48), (59, 160, 186, 193, 190, 177, 149, 54))

MIN_LAYOUT, MIN_DETAIL = 0.59, 0.023

FILM_SIZE = 224  # the size both were measured at: film_statistics resamples other sizes to it

class ImageReadError(Exception):
    """A file that cannot be used as an X-ray; the message names the file."""

def read_image_gray(path, draft_size: int | None = None) -> Image.Image:
    """Open any supported X-ray file as an 8-bit greyscale image.

    draft_size: for JPEGs, let libjpeg decode at a reduced scale that stays at least
    twice this size (Pillow's draft mode), which is much faster for full-resolution
    files and leaves the final resized image practically unchanged.
    Raises ImageReadError with a one-line reason for anything unusable.
    """
    with open_regular(path) as f:
        try:
            empty = os.fstat(f.fileno()).st_size == 0
            dicom = Path(path).suffix.lower() == ".dcm" or _has_dicom_prefix(f)
        except OSError as e:
            raise ImageReadError(f"cannot read file ({e.strerror or e})") from None
        if empty:
            raise ImageReadError("empty file (0 bytes)")
        return _read_dicom(f) if dicom else _read_pil(f, draft_size)

def _read_pil(f, draft_size: int | None) -> Image.Image:
    """read_image_gray for every format Pillow decodes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
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

def open_regular(path, limit: int | None = None, error=ImageReadError):
    """path opened for binary reading if it is a regular file (or a link to one) of at
    most limit bytes; else error(why). A FIFO, socket or device is never opened (a FIFO
    would block forever, a device may never end); the open itself cannot block either,
    should the path become one in between. The one way the scripts open an input."""
    try:
        not_file = file_kind_problem(os.stat(path).st_mode)
        if not_file:
            raise error(not_file)
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | NONBLOCKING))
    except PermissionError:
        raise error("permission denied") from None
    except OSError as e:
        raise error(f"cannot access file ({e.strerror or e})") from None
    st = os.fstat(f.fileno())
    problem = file_kind_problem(st.st_mode) or (
        f"{st.st_size:,} bytes, more than the {limit:,} allowed"
        if limit is not None and st.st_size > limit else None)
    if problem:
        f.close()
        raise error(problem)
    return f

NONBLOCKING = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO returns at once (POSIX)

def file_kind_problem(mode: int) -> str | None:
    """Why an entry of this st_mode is not read as a file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"is {kind}, not a regular file"

def check_structure(gray: np.ndarray) -> None:
    """Refuse an image with nothing in it for the model to judge: blank or noise."""
    a = gray.astype(np.float64)
    sd = float(a.std())
    if sd < MIN_GREY_SD:
        raise ImageReadError(f"blank image (grey-level spread {sd:.1f}, a radiograph has "
                             f"more than {MIN_GREY_SD:g}): nothing to judge")
    blocks = block_means(a, 32)  # a 32 x 32 grid of blocks (7 x 7 px at 224 px)
    for img, floor in zip((a, blocks), MIN_NEIGHBOUR_CORR):
        corr = float(np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1])
        if not corr >= floor:
            raise ImageReadError(f"looks like noise, not a radiograph (neighbouring pixels "
                                 f"correlate {corr:.2f}, in a radiograph above {floor:g})")

def block_means(a: np.ndarray, grid: int) -> np.ndarray:
    """The means of a grid x grid array of equal blocks (the edge rows and columns that do
    not fill a block are left out)."""
    k = max(1, min(a.shape) // grid)
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k).mean((1, 3))

def film_statistics(gray: np.ndarray, layout=None) -> tuple[float, float]:
    """(layout, detail) of an image: the correlation of its 8 x 8 block means with those
    of the average chest film (layout, default FILM_LAYOUT), and the share of its
    grey-level variance finer than a 32 x 32 grid of blocks (detail), both at FILM_SIZE px
    (an image of another size is resampled first, so a model's input size cannot move
    them: at 32-63 px a 32 x 32 grid's blocks would be single pixels, and detail 0)."""
    if gray.shape != (FILM_SIZE, FILM_SIZE):
        gray = np.asarray(Image.fromarray(np.asarray(gray, dtype=np.uint8)).resize(
            (FILM_SIZE, FILM_SIZE), Image.Resampling.BILINEAR))
    a = gray.astype(np.float64)
    b = block_means(a, 8).ravel()
    t = np.asarray(FILM_LAYOUT if layout is None else layout, dtype=np.float64).ravel()
    b, t = b - b.mean(), t - t.mean()
    norm = float(np.linalg.norm(b) * np.linalg.norm(t))
    var = float(a.var())
    return (float(b @ t) / norm if norm > 0 else 0.0,
            1 - float(block_means(a, 32).var()) / var if var > 0 else 0.0)

def unlike_a_film(gray: np.ndarray) -> str | None:
    """Why an image does not look like a chest film (its layout or its detail below what
    99% of the training films have), or None. Not a refusal on its own: see FILM_LAYOUT."""
    layout, detail = film_statistics(gray)
    if layout < MIN_LAYOUT:
        return (f"laid out unlike a chest film (correlation {layout:.2f} with the average "
                f"film; 99% of training films {MIN_LAYOUT:g} or more)")
    if detail < MIN_DETAIL:
        return (f"too little fine detail for a radiograph ({detail:.1%} of its variance; "
                f"99% of training films {MIN_DETAIL:.1%} or more)")
    return None

def _is_dicom(path: Path) -> bool:
    """Whether a file found in a folder is a DICOM: by its extension, or by the DICM
    prefix where path is a regular file (nothing else is opened)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open_regular(path) as f:
            return _has_dicom_prefix(f)
    except ImageReadError:
        return False

def _has_dicom_prefix(f) -> bool:
    """A DICOM file has 'DICM' after its 128-byte preamble; f is left at its start."""
    prefix = f.read(132)[128:]
    f.seek(0)
    return prefix == b"DICM"

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
        stored = int(ds.get("BitsStored", bits))
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
    if not 1 <= stored <= bits:
        return f"DICOM with {stored} bits stored in {bits} allocated per sample"
    if rows * cols * frames * samples * bits > 8 * MAX_PIXEL_BYTES:
        return (f"image too large ({cols} x {rows} px x {frames} frame(s) x {samples} "
                f"sample(s) x {bits} bits, limit {MAX_PIXEL_BYTES // 1_000_000} MB)")
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

def _read_dicom(f) -> Image.Image:
    """Decode a DICOM file (open in binary): modality LUT, VOI LUT/window, MONOCHROME1
    inverted, a palette applied; of several frames, the first.

    The header is checked (size, frames, samples, window) before the pixels are read or
    decoded, and the data set may hold at most MAX_DICOM_BYTES, on disk or inflated.
    Only pixel data is read; no patient tag is printed or stored.
    """
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(
            "DICOM support needs the optional package pydicom: pip install pydicom"
        ) from None
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on odd headers: checked here
        try:
            f, too_large = _dicom_data(f)
            header = pydicom.dcmread(f, stop_before_pixels=True)
        except ImageReadError:
            raise
        except Exception as e:
            raise ImageReadError(f"not a readable DICOM file ({type(e).__name__})") from None
        problem = _dicom_header_problem(header) or too_large
        if problem:
            raise ImageReadError(problem)
        try:
            f.seek(0)
            ds = pydicom.dcmread(f)
        except Exception as e:
            raise ImageReadError(f"not a readable DICOM file ({type(e).__name__})") from None
        if "PixelData" not in ds:
            raise ImageReadError("DICOM file holds no image (no PixelData)")
        try:
            if hasattr(ds, "pixel_array_options"):  # pydicom 3: only the first frame
                ds.pixel_array_options(index=0)
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
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        shape = (int(ds.Rows), int(ds.Columns)) + ((3,) if int(ds.get("SamplesPerPixel", 1)) == 3
                                                   else ())
        if arr.shape[1:] == shape:  # several frames (pydicom 2, or no NumberOfFrames)
            arr = arr[0]
        if arr.shape != shape:
            raise ImageReadError(f"DICOM pixel data has shape {arr.shape}, its header "
                                 f"declares {' x '.join(map(str, shape))}")
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3:  # colour: judged and converted as a colour picture is
            rgb = Image.fromarray(_scale_by_bit_depth(arr), mode="RGB")
            _refuse_colour(rgb)
            return rgb.convert("L")
        stored = arr
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    top = 2 ** int(ds.get("BitsStored", 8)) - 1
    if arr is stored and arr.dtype == np.uint8 and top < 255:  # 1 to 7 bits, as stored
        arr = (np.minimum(arr, top).astype(np.uint16) * 255 // top).astype(np.uint8)
    gray = _to_uint8(np.asarray(arr))
    if photometric == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: high values are dark
    return Image.fromarray(gray, mode="L")

def _dicom_data(f):
    """(a binary file for pydicom to read, why its data set is too large or None) for an
    open DICOM file; ImageReadError for a file too large to read.

    A deflated data set (transfer syntax Deflated Explicit VR Little Endian) is inflated
    here into an Explicit VR Little Endian copy in memory, at most MAX_DICOM_BYTES + 1
    bytes of it: pydicom would inflate all of it, however large, before reading even the
    header."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    limit = f"{MAX_DICOM_BYTES // 1_000_000} MB, more than a radiograph needs"
    if os.fstat(f.fileno()).st_size > MAX_DICOM_BYTES:
        raise ImageReadError(f"DICOM file larger than {limit}")
    if not _has_dicom_prefix(f):
        return f, None
    f.seek(132)
    meta = read_dataset(f, is_implicit_VR=False, is_little_endian=True,
                        stop_when=lambda tag, vr, length: tag >> 16 != 2)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        f.seek(0)
        return f, None
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    write_file_meta_info(out, FileMetaDataset(meta), enforce_standard=False)
    inflater, room = zlib.decompressobj(-zlib.MAX_WBITS), MAX_DICOM_BYTES + 1
    data = f.read(1 << 20)
    while data and room > 0 and not inflater.eof:
        block = inflater.decompress(data, room)  # never more than room bytes
        out.write(block)
        room -= len(block)
        data = inflater.unconsumed_tail or f.read(1 << 20)
    out.seek(0)
    return out, (f"deflated DICOM data set inflates to more than {limit}" if room <= 0
                 else None)
