"""The files of an evaluation: the labelled images it reads (the data set's test or
train folder, any folder with NORMAL/ and PNEUMONIA/, or a run's validation split read
back from its val_split.csv) and whether its outputs can be written where asked.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from cxr import dataset, network, runtime


def output_problem(out, save_calibrated=None) -> str | None:
    """Why an output of this run cannot be written (None if all can)."""
    problem = runtime.write_problem(Path(out), folder=True)
    if problem:
        return f"--out {runtime.display_name(out)}: {problem}"
    data = dataset.labelled_data_folder(Path(out).resolve())
    if data is not None:
        return (f"--out {runtime.display_name(out)} is inside the labelled data set folder "
                f"{runtime.display_name(data)}, and its later scans would read the report's PNGs "
                f"as films; give an --out outside it")
    if save_calibrated:
        problem = runtime.write_problem(Path(save_calibrated), folder=False)
        if problem:
            return f"--save-calibrated {runtime.display_name(save_calibrated)}: {problem}"
    return None

def labelled_files(split: str, data, model_paths) -> tuple[list[Path], list[int], list, str]:
    """The images to evaluate, their labels, the files not read, and where they came from
    (dataset.DataError when there are none)."""
    if split == "val":  # an ensemble file (several splits) is refused once loaded
        split_csv = Path(model_paths[0]).parent / "val_split.csv"
        if not split_csv.is_file():
            raise dataset.DataError(f"--split val: no {runtime.display_name(split_csv)} beside the model")
        try:
            with open(split_csv, newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
            names = [r["file"] for r in rows]
            labels = [network.CLASS_NAMES.index(r["label"]) for r in rows]
        except (KeyError, ValueError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
            raise dataset.DataError(f"{runtime.display_name(split_csv)}: not a split file written by "
                                    f"train_cxray.py ({type(e).__name__}: {e})") from None
        if not rows:
            raise dataset.DataError(f"{runtime.display_name(split_csv)} lists no validation image")
        return (listed_files(split_csv, names), labels, [],
                f"validation split of {runtime.display_name(split_csv.parent)}")
    folder = Path(data) / split if split in ("test", "train") else Path(split)
    if not folder.is_dir():
        raise dataset.DataError(f"{runtime.display_name(folder)} is not a folder"
                                + (" (--data names the dataset root, with train/ and test/)"
                                   if split in ("test", "train") else ""))
    paths, labels, others = dataset.scan_labelled(folder)
    if not paths:
        shown = runtime.display_name(folder)
        raise dataset.DataError(f"no images in {shown}/NORMAL or {shown}/PNEUMONIA "
                                "(class folders may be in any letter case)")
    return paths, labels, others, runtime.display_name(folder)

def listed_files(split_csv: Path, names: list[str]) -> list[Path]:
    """The files a run's split file lists, as paths from here. train_cxray.py writes them
    absolute; older runs wrote them as training was given them, often relative to the
    folder training ran in: those are read from the current folder, or else from the
    folder above the run that holds the most of them."""
    bases = [Path.cwd(), *split_csv.resolve().parent.parents]
    base = max(bases, key=lambda b: sum(os.path.exists(b / n) for n in names))  # first of equals
    if not any(os.path.exists(base / n) for n in names):
        raise dataset.DataError(f"none of the files in {runtime.display_name(split_csv)} is found "
                                "from here or from a folder above the run: run this where training ran")
    return [base / n for n in names]
