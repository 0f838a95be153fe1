"""Labelled folders (train/, val/, test/ with NORMAL/ and PNEUMONIA/), patient ids, the
patient-grouped splits, and images decoded once to fixed-size 8-bit arrays (cached).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from cxr import imagefiles, network, runtime, scan


def scan_labelled(split_dir) -> tuple[list[Path], list[int], list[tuple[Path, str]]]:
    """Images of a {NORMAL,PNEUMONIA}/ folder (any letter case), their class indices, and
    the other files found there with why they are not read."""
    paths, labels, others = [], [], []
    folders = [(idx, f) for idx, name in enumerate(network.CLASS_NAMES)
               for f in scan.class_folders(split_dir, name)]
    for idx, folder in folders:  # a link into another class's folder is not followed
        files, other = scan.scan_folder(folder, read_elsewhere=[f for _, f in folders])
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
            names = network.CLASS_NAMES
            if d.name.upper() in names or any(scan.class_folders(d, n) for n in names):
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

def load_image_array(path, size: int = network.IMAGE_SIZE) -> np.ndarray:
    """The preprocessing shared by training and prediction: an (size, size) uint8 array.

    Grey 8-bit, squashed to size x size with bilinear (antialiased) resampling, as
    torchvision's Resize((224, 224)) does in the reference run. Blank and noise images
    are refused (imagefiles.ImageReadError), as is anything imagefiles.read_image_gray refuses.
    """
    img = imagefiles.read_image_gray(path, draft_size=size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    gray = np.asarray(img, dtype=np.uint8).copy()
    imagefiles.check_structure(gray)
    return gray

def try_load_image_array(path, size: int = network.IMAGE_SIZE) -> tuple[np.ndarray | None, str]:
    """load_image_array that never raises for one bad file: (array, "") or (None, reason).

    Any exception a decoder throws (Pillow, pydicom, NumPy, MemoryError) becomes the
    one-line reason, so one file can never stop a batch."""
    try:
        return load_image_array(path, size), ""
    except imagefiles.ImageReadError as e:
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
        runtime.write_atomic(cache_file, lambda f: np.savez(
            f, images=out, kept=np.array(kept, dtype=np.int64),
            skipped=np.array(bad, dtype=np.int64), reasons=np.array(reasons, dtype=str)))
    return out, kept, [(paths[i], r) for i, r in zip(bad, reasons)]

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

VAL_FRACTION = 0.1  # patient-grouped validation share of train/ when there is no val/
CALIB_FRACTION = 0.1  # patient-grouped share of train/ held out by recipes that calibrate

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
        print(f"note: cache folder {runtime.display_name(folder)} cannot be written ({why}): "
              "decoding without a cache")
        return ""

def check_data(data) -> None:
    """The training folder exists and holds both classes (DataError otherwise)."""
    data = Path(data)
    if not (data / "train").is_dir():
        raise DataError(f"{runtime.display_name(data / 'train')} not found: run "
                        "download_dataset.py first (or pass --data)")
    require_both_classes(list_labelled(data / "train")[1], runtime.display_name(data / "train"))

def require_both_classes(labels, where: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(network.CLASS_NAMES))
    empty = [network.CLASS_NAMES[i] for i, n in enumerate(counts) if n == 0]
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
                f"{runtime.display_name(data)}/val")
    if has_val:
        vp, vl = list_labelled(data / "val")
        paths, labels = paths + vp, labels + vl
    source = f"{runtime.display_name(data)}/train" + (" + val" if has_val else "")

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
            raise DataError(f"--resume: {runtime.display_name(bad[0][0])} of the run's "
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
