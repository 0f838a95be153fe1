"""Hostile files and folders on disk: decompression bombs in DICOM form, FIFOs, sockets
and devices among the images, linked folders and loops, DICOM headers that disagree with
their pixels. Each is read or refused in one line, in bounded memory and time."""

import os
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, needs_pydicom, run_script, script_env
from PIL import Image

from cxr import dataset, imagefiles, network, scan

GOOD = sorted((TINY / "test" / "PNEUMONIA").iterdir())[0]
OTHER = sorted((TINY / "test" / "NORMAL").iterdir())[0]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="needs /proc and RLIMIT_AS (Linux)")


def grey_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


# --- DICOM files built here --------------------------------------------------------


def dicom_dataset(rows, cols, bits=8, photometric="MONOCHROME2", samples=1, **tags):
    """A DICOM header (no pixel data) for a rows x cols image, fake patient name."""
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.PatientName = "Secret^Patient"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def save_dicom(path, ds, pixel_data: bytes, syntax=None):
    """ds with this pixel data, written as a DICOM file (Explicit VR Little Endian unless
    another transfer syntax is given; pydicom deflates a deflated one itself)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = pixel_data
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_claiming(path, ds, pixel_bytes: int, deflated: bool):
    """A DICOM file whose PixelData element holds pixel_bytes zero bytes (a multiple of
    1 MiB), cheap to make: sparse on disk when plain; when deflated, one compressed MiB
    of zeros repeated (about 1 kB each), so the file inflates about 1000-fold."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_tag = b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_bytes.to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(head.getvalue())
        if not deflated:
            f.write(body.getvalue() + pixel_tag)
            f.truncate(f.tell() + pixel_bytes)
            return path

        def packed(data):  # a self-contained, byte-aligned piece of one deflate stream
            z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            return z.compress(data) + z.flush(zlib.Z_FULL_FLUSH)

        f.write(packed(body.getvalue() + pixel_tag))
        mib = packed(bytes(1 << 20))
        for _ in range(pixel_bytes >> 20):
            f.write(mib)
        f.write(zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush())  # final block
    return path


# Reads each file given, under an address-space limit of what the imports took plus
# 768 MB, and prints one line per file; a reader that inflated or read a bomb whole
# would hit the limit (and be refused with MemoryError) instead of the machine.
BOUNDED_READER = """
import resource, sys
from cxr import imagefiles
used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
cap = used + (768 << 20)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for path in sys.argv[1:]:
    try:
        print(f"{path}: read {imagefiles.read_image_gray(path).size}")
    except imagefiles.ImageReadError as e:
        print(f"{path}: refused: {e}")
"""


def read_bounded(*paths, timeout=120) -> dict:
    proc = subprocess.run([sys.executable, "-c", BOUNDED_READER, *map(str, paths)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


@needs_pydicom
@linux_only
def test_dicom_bombs_are_refused_in_bounded_memory(tmp_path):
    """A 2 MB deflated DICOM that inflates to 1.8 GB, a deflated one whose small header
    hides 1 GB of data, and a plain one with 200 MB of pixel data for a 64 x 64 image are
    refused from their header or after a bounded read; a real deflated DICOM reads."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    bomb = dicom_claiming(tmp_path / "bomb.dcm", dicom_dataset(30000, 30000, bits=16),
                          30000 * 30000 * 2 >> 20 << 20, deflated=True)
    hidden = dicom_claiming(tmp_path / "hidden.dcm", dicom_dataset(64, 64), 1 << 30,
                            deflated=True)
    plain = dicom_claiming(tmp_path / "plain.dcm", dicom_dataset(64, 64), 200 << 20,
                           deflated=False)
    arr = grey_of(GOOD)
    real = save_dicom(tmp_path / "real.dcm", dicom_dataset(*arr.shape), arr.tobytes(),
                      DeflatedExplicitVRLittleEndian)
    assert bomb.stat().st_size < 3 << 20 and hidden.stat().st_size < 2 << 20
    out = read_bounded(bomb, hidden, plain, real)
    assert out[str(bomb)].startswith("refused: image too large (30000 x 30000 px"), out
    assert out[str(hidden)].startswith("refused: deflated DICOM data set inflates to more "
                                       f"than {imagefiles.MAX_DICOM_BYTES // 1_000_000} MB"), out
    assert out[str(plain)].startswith("refused: DICOM file larger than"), out
    assert out[str(real)] == "read (64, 64)", out
    assert np.array_equal(np.asarray(imagefiles.read_image_gray(real)), arr)


@needs_pydicom
def test_dicom_header_bounds_the_pixel_bytes(tmp_path):
    """A header within the pixel count but beyond the byte bound (64-bit samples) is
    refused before pydicom reads the pixels."""
    ds = dicom_dataset(5000, 5000, bits=64)  # 25 MP, 200 MB of pixel data
    path = dicom_claiming(tmp_path / "wide.dcm", ds, 1 << 20, deflated=False)
    with pytest.raises(imagefiles.ImageReadError, match=r"image too large .* x 64 bits, limit 120 MB"):
        imagefiles.read_image_gray(path)


# --- FIFOs, sockets, devices --------------------------------------------------------


def special_entries(folder: Path) -> dict:
    """Entries that are not regular files, each with the words its reason must hold."""
    os.mkfifo(folder / "fifo")
    os.mkfifo(folder / "fifo.jpeg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    sock.close()
    (folder / "zero").symlink_to("/dev/zero")
    (folder / "zero.png").symlink_to("/dev/zero")
    return {"fifo": "named pipe", "fifo.jpeg": "named pipe", "sock": "socket",
            "zero": "device", "zero.png": "device"}


# Scans a folder and reads every image found, printing one line per entry.
SCAN_AND_READ = """
import sys
from cxr import imagefiles, scan
images, others = scan.scan_folder(sys.argv[1])
for p, reason in others:
    print(f"{p.name}: listed: {reason}")
for p in images:
    try:
        print(f"{p.name}: read {imagefiles.read_image_gray(p).size}")
    except imagefiles.ImageReadError as e:
        print(f"{p.name}: refused: {e}")
"""


@linux_only
def test_special_files_are_listed_and_never_opened(tmp_path):
    """A FIFO, socket or device in a folder is named as what it is, never opened (a FIFO
    would block the scan forever); a folder named like an image is looked into."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(GOOD, folder / "good.jpeg")
    (folder / "inside.jpg").mkdir()
    shutil.copy(OTHER, folder / "inside.jpg" / "other.jpeg")
    words = special_entries(folder)
    proc = subprocess.run([sys.executable, "-c", SCAN_AND_READ, folder], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=script_env())
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert out.pop("good.jpeg") == "read (64, 64)" and out.pop("other.jpeg") == "read (64, 64)"
    assert set(out) == set(words), out
    for name, word in words.items():
        assert word in out[name] and "not a regular file" in out[name], (name, out[name])


@linux_only
def test_a_file_turned_fifo_after_the_listing_is_refused_not_opened(tmp_path, monkeypatch):
    """open_regular never blocks: a path that was a regular file when looked at and is a
    FIFO when opened is refused (the open does not wait for a writer)."""
    fifo = tmp_path / "film.jpeg"
    os.mkfifo(fifo)
    regular = os.stat(GOOD)
    real_stat = os.stat
    monkeypatch.setattr(imagefiles.os, "stat", lambda p, *a, **k: regular if str(p) == str(fifo)
                        else real_stat(p, *a, **k))
    # a regression would block in open(): from 10 s on, a writer comes and goes every
    # second, so that it fails (late, with another message) instead of hanging
    watchdog = subprocess.Popen([sys.executable, "-c", "import os, sys, time\ntime.sleep(10)\n"
                                 "while True:\n    os.close(os.open(sys.argv[1], os.O_RDWR))\n"
                                 "    time.sleep(1)", fifo])
    start = time.monotonic()
    try:
        with pytest.raises(imagefiles.ImageReadError, match="named pipe"):
            imagefiles.read_image_gray(fifo)
        assert time.monotonic() - start < 10, "the open waited for a writer"
    finally:
        watchdog.kill()
        watchdog.wait()


# --- Linked folders, loops, many links to one file ---------------------------------


def test_linked_folders_are_followed_once_and_loops_listed(tmp_path, monkeypatch):
    """A linked class folder and linked sub-folders are read; a link back to a folder
    that holds it (a loop) or into another class's folder is listed as not followed; an
    unreadable sub-folder is listed too."""
    outside = tmp_path / "outside"
    (outside / "pneu").mkdir(parents=True)
    (outside / "more_normals").mkdir()
    shutil.copy(GOOD, outside / "pneu" / "p1.jpeg")
    shutil.copy(OTHER, outside / "more_normals" / "n2.jpeg")
    split = tmp_path / "train"
    normal = split / "NORMAL"
    (normal / "locked").mkdir(parents=True)
    shutil.copy(OTHER, normal / "n1.jpeg")
    (split / "PNEUMONIA").symlink_to(outside / "pneu", target_is_directory=True)
    (normal / "more").symlink_to(outside / "more_normals", target_is_directory=True)
    (normal / "more" / "again").symlink_to(normal, target_is_directory=True)
    (normal / "cross").symlink_to(split / "PNEUMONIA", target_is_directory=True)
    (normal / "up").symlink_to(tmp_path, target_is_directory=True)  # above the class folder
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths, labels, others = dataset.scan_labelled(split)
    got = {p.name: network.CLASS_NAMES[y] for p, y in zip(paths, labels)}
    assert got == {"n1.jpeg": "NORMAL", "n2.jpeg": "NORMAL", "p1.jpeg": "PNEUMONIA"}
    why = {p.name: reason for p, reason in others}
    assert set(why) == {"again", "cross", "locked", "up"}, why
    assert why["up"] == f"a link back to {os.path.realpath(tmp_path)} (a loop): not followed"
    assert why["again"] == f"a link back to {os.path.realpath(normal)} (a loop): not followed"
    assert why["cross"] == f"a link to {split / 'PNEUMONIA'}, read already: not followed"
    assert why["locked"] == "cannot read folder (Permission denied)"


@linux_only
def test_predict_dir_with_fifos_links_and_loops(tmp_path):
    """predict.py --dir: a FIFO (also given as --image) is skipped with its reason, a
    linked sub-folder is predicted, a loop listed, and 40 links to one file make one row
    and a note saying how many paths were merged."""
    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (folder / "links").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(GOOD, folder / "good.jpeg")
    shutil.copy(OTHER, elsewhere / "linked.jpeg")
    (folder / "sub").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    for i in range(40):
        (folder / "links" / f"same_{i:02d}.jpeg").symlink_to(folder / "good.jpeg")
    os.mkfifo(folder / "fifo")
    os.mkfifo(tmp_path / "arg_fifo")
    proc = run_script("predict.py", "--dir", folder, "--image", tmp_path / "arg_fifo",
                      "--quiet", "--out", tmp_path / "out", timeout=300)
    assert "Traceback" not in proc.stderr
    assert "Predicted 2 image(s)" in proc.stdout, proc.stdout
    assert any(line.startswith(str(folder / "sub" / "linked.jpeg")) for line in
               proc.stdout.splitlines()), proc.stdout
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped:")]
    assert f"skipped: {folder / 'fifo'}: is a named pipe (FIFO), not a regular file" in skipped
    assert f"skipped: {tmp_path / 'arg_fifo'}: is a named pipe (FIFO), not a regular file" in skipped
    loop = f"a link back to {os.path.realpath(folder)} (a loop): not followed"
    assert f"skipped: {folder / 'loop'}: {loop}" in skipped
    assert "note: 40 path(s) lead to a file listed already" in proc.stdout, proc.stdout


def test_decode_cache_survives_broken_and_looping_links(tmp_path):
    """The decode cache's key stats every file: a broken link or a link loop among the
    images is a skipped file with its reason, not a crash of training or evaluation."""
    shutil.copy(GOOD, tmp_path / "good.jpeg")
    (tmp_path / "broken.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    (tmp_path / "loop_a.jpeg").symlink_to(tmp_path / "loop_b.jpeg")
    (tmp_path / "loop_b.jpeg").symlink_to(tmp_path / "loop_a.jpeg")
    paths = scan.list_images(tmp_path)
    images, kept, bad = dataset.decode_all(paths, 64, cache_dir=tmp_path / "cache")
    assert [paths[i].name for i in kept] == ["good.jpeg"]
    assert {p.name: r.split(" (")[0] for p, r in bad} == {
        "broken.jpeg": "cannot access file", "loop_a.jpeg": "cannot access file",
        "loop_b.jpeg": "cannot access file"}


# --- DICOM headers that disagree with their pixels ----------------------------------


@needs_pydicom
def test_dicom_frames_without_a_frame_count_give_the_first(tmp_path):
    """Three frames' pixel data under a header with no NumberOfFrames: the first frame,
    at the header's size (not a 64 x 3 strip of averaged rows)."""
    first, second = grey_of(GOOD), grey_of(OTHER)
    path = save_dicom(tmp_path / "frames.dcm", dicom_dataset(64, 64),
                      first.tobytes() + second.tobytes() * 2)
    assert np.array_equal(np.asarray(imagefiles.read_image_gray(path)), first)


@needs_pydicom
def test_dicom_palette_is_applied_then_judged_as_colour(tmp_path):
    """PALETTE COLOR: the palette maps the stored indices to colours before anything is
    judged; a grey palette (here inverting) gives its grey, a coloured one is refused as
    a colour picture, as a colour JPEG is."""
    arr = grey_of(GOOD)
    ramp = np.arange(256, dtype=np.uint16) * 257

    def palette(path, red, green, blue):
        ds = dicom_dataset(64, 64, photometric="PALETTE COLOR")
        for i, (name, lut) in enumerate(zip(("Red", "Green", "Blue"), (red, green, blue))):
            ds.add_new(0x00281101 + i, "US", [256, 0, 16])  # entries, first index, bits
            ds.add_new(0x00281201 + i, "OW", lut.astype("<u2").tobytes())
            assert ds[0x00281101 + i].keyword == f"{name}PaletteColorLookupTableDescriptor"
        return save_dicom(path, ds, arr.tobytes())

    inverted = palette(tmp_path / "grey.dcm", *[ramp[::-1]] * 3)
    assert np.abs(np.asarray(imagefiles.read_image_gray(inverted)).astype(int) - (255 - arr)).max() <= 1
    coloured = palette(tmp_path / "colour.dcm", ramp, ramp[::-1], np.zeros(256))
    with pytest.raises(imagefiles.ImageReadError, match="a colour picture"):
        imagefiles.read_image_gray(coloured)


@needs_pydicom
def test_dicom_rgb_is_judged_as_colour(tmp_path):
    """An RGB DICOM is treated as an RGB JPEG is: refused when coloured, read as its
    grey when its channels agree."""
    arr = grey_of(GOOD)
    grey = np.repeat(arr[..., None], 3, axis=2)
    path = save_dicom(tmp_path / "grey_rgb.dcm", dicom_dataset(64, 64, photometric="RGB",
                                                                samples=3), grey.tobytes())
    assert np.abs(np.asarray(imagefiles.read_image_gray(path)).astype(int) - arr).max() <= 1
    colour = np.stack([arr, 255 - arr, np.zeros_like(arr)], axis=2)
    path = save_dicom(tmp_path / "colour_rgb.dcm", dicom_dataset(64, 64, photometric="RGB",
                                                                  samples=3), colour.tobytes())
    with pytest.raises(imagefiles.ImageReadError, match="a colour picture"):
        imagefiles.read_image_gray(path)


@needs_pydicom
def test_dicom_with_few_bits_uses_the_full_grey_range(tmp_path):
    """1 bit allocated (packed bits) decodes to black and white (0 and 255), not to 0
    and 1 read as a blank image; 4 bits stored in 8 are scaled to 0-255 likewise."""
    arr = grey_of(GOOD)
    bits = (arr > 128).astype(np.uint8)
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    one = save_dicom(tmp_path / "one_bit.dcm", dicom_dataset(64, 64, bits=1), packed)
    assert np.array_equal(np.asarray(imagefiles.read_image_gray(one)), bits * 255)
    dataset.load_image_array(one, 64)  # a radiograph's structure, not a blank image
    ds = dicom_dataset(64, 64, bits=8, BitsStored=4, HighBit=3)
    four = save_dicom(tmp_path / "four_bit.dcm", ds, (arr // 16).tobytes())
    assert np.array_equal(np.asarray(imagefiles.read_image_gray(four)), (arr // 16) * 17)
