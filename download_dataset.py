#!/usr/bin/env python3
"""Step 1 of 4: get the Kermany chest X-ray data into chest_xray/{train,val,test}/.

    python download_dataset.py                                  # from Kaggle (kagglehub)
    python download_dataset.py --source ../shared/data/chest_xray   # a local copy

The Kaggle dataset paultimothymooney/chest-xray-pneumonia unpacks to
chest_xray/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA} next to a __MACOSX folder;
both the nesting and the macOS litter are handled. Either way the layout is checked,
images are counted per split and class, unreadable files and exact duplicates are
flagged (duplicates across splits leak test images into training), and a report is
written to chest_xray/dataset_report_<timestamp>.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from cxr import dataset, imagefiles, network, runtime, scan

KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
SPLITS = ["train", "val", "test"]
REQUIRED = ["train", "test"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Download (or import) the chest X-ray pneumonia dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source", help="import a local copy from this folder instead of Kaggle")
    p.add_argument("--data", "--dest", dest="dest", default="chest_xray",
                   help="the dataset root to lay out (the --data of the other scripts)")
    p.add_argument("--mode", choices=["symlink", "copy"], default="symlink",
                   help="link the split folders to the source, or copy them")
    p.add_argument("--check", choices=["quick", "full", "none"], default="quick",
                   help="quick: decode every image at reduced scale (finds truncated and "
                        "corrupt files); full: decode at full resolution")
    p.add_argument("--force", action="store_true",
                   help="replace a --data folder that this script laid out before (it never "
                        "deletes a folder it did not make)")
    return p.parse_args(argv)


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


def download_from_kaggle() -> Path:
    try:
        import kagglehub
    except ImportError:
        fail("kagglehub is not installed: pip install kagglehub (or use --source DIR)")
    try:
        return Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as e:  # kagglehub raises many types; turn them into one line
        text = f"{type(e).__name__}: {e}".lower()
        if any(k in text for k in ("401", "403", "credential", "unauthorized", "auth")):
            fail("Kaggle refused the download: set up credentials (~/.kaggle/kaggle.json "
                 "or KAGGLE_USERNAME/KAGGLE_KEY), or use --source DIR")
        if any(k in text for k in ("connect", "resolve", "network", "timed out", "name or service")):
            fail("no network connection to Kaggle; download the archive elsewhere and "
                 "use --source DIR")
        fail(f"Kaggle download failed ({type(e).__name__}: {str(e).splitlines()[0][:150]})")


def is_layout(folder: Path) -> bool:
    return all((folder / s / c).is_dir() for s in REQUIRED for c in network.CLASS_NAMES)


def find_layout_root(top: Path) -> Path:
    """The folder holding train/ and test/, also when nested (chest_xray/chest_xray/)."""
    if is_layout(top):
        return top
    candidates = []
    for root, dirs, _ in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__MACOSX" and not d.startswith(".")]
        if is_layout(Path(root)):
            candidates.append(Path(root))
            dirs[:] = []
    if not candidates:
        fail(f"{runtime.display_name(top)} has no train/ and test/ folders "
             "with NORMAL/ and PNEUMONIA/ inside")
    return min(candidates, key=lambda p: len(p.parts))


def inside(a: Path, b: Path) -> bool:
    """Whether folder a is b or lies inside b (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


# What this script lays out in --data, and nothing else: --force removes only these, and
# only where the marker says this script made the folder.
MARKER = ".cxr_dataset"
OWN_ENTRIES = (*SPLITS, MARKER)


def own_entry(path: Path) -> bool:
    name = path.name
    return name in OWN_ENTRIES or (name.startswith("dataset_report_") and name.endswith(".txt"))


def check_not_inside(root: Path, dest: Path):
    """Refuse a --data that holds the data being imported (or lies inside it)."""
    sources = [root / s for s in SPLITS if (root / s).is_dir()] or [root]
    if any(inside(s, dest) or inside(dest, s) for s in sources):
        # e.g. the Kaggle archive unzipped into chest_xray/ gives chest_xray/chest_xray/:
        # replacing --data would delete the data this command reads
        fail(f"the dataset found in {runtime.display_name(root)} lies inside --data "
             f"{runtime.display_name(dest)}, so replacing it would delete it: use it where it "
             f"is with --data {runtime.display_name(root)} (and train_cxray.py --data "
             f"{runtime.display_name(root)}), or choose another --data")


def check_replaceable(dest: Path):
    """Refuse (one line) to replace a --data folder that this script did not lay out, or
    that holds anything it did not put there. Nothing is deleted here."""
    if not (dest.exists() or dest.is_symlink()):
        return
    if dest.is_symlink() or not dest.is_dir():
        fail(f"--data {runtime.display_name(dest)} is not a folder this script made; remove it "
             f"yourself or choose another --data")
    if not (dest / MARKER).is_file():
        fail(f"--data {runtime.display_name(dest)} was not laid out by this script (it has no "
             f"{MARKER} marker), so --force will not delete anything in it: remove it "
             f"yourself or choose another --data")
    foreign = sorted(p.name for p in dest.iterdir() if not own_entry(p))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        fail(f"--data {runtime.display_name(dest)} also holds files this script did not put "
             f"there ({', '.join(map(runtime.display_name, foreign[:3]))}{more}), so --force will "
             f"not replace it: move them out or choose another --data")


def remove_own_layout(dest: Path):
    """Delete what a previous run of this script laid out in dest (see check_replaceable)."""
    for entry in sorted(dest.iterdir(), key=lambda p: p.name == MARKER):  # the marker last
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry)


def lay_out(root: Path, dest: Path, mode: str, force: bool):
    if dest.exists() or dest.is_symlink():
        if dest.resolve() == root.resolve():
            return
        if not dest.is_symlink():
            check_not_inside(root, dest)
        if not force:
            if is_layout(dest):
                print(f"{runtime.display_name(dest)}/ already exists; checking it (use --force "
                      f"to replace it)")
                return
            if not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
                fail(f"{runtime.display_name(dest)} exists and is not a dataset folder: choose "
                     f"another --data")
        else:
            check_replaceable(dest)
            remove_own_layout(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # the marker first: a copy cut short is still this script's, and --force may redo it
    (dest / MARKER).write_text(f"laid out by download_dataset.py from {root.resolve()} "
                               f"({mode}); --force may replace this folder\n")
    skipped = []
    for split in SPLITS:
        src = root / split
        if not src.is_dir():
            continue
        if mode == "symlink":
            (dest / split).symlink_to(src.resolve(), target_is_directory=True)
        else:
            skipped += copy_split(src, dest / split)
    if skipped:
        print(f"Not copied: {len(skipped)} entries")
        for path, reason in skipped[:20]:
            print(f"  {runtime.display_name(path)}: {reason}")


def copy_split(src: Path, dst: Path) -> list[tuple[Path, str]]:
    """Copy the images the other scripts would read from src/{NORMAL,PNEUMONIA}/ (the
    same folder scan), keeping their sub-folders; returns what was not copied, and why."""
    skipped = []
    for name in network.CLASS_NAMES:
        for folder in scan.class_folders(src, name):
            files, others = scan.scan_folder(folder)
            skipped += others
            for f in files:
                target = dst / folder.name / f.relative_to(folder)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
                except OSError as e:
                    skipped.append((f, f"not copied ({e.strerror or e})"))
    return skipped


def check_file(path: Path, how: str) -> str | None:
    """None if the file is a usable image, else the reason. Both checks decode every
    pixel (a header check misses truncated JPEGs); quick decodes JPEGs at reduced scale."""
    try:
        imagefiles.read_image_gray(path, draft_size=network.IMAGE_SIZE if how == "quick" else None)
    except imagefiles.ImageReadError as e:
        return str(e)
    return None


def survey(dest: Path, how: str):
    counts, bad, by_hash = {}, [], defaultdict(list)
    for split in SPLITS:
        for cls in network.CLASS_NAMES:
            folder = dest / split / cls
            files = scan.list_images(folder) if folder.is_dir() else []
            if files:
                counts[(split, cls)] = len(files)
            for f in files:
                by_hash[hashlib.sha256(f.read_bytes()).hexdigest()].append(f)
                if how != "none":
                    reason = check_file(f, how)
                    if reason:
                        bad.append((f, reason))
    dupes = [sorted(v) for v in by_hash.values() if len(v) > 1]
    return counts, bad, dupes


def report(dest: Path, counts, bad, dupes) -> str:
    lines = [f"Dataset in {runtime.display_name(dest)}/", "",
             f"{'split':<6} {'NORMAL':>7} {'PNEUMONIA':>10} {'total':>6}"]
    for split in SPLITS:
        n = [counts.get((split, c), 0) for c in network.CLASS_NAMES]
        if sum(n):
            lines.append(f"{split:<6} {n[0]:>7} {n[1]:>10} {sum(n):>6}")
    if "val" not in {s for s, _ in counts}:
        lines.append("(no val/: train_cxray.py carves a patient-grouped split out of train/)")
    lines.append("")
    lines.append(f"Unreadable files: {len(bad)}")
    lines += [f"  {runtime.display_name(f)}: {r}" for f, r in bad]
    rel = [[str(p.relative_to(dest)) for p in group] for group in dupes]
    cross = [g for g in rel if len({p.split(os.sep)[0] for p in g}) > 1]
    lines.append(f"Exact duplicate groups: {len(dupes)} ({sum(len(g) - 1 for g in dupes)} "
                 f"redundant files), across splits: {len(cross)}")
    lines += ["  " + " = ".join(map(runtime.display_name, g)) for g in (cross or rel)[:10]]
    if len(cross or rel) > 10:
        lines.append(f"  ... and {len(cross or rel) - 10} more")
    return "\n".join(lines) + "\n"


def main(argv=None):
    runtime.printable_console()
    args = parse_args(argv)
    dest = Path(args.dest)
    if args.source:
        top = Path(args.source)
        if not top.is_dir():
            fail(f"--source {runtime.display_name(top)} is not a folder")
    elif is_layout(dest) and not args.force:
        print(f"{runtime.display_name(dest)}/ already holds the dataset; checking it (--force "
              f"downloads again)")
        top = dest
    else:
        if args.force:
            check_replaceable(dest)  # before a long download, not after
        print(f"Downloading {KAGGLE_DATASET} with kagglehub ...")
        top = download_from_kaggle()
    root = find_layout_root(top)
    print(f"Dataset found in {runtime.display_name(root)}")
    lay_out(root, dest, args.mode, args.force)
    missing = [s for s in REQUIRED if not dataset.list_labelled(dest / s)[0]]
    if missing:
        fail(f"{runtime.display_name(dest)} has no images in {', '.join(missing)}")
    counts, bad, dupes = survey(dest, args.check)
    text = report(dest, counts, bad, dupes)
    print(text, end="")
    path = dest / f"dataset_report_{runtime.timestamp()}.txt"
    try:
        path.write_text(text, encoding="utf-8")
        print(f"Report saved to {runtime.display_name(path)}")
    except OSError as e:
        print(f"(report not saved: {e.strerror})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
