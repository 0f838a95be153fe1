"""Finding images: the files of a folder that may be images (by extension or DICOM
prefix), each entry once, links followed once, and what was skipped with its reason.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cxr import imagefiles, runtime

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                    ".dicom"}

def scan_folder(folder, read_elsewhere=()) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under folder, recursively, sorted, hidden files skipped: (the images, the
    other entries with why they are not read). An image is a file with an image extension
    or a DICOM by content (PACS exports often have no extension); only regular files are
    opened to find out. Linked folders are followed, each real folder once: a link back
    to a folder that holds it (a loop), or to a folder read already (here, or among
    read_elsewhere, which the caller scans on its own), is listed as not followed."""
    images, others = [], []
    folder = Path(folder)
    seen = {}  # (device, inode) of each folder read -> the path it is read under
    for d in (folder, *read_elsewhere):
        with contextlib.suppress(OSError):
            seen.setdefault(_folder_id(d), Path(d))

    def unreadable(e: OSError):
        others.append((Path(e.filename), f"cannot read folder ({e.strerror or e})"))

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        here = Path(os.path.realpath(root))
        kept = []
        for d in sorted(dirs):
            if d.startswith(".") or d == "__MACOSX":
                continue
            p = Path(root) / d
            try:
                key = _folder_id(p)
            except OSError as e:
                others.append((p, f"cannot read folder ({e.strerror or e})"))
                continue
            target, first = Path(os.path.realpath(p)), seen.get(key)
            if here.is_relative_to(target) or first and Path(root).is_relative_to(first):
                # a link to a folder that holds this one, on disk or on the way here
                others.append((p, f"a link back to {runtime.display_name(target)} (a loop): "
                                  "not followed"))
            elif first:
                others.append((p, f"a link to {runtime.display_name(first)}, read already: "
                                  "not followed"))
            else:
                seen[key] = p
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS or imagefiles._is_dicom(p):
                images.append(p)  # read_image_gray names what is wrong with it, if anything
            else:
                kind = f"extension {p.suffix}" if p.suffix else "no extension"
                others.append((p, _entry_problem(p) or f"not an image or DICOM file ({kind})"))
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

def _entry_problem(path: Path) -> str | None:
    """Why a folder entry cannot be read as a file at all, or None."""
    try:
        return imagefiles.file_kind_problem(path.stat().st_mode)
    except OSError as e:
        return f"cannot access file ({e.strerror or e})"

def _folder_id(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
