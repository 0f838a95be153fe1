"""visualize_results.py given user mistakes: each is one 'error:' line, found before any
work (no image decoded, no evaluation folder made), or the run goes through; never a
traceback, never a lost report, never an input overwritten. Runs the shipped model (it
has a calibration) on the tiny real images, as a user runs the script."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_folder, run_script

from cxr import runtime

SHIPPED = ROOT / "models" / "mobilenet_cxr.pth"
QUICK = ["--bootstrap", 20, "--gallery", 0]


def visualize(*args, out, cwd=None):
    return run_script("visualize_results.py", "--out", out, *QUICK, *args, cwd=cwd, check=False)


def refused_up_front(proc, start, out):
    """One 'error:' line starting with start, no traceback, no image decoded, nothing
    written under out."""
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(start), lines[0]
    assert "decoding" not in proc.stderr and "predicting" not in proc.stderr
    assert not Path(out).exists() or not any(Path(out).iterdir())
    return lines[0]


def copy_classes(dst, normal=TINY / "test" / "NORMAL", pneumonia=TINY / "test" / "PNEUMONIA"):
    for name, src in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        if src is not None:
            shutil.copytree(src, dst / name)
    return dst


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in (root ignores permission bits, but
    creates no file in /proc either)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif Path("/proc/self").is_dir():
        yield Path("/proc/self")
    else:
        pytest.skip("no folder this (root) process cannot write in")


# ---------------------------------------------------------------------------------
# --recalibrate K that cannot work.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k,data,start", [
    # 16 images of 8 + 8 patients: 16 groups of 1 (IndexError), 1 group of 9 (silently
    # skipped), 2 groups of 4 on NORMAL images only (TypeError), K = 0
    (1, "tiny", "error: --recalibrate 1: 16 images of 8 NORMAL and 8 PNEUMONIA patients"),
    (9, "tiny", "error: --recalibrate 9: 16 images"),
    (4, "normal only", "error: --recalibrate 4: 8 images of 8 NORMAL and 0 PNEUMONIA"),
    (0, "tiny", "visualize_results.py: error: argument --recalibrate"),
])
def test_a_recalibration_K_that_cannot_work_is_refused_up_front(k, data, start, tmp_path):
    split = TINY / "test" if data == "tiny" else copy_classes(tmp_path / "site", pneumonia=None)
    proc = visualize("--split", split, "--recalibrate", 4, k, out=tmp_path / "ev")
    line = refused_up_front(proc, start, tmp_path / "ev")
    if data == "tiny" and k:
        assert "K from 2 to 8 works here" in line
    if data != "tiny":
        assert "no K works here" in line


def test_recalibration_checks_K_again_after_skipping_unreadable_files(tmp_path):
    """Listed, 8 + 8 patients allow K = 4; after 7 truncated PNEUMONIA files are skipped,
    one PNEUMONIA patient is left, and 2 groups of 4 cannot each have one."""
    site = copy_classes(tmp_path / "site")
    for f in sorted((site / "PNEUMONIA").iterdir())[1:]:
        f.write_bytes(f.read_bytes()[:300])
    proc = visualize("--split", site, "--recalibrate", 4, out=tmp_path / "ev")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --recalibrate 4: 9 images of 8 NORMAL and 1 PNEUMONIA"), last
    assert "(after the 7 skipped file(s))" in last
    assert not (tmp_path / "ev").exists()


def test_files_named_alike_in_both_classes_are_two_patients(tmp_path):
    """A site folder numbering its files 1..8 in NORMAL/ and in PNEUMONIA/: the patient
    ids (file stems) are shared, and a group of 2 used to hold one id only, which the
    grouped calibration fit could not split (ValueError)."""
    site = tmp_path / "site"
    for name in ("NORMAL", "PNEUMONIA"):
        (site / name).mkdir(parents=True)
        for i, f in enumerate(sorted((TINY / "test" / name).iterdir()), 1):
            shutil.copy(f, site / name / f"{i}.jpeg")
    proc = visualize("--split", site, "--recalibrate", 2, "--draws", 2, out=tmp_path / "ev")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_folder(tmp_path / "ev") / "metrics.json").read_text())
    (row,) = metrics["recalibration"]
    assert row["K"] == 2 and row["draws"] == 2


# ---------------------------------------------------------------------------------
# Outputs that cannot be written, and inputs that must not be overwritten.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,target,start", [
    ("--save-calibrated", "folder", "error: --save-calibrated {}: is a folder"),
    ("--save-calibrated", "under a file", "error: --save-calibrated {}: {} is not a folder"),
    ("--save-calibrated", "fifo", "error: --save-calibrated {}: exists and is not a regular"),
    ("--save-calibrated", "unwritable", "error: --save-calibrated {}: cannot write in {}"),
    ("--out", "under a file", "error: --out {}: {} is not a folder"),
    ("--out", "unwritable", "error: --out {}: cannot write in {}"),
])
def test_an_output_that_cannot_be_written_is_refused_up_front(flag, target, start, tmp_path,
                                                              request):
    """These used to fail after all the work (IsADirectoryError, NotADirectoryError,
    PermissionError), leaving an evaluation folder without report.html."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    parent = {"folder": tmp_path, "under a file": a_file, "fifo": tmp_path,
              "unwritable": request.getfixturevalue("unwritable") if target == "unwritable"
              else None}[target]
    path = {"folder": tmp_path / "folder", "fifo": tmp_path / "fifo"}.get(target,
                                                                          parent / "site_or_out")
    if target == "folder":
        path.mkdir()
    if target == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)
    out = path if flag == "--out" else tmp_path / "ev"
    args = ["--recalibrate", 4, "--save-calibrated", path] if flag != "--out" else []
    proc = visualize("--split", TINY / "test", *args, out=out)
    refused_up_front(proc, start.format(path, parent), tmp_path / "ev")
    if flag == "--out" and target == "under a file":
        assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("spelling", ["the model by another path", "a symlink to the model",
                                      "an image being evaluated"])
def test_save_calibrated_never_overwrites_an_input(spelling, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    model = models / "model.pth"
    shutil.copy(SHIPPED, model)
    site = copy_classes(tmp_path / "site")
    image = sorted((site / "NORMAL").iterdir())[0]
    target = {"the model by another path": tmp_path / "models" / ".." / "models" / "model.pth",
              "a symlink to the model": tmp_path / "link.pth",
              "an image being evaluated": image}[spelling]
    if spelling == "a symlink to the model":
        target.symlink_to(model)
    before = runtime.sha256_file(model), image.read_bytes()
    proc = visualize("--model", model, "--split", site, "--recalibrate", 4,
                     "--save-calibrated", target, out=tmp_path / "ev")
    line = refused_up_front(proc, f"error: --save-calibrated {target} is ", tmp_path / "ev")
    assert line.endswith("an input of this run: name a new file")
    assert (runtime.sha256_file(model), image.read_bytes()) == before
    assert spelling != "a symlink to the model" or target.is_symlink()


def test_an_ensemble_adapted_and_saved_keeps_every_adapted_member(tmp_path):
    """--adapt with --save-calibrated on an ensemble file writes an ensemble file of every
    member with its BatchNorm statistics adapted (and the site's shared calibration),
    which loads like any model file."""
    import torch

    from cxr import checkpoints

    built = tmp_path / "ens.pth"
    run_script("experiments/build_ensemble.py", "--model", SHIPPED, "--model",
               ROOT / "models" / "reference_seed1.pth", "--out", built)
    proc = visualize("--model", built, "--split", TINY / "test", "--adapt", "--recalibrate", 4,
                     "--save-calibrated", tmp_path / "site.pth", out=tmp_path / "ev")
    assert proc.returncode == 0, proc.stderr
    members, cal, _ = checkpoints.load_model(tmp_path / "site.pth")
    before, _, _ = checkpoints.load_model(built)
    assert len(members) == 2 and cal.shared is True
    for (m, _), (b, _) in zip(members, before):
        moved = [k for k, v in m.state_dict().items() if "running_mean" in k
                 and not torch.equal(v, b.state_dict()[k])]
        assert moved  # each member's BatchNorm statistics were adapted


# ---------------------------------------------------------------------------------
# --split val from another folder, and damaged or missing data.
# ---------------------------------------------------------------------------------


def old_run(work):
    """A run folder as older train_cxray.py versions left it when run in `work` with
    --data data: val_split.csv names the files relative to `work`."""
    copy_classes(work / "data" / "train")
    run = work / "runs" / "20260101_000000_improved_seed1"
    run.mkdir(parents=True)
    shutil.copy(SHIPPED, run / "mobilenet_cxr.pth")
    with open(run / "val_split.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "label", "patient", "file"])
        for name in ("NORMAL", "PNEUMONIA"):
            for p in sorted((work / "data" / "train" / name).iterdir()):
                w.writerow(["val", name, p.stem, f"data/train/{name}/{p.name}"])
    return run


def test_val_split_of_an_older_run_is_found_from_another_folder(tmp_path):
    run = old_run(tmp_path / "work")
    proc = visualize("--model", run / "mobilenet_cxr.pth", "--split", "val",
                     out=tmp_path / "ev", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_folder(tmp_path / "ev") / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["skipped"] == []


def test_the_split_file_names_files_that_any_folder_finds(tmp_path, monkeypatch):
    """train_cxray.py writes val_split.csv with absolute paths, though it was given the
    data relative to its working folder."""
    import numpy as np

    from cxr import runfiles

    copy_classes(tmp_path / "work" / "data" / "train")
    monkeypatch.chdir(tmp_path / "work")
    files = sorted(Path("data/train/NORMAL").iterdir())
    runfiles.write_split_csv(tmp_path / "val_split.csv",
                             {"val": (files, np.zeros(len(files), dtype=int))})
    monkeypatch.chdir(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "val_split.csv", encoding="utf-8")))
    assert len(rows) == 8
    for r in rows:
        assert os.path.isabs(r["file"]) and os.path.isfile(r["file"]), r["file"]


@pytest.mark.parametrize("damage,start", [
    ("no file column", "error: {}: not a split file written by train_cxray.py (KeyError"),
    ("unknown label", "error: {}: not a split file written by train_cxray.py (ValueError"),
    ("no validation row", "error: {} lists no validation image"),
])
def test_a_damaged_split_file_is_one_line(damage, start, tmp_path):
    run = old_run(tmp_path / "work")
    split = run / "val_split.csv"
    text = split.read_text()
    split.write_text({"no file column": text.replace(",file", ",path"),
                      "unknown label": text.replace("val,NORMAL", "val,normal"),
                      "no validation row": text.replace("val,", "train,")}[damage])
    proc = visualize("--model", run / "mobilenet_cxr.pth", "--split", "val",
                     out=tmp_path / "ev", cwd=tmp_path / "work")
    refused_up_front(proc, start.format(split), tmp_path / "ev")


@pytest.mark.parametrize("args,start", [
    (["--data", "{tmp}"], "error: {tmp}/test is not a folder (--data names the dataset root"),
    (["--split", "{tmp}/missing"], "error: {tmp}/missing is not a folder"),
])
def test_a_missing_data_folder_is_named(args, start, tmp_path):
    proc = visualize(*[a.format(tmp=tmp_path) for a in args], out=tmp_path / "ev")
    refused_up_front(proc, start.format(tmp=tmp_path), tmp_path / "ev")


def test_an_out_inside_a_labelled_data_set_is_refused_up_front(tmp_path):
    """The report's PNGs written among the films would be read as films by the next
    training or evaluation scan of that folder."""
    data = tmp_path / "chest_xray" / "test"
    copy_classes(data)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (data / "NORMAL" / "eval", data):
        proc = visualize("--split", data, out=out)
        line = refused_up_front(proc, f"error: --out {out} is inside the labelled data set",
                                tmp_path / "nothing")
        assert "would read the report's PNGs as films" in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
