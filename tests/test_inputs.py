"""Hostile and unusual inputs: converted when valid, one-line errors otherwise."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from conftest import DATA, TINY, needs_pydicom, run_folder, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr import dataset, imagefiles

# a film that passes the photograph check whatever the model (layout 0.91, detail 0.034 at
# 224 px), so that its verdict never depends on a trained model's typicality for it
GOOD = TINY / "test" / "PNEUMONIA" / "person161_bacteria_757.jpeg"


def png_with_size(width, height):
    """A PNG header that claims width x height (a decompression bomb), tiny on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def make_valid_unusual(folder):
    """Valid images in modes a hospital export may use; all must be predicted."""
    base = Image.open(GOOD).convert("L")
    arr = np.asarray(base)
    Image.fromarray(arr.astype(np.uint16) * 257).save(folder / "gray16.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpeg")
    base.convert("P").save(folder / "palette.png")
    base.convert("RGB").save(folder / "rgb.bmp")
    return ["gray16.png", "rgba.png", "cmyk.jpeg", "palette.png", "rgb.bmp"]


def make_bad(folder):
    """Each bad file and the words its error line must contain."""
    (folder / "empty.jpeg").write_bytes(b"")
    (folder / "text.jpeg").write_text("this is not an image\n")
    data = GOOD.read_bytes()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 3])
    png = io.BytesIO()
    Image.open(GOOD).save(png, format="PNG")
    raw = bytearray(png.getvalue())
    raw[raw.index(b"IDAT") + 20] ^= 0xFF  # inside the first IDAT: its CRC no longer matches
    (folder / "badcrc.png").write_bytes(bytes(raw))
    Image.new("L", (1, 1)).save(folder / "one_pixel.png")
    (folder / "bomb.png").write_bytes(png_with_size(20000, 20000))
    (folder / "folder.jpeg").mkdir()
    os.symlink(folder / "loop_b.jpeg", folder / "loop_a.jpeg")
    os.symlink(folder / "loop_a.jpeg", folder / "loop_b.jpeg")
    return {"empty.jpeg": "empty file", "text.jpeg": "not an image",
            "truncated.jpeg": "truncated", "badcrc.png": "corrupt",
            "one_pixel.png": "too small", "bomb.png": "too large",
            "loop_a.jpeg": "cannot access", "loop_b.jpeg": "cannot access"}


def test_batch_goes_on_and_lists_skipped(model_path, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    valid = make_valid_unusual(folder)
    bad = make_bad(folder)
    weird = os.fsencode(str(folder)) + b"/name_\xff\xfe.jpeg"  # not valid UTF-8
    with open(weird, "wb") as f:
        f.write(GOOD.read_bytes())
    proc = run_script("predict.py", "--model", model_path, "--dir", folder, "--image",
                      folder / "folder.jpeg", "--quiet", "--out", tmp_path / "out")
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr + proc.stdout
    for name in valid + ["name_\\xff\\xfe.jpeg"]:
        assert any(line.startswith(str(folder / name)) and ("NORMAL" in line or "PNEUMONIA" in line)
                   for line in proc.stdout.splitlines()), name
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped:")]
    for name, words in bad.items():
        (line,) = [ln for ln in errors if f"/{name}:" in ln]
        assert words in line, line
    assert "is a directory" in proc.stderr
    assert f"Predicted {len(valid) + 1} image(s)" in proc.stdout
    assert f"Skipped {len(bad) + 1} file(s)" in proc.stdout


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "secret.jpeg"
    f.write_bytes(GOOD.read_bytes())
    f.chmod(0)
    if os.geteuid() == 0:  # root reads a chmod 000 file: make the open fail as for a user

        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(imagefiles.Image, "open", deny)
    with pytest.raises(imagefiles.ImageReadError, match="permission denied"):
        imagefiles.read_image_gray(f)


def test_nothing_readable_exits_nonzero(model_path, tmp_path):
    (tmp_path / "a.jpeg").write_text("nope")
    proc = run_script("predict.py", "--model", model_path, "--dir", tmp_path, "--out",
                      tmp_path / "o", check=False)
    assert proc.returncode == 1 and "no image could be read" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unusual_modes_match_the_8bit_original(tmp_path):
    """16-bit, RGBA, CMYK and palette versions of one X-ray preprocess (almost) alike."""
    names = make_valid_unusual(tmp_path)
    ref = dataset.load_image_array(GOOD, 64).astype(int)
    for name in names:
        arr = dataset.load_image_array(tmp_path / name, 64).astype(int)
        assert arr.shape == (64, 64)
        tol = 12 if name in ("cmyk.jpeg", "palette.png") else 1
        assert np.abs(arr - ref).mean() < tol, name


def test_fullres_draft_decoding_preserves_the_result():
    """JPEG draft mode (reduced DCT decoding) barely changes the 224 px model input."""
    for f in (DATA / "fullres").iterdir():
        fast = dataset.load_image_array(f, 224).astype(float)
        img = Image.open(f).convert("L").resize((224, 224), Image.Resampling.BILINEAR)
        slow = np.asarray(img, dtype=float)
        assert np.abs(fast - slow).mean() < 1.5, f.name


# --- DICOM -----------------------------------------------------------------------

SIIM = DATA / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = DATA / "dicom" / "Fake_MONOHR1.dcm"


@needs_pydicom
def test_monochrome1_is_the_exact_negative_of_its_twin():
    twin = np.asarray(imagefiles.read_image_gray(SIIM)).astype(int)
    mono1 = np.asarray(imagefiles.read_image_gray(FAKE_MONO1)).astype(int)
    assert twin.shape == (1024, 1024) and twin.std() > 20
    assert (mono1 == 255 - twin).all()


def grey_dicom(path, syntax, pixel_data, rows, cols, bits=8, stored=8, **tags):
    """A one-frame MONOCHROME2 DICOM with a fake patient name, written to path."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientName = "Secret^Patient"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        bits, stored, stored - 1, 0)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data
    if syntax.is_compressed:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


@needs_pydicom
def test_16bit_dicom_with_rescale_and_window(tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian

    arr = (np.asarray(Image.open(GOOD).convert("L")).astype(np.uint16) * 16)  # 12-bit
    path = grey_dicom(tmp_path / "x16.dcm", ExplicitVRLittleEndian, arr.tobytes(), *arr.shape,
                      bits=16, stored=12, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=1024, WindowWidth=4096)
    out = np.asarray(imagefiles.read_image_gray(path)).astype(int)
    ref = np.asarray(Image.open(GOOD).convert("L")).astype(int)
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999



@needs_pydicom
def test_dicom_rescale_then_window_gives_known_grey_levels(tmp_path):
    """Guards against dropping the modality LUT (RescaleSlope/Intercept) or the VOI
    window: a 12-bit ramp whose window clips both ends must come out exactly as the
    DICOM linear VOI function (PS3.3 C.11.2.1.2.1) and the min-max step give.

    (The correlation test above cannot see either step: any linear map keeps it.)"""
    from pydicom.uid import ExplicitVRLittleEndian

    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once
    path = grey_dicom(tmp_path / "ramp.dcm", ExplicitVRLittleEndian, stored.tobytes(), 64, 64,
                      bits=16, stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                      WindowCenter=1500, WindowWidth=2001)
    out = np.asarray(imagefiles.read_image_gray(path)).astype(int)

    x = 2.0 * stored - 1024  # modality LUT: x = slope * stored + intercept
    c, w = 1500 - 0.5, 2001 - 1  # LINEAR: c - 0.5, w - 1
    frac = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
    expected = np.round(frac * 255).astype(int)  # window output spans its range: min-max
    assert (x <= c - w / 2).sum() == 762 and (x > c + w / 2).sum() == 2334  # both ends clip
    assert np.array_equal(out, expected), np.abs(out - expected).max()
    # a few values worked out by hand: stored 1000 -> x 976 -> (976 - 499.5) / 2000
    # = 0.23825 -> 60.75 -> 61; stored 1500 -> x 1976 -> 0.73825 -> 188.25 -> 188;
    # stored 1750 -> x 2476 -> 0.98825 -> 252.0; stored 1762 -> x 2500 > 2499.5 -> 255
    flat = out.ravel()
    assert [flat[v] for v in (0, 761, 762, 1000, 1500, 1750, 1761, 1762, 4095)] == [
        0, 0, 0, 61, 188, 252, 255, 255, 255]

@needs_pydicom
def test_dicom_prediction_never_prints_patient_tags(model_path, tmp_path):
    proc = run_script("predict.py", "--model", model_path, "--image", SIIM, "--image",
                      FAKE_MONO1, "--json", "--out", tmp_path / "out")
    text = proc.stdout + proc.stderr + (run_folder(tmp_path / "out") / "predictions.jsonl").read_text()
    import pydicom

    ds = pydicom.dcmread(SIIM)
    for tag in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(ds.get(tag, "")).strip()
        if len(value) > 2:
            assert value not in text, tag
    assert "Predicted 2 image(s)" in proc.stdout


def test_dicom_without_pydicom_says_how_to_fix(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['pydicom'] = None; from cxr import imagefiles\n"
            f"try:\n    imagefiles.read_image_gray({str(SIIM)!r})\n"
            "except imagefiles.ImageReadError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=DATA.parent.parent).stdout
    assert "pip install pydicom" in out


def compressed_dicom(path, syntax, frame: bytes, rows, cols):
    """A one-frame DICOM whose pixel data is encapsulated with the given transfer syntax."""
    from pydicom.encaps import encapsulate

    return grey_dicom(path, syntax, encapsulate([frame]), rows, cols)


@needs_pydicom
def test_jpeg_compressed_dicom_decodes_with_the_installed_handler(tmp_path):
    from pydicom.uid import JPEGBaseline8Bit

    ref = Image.open(GOOD).convert("L")
    buf = io.BytesIO()
    ref.save(buf, "JPEG", quality=95)
    path = compressed_dicom(tmp_path / "jpeg.dcm", JPEGBaseline8Bit, buf.getvalue(),
                            ref.height, ref.width)
    out = np.asarray(imagefiles.read_image_gray(path)).astype(float)
    assert np.abs(out - np.asarray(ref, dtype=float)).mean() < 2.0


@needs_pydicom
def test_compressed_dicom_without_a_handler_is_a_clear_one_line_error(model_path, tmp_path):
    from pydicom.uid import JPEGLSLossless  # needs pylibjpeg-libjpeg, gdcm or pyjpegls

    scans = tmp_path / "scans"
    scans.mkdir()
    compressed_dicom(scans / "jpegls.dcm", JPEGLSLossless, b"\xff\xd8not-really-jpeg-ls\xff\xd9",
                     64, 64)
    (scans / "good.jpeg").write_bytes(GOOD.read_bytes())
    proc = run_script("predict.py", "--model", model_path, "--dir", scans, "--out",
                      tmp_path / "out")
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Secret" not in text
    lines = [s for s in text.splitlines() if "jpegls.dcm" in s]  # as it happens + summary
    assert lines and all("cannot decode DICOM pixel data (JPEG-LS" in s and "pip install" in s
                         for s in lines)
    assert "Predicted 1 image(s)" in proc.stdout


# --- fuzzing the decoder -------------------------------------------------------------

JPEG_BYTES = GOOD.read_bytes()


def check_decoder(path):
    try:
        img = imagefiles.read_image_gray(path)
    except imagefiles.ImageReadError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert img.mode == "L" and min(img.size) >= imagefiles.MIN_SIDE


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.jpeg"
    path.write_bytes(data)
    check_decoder(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(JPEG_BYTES) - 1), st.integers(0, 255)),
                min_size=1, max_size=20),
       st.integers(0, len(JPEG_BYTES)))
def test_fuzz_mutated_jpeg(tmp_path, flips, cut):
    data = bytearray(JPEG_BYTES[:max(cut, 1)])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    path = tmp_path / "mutated.jpeg"
    path.write_bytes(bytes(data))
    check_decoder(path)


def test_the_good_film_looks_like_a_film():
    """The premise of the format tests above: GOOD is never withheld as "not like a chest
    X-ray", so a wrong verdict there is the decoder's fault, not the model's."""
    from cxr import dataset, imagefiles

    assert imagefiles.unlike_a_film(dataset.load_image_array(GOOD, imagefiles.FILM_SIZE)) is None
