"""Nothing lost, nothing silently wrong: one test per class of failure found by the
hostile-input trial. The scripts run as a user runs them, on real files."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    DATA,
    ROOT,
    TINY,
    logits_of,
    referral_record,
    run_folder,
    run_script,
    scaled_probability,
    train_args,
)
from PIL import Image

from cxr import checkpoints, dataset, evalfiles, imagefiles, network, scan

XRAY = TINY / "test" / "PNEUMONIA" / "person161_bacteria_757.jpeg"  # looks like a film (test_inputs)


def one_line_error(proc, *words):
    """The run failed with one 'error:' line naming what is wrong, and no traceback."""
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def rows_of(out_dir):
    """The rows of predictions.csv in a run folder (or in the one run under a parent)."""
    if not (Path(out_dir) / "predictions.csv").exists():
        out_dir = run_folder(out_dir)
    return list(csv.DictReader(open(out_dir / "predictions.csv", newline="", encoding="utf-8")))


def recalibrated(model_path, tmp_path, name="recal.pth", **calibration):
    payload = torch.load(model_path, weights_only=True)
    meta = dict(payload["meta"], calibration=calibration)
    path = tmp_path / name
    checkpoints.save_checkpoint(path, payload["state_dict"], meta)
    return path


# --- data loss --------------------------------------------------------------------


def test_download_force_never_deletes_its_own_source(tmp_path):
    """The Kaggle unzip gives chest_xray/chest_xray/: --force with the default --dest
    used to delete the data it was importing."""
    shutil.copytree(TINY, tmp_path / "chest_xray" / "chest_xray")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for extra in ([], ["--force", "--mode", "copy"]):
        proc = run_script("download_dataset.py", "--source", "chest_xray", *extra,
                          cwd=tmp_path, check=False)
        one_line_error(proc, "would delete it", "--data chest_xray/chest_xray")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # the suggested command works and leaves the data in place
    ok = run_script("download_dataset.py", "--source", "chest_xray", "--data",
                    "chest_xray/chest_xray", cwd=tmp_path)
    assert "Unreadable files: 0" in ok.stdout


def test_download_default_check_finds_a_truncated_jpeg(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    good = Image.open(DATA / "fullres" / "IM-0421-0001.jpeg")
    good.save(src / "train" / "NORMAL" / "whole.jpeg", quality=90)
    data = (src / "train" / "NORMAL" / "whole.jpeg").read_bytes()
    (src / "train" / "NORMAL" / "cut.jpeg").write_bytes(data[: len(data) * 2 // 3])
    proc = run_script("download_dataset.py", "--source", src, "--data", tmp_path / "d")
    assert "Unreadable files: 1" in proc.stdout
    (line,) = [s for s in proc.stdout.splitlines() if "cut.jpeg" in s]
    assert "truncated" in line


# --- silently wrong answers --------------------------------------------------------


def test_a_model_that_cannot_answer_is_refused(model_path, tmp_path):
    """NaN or infinite weights or a zero temperature used to print 'NORMAL (nan%)' and
    exit 0."""
    payload = torch.load(model_path, weights_only=True)
    state = dict(payload["state_dict"])
    state["classifier.1.bias"] = torch.full_like(state["classifier.1.bias"], float("nan"))
    nan_model = tmp_path / "nan.pth"
    checkpoints.save_checkpoint(nan_model, state, payload["meta"])
    state["classifier.1.bias"] = torch.tensor([0.0, float("inf")])
    inf_model = tmp_path / "inf.pth"
    checkpoints.save_checkpoint(inf_model, state, payload["meta"])
    zero_t = recalibrated(model_path, tmp_path, "zero_t.pth", temperature=0.0, threshold=0.5)
    for bad, words, script, extra in (
            (nan_model, "NaN or infinity", "predict.py", ["--image", XRAY, "--out", tmp_path / "o"]),
            (zero_t, "temperature 0", "visualize_results.py", ["--split", TINY / "test"])):
        proc = run_script(script, "--model", bad, *extra, check=False)
        one_line_error(proc, bad.name, words)
        assert "nan%" not in proc.stdout
    for bad, words in ((nan_model, "NaN or infinity"), (inf_model, "NaN or infinity"),
                       (zero_t, "temperature 0")):
        with pytest.raises(checkpoints.CheckpointError, match=words):
            checkpoints.load_checkpoint(bad)


def test_images_with_nothing_to_judge_are_refused(model_path, tmp_path):
    """A blank film, noise or a photograph used to get a confident PNEUMONIA. Besides the
    flat ones, a faint film (a smooth ramp of 10 grey levels, spread 2.6) is blank, and
    coarse noise (32 x 32 random cells, whose neighbouring pixels correlate but whose
    neighbouring cells do not) is noise."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.zeros((300, 240), np.uint8)).save(folder / "black.png")
    Image.fromarray(np.full((300, 240), 255, np.uint8)).save(folder / "white.jpeg")
    ramp = np.repeat(np.linspace(100, 109, 300).round().astype(np.uint8)[:, None], 240, 1)
    Image.fromarray(ramp).save(folder / "faint.png")
    cells = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(np.kron(cells, np.ones((10, 10), np.uint8))).save(folder / "coarse.png")
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "rgbnoise.png")
    Image.fromarray(load_sample_images().images[0]).save(folder / "photo.jpeg")
    shutil.copy(XRAY, folder / "xray.jpeg")
    proc = run_script("predict.py", "--model", model_path, "--dir", folder, "--quiet",
                      "--out", tmp_path / "o")
    rows = {Path(r["file"]).name: r for r in rows_of(tmp_path / "o")}
    expected = {"black.png": "blank image", "white.jpeg": "blank image",
                "faint.png": "blank image", "noise.png": "looks like noise",
                "coarse.png": "looks like noise", "rgbnoise.png": "colour picture",
                "photo.jpeg": "colour picture"}
    for name, words in expected.items():
        assert rows[name]["prediction"] == "" and words in rows[name]["error"], rows[name]
    assert rows["xray.jpeg"]["prediction"] in network.CLASS_NAMES
    assert "Predicted 1 image(s)" in proc.stdout and "Skipped 7 file(s)" in proc.stdout


def test_no_dataset_image_is_refused_by_the_structure_checks():
    """The blank/noise/colour checks refuse none of the test data's real films."""
    for f in scan.list_images(TINY) + scan.list_images(DATA / "fullres"):
        for size in (64, 224):
            array, reason = dataset.try_load_image_array(f, size)
            assert array is not None, (f.name, size, reason)


def test_a_new_run_never_writes_into_an_old_folder(model_path, tmp_path):
    """--out is a parent: every run, even two started in the same second, gets its own
    new folder, and every row names the model that made it."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--model",
                               str(model_path), "--image", str(XRAY), "--quiet", "--out",
                               str(tmp_path / "o")],
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    run_script("predict.py", "--model", model_path, "--image", XRAY, "--out", tmp_path / "o")
    folders = sorted((tmp_path / "o").iterdir())
    assert len(folders) == 3
    for f in folders:
        (row,) = rows_of(f)
        assert row["model"] == json.loads((f / "run.json").read_text())["model_id"]


def test_resume_refuses_another_model_or_calibration(model_path, tmp_path):
    run_script("predict.py", "--model", model_path, "--dir", TINY / "test", "--quiet",
               "--out", tmp_path / "o")
    out = run_folder(tmp_path / "o")
    other = recalibrated(model_path, tmp_path, threshold=0.3, temperature=2.0,
                         referral=referral_record([0.1, 0.5, 0.9], [0, 1, 1], 0.3, 0.7))
    proc = run_script("predict.py", "--model", other, "--dir", TINY / "test", "--resume",
                      out, check=False)
    one_line_error(proc, "differ from the run")
    same = run_script("predict.py", "--model", model_path, "--dir", TINY / "test",
                      "--resume", out)
    assert "Resuming: 16 of 16 files already done" in same.stdout
    assert len({r["model"] for r in rows_of(out)}) == 1


def test_gradcam_explains_the_reported_class(model_path, tmp_path, monkeypatch):
    """The map must be of the reported class even where the raw argmax is the other
    one. The threshold is set from this model's own probabilities of the test NORMAL
    films, so that some of them are reported against their argmax whatever training
    gave: below them all where some are under 0.5 (reported PNEUMONIA, argmax NORMAL),
    else above them all (reported NORMAL, argmax PNEUMONIA)."""
    import predict

    films = scan.list_images(TINY / "test" / "NORMAL")
    p = scaled_probability(logits_of(model_path, films), 1.0)
    threshold = p.min() / 2 if (p < 0.5).any() else (p.max() + 1) / 2
    low = recalibrated(model_path, tmp_path, threshold=float(threshold), temperature=1.0)
    explained = []

    class Recording(predict.GradCAM):
        def __call__(self, x, class_idx=None):
            explained.append(class_idx)
            return super().__call__(x, class_idx)

    monkeypatch.setattr(predict, "GradCAM", Recording)
    predict.main(["--model", str(low), "--dir", str(TINY / "test" / "NORMAL"), "--gradcam",
                  "--quiet", "--workers", "0", "--out", str(tmp_path / "o")])
    rows = rows_of(tmp_path / "o")
    model, meta = checkpoints.load_checkpoint(low)
    x = torch.from_numpy(np.stack([dataset.load_image_array(r["file"], 64) for r in rows]))
    with torch.no_grad():
        argmax = model(network.model_input(x.unsqueeze(1))).argmax(1).tolist()
    reported = [network.CLASS_NAMES.index(r["prediction"]) for r in rows]
    assert argmax != reported  # the case that matters: argmax and report differ
    assert explained == reported
    assert len(list(run_folder(tmp_path / "o").glob("*_gradcam.png"))) == len(rows)


# --- one bad file never stops a batch -----------------------------------------------


def test_any_decoder_exception_skips_only_that_file(model_path, tmp_path, monkeypatch):
    """A decoder bug (here a RuntimeError from Pillow for one file) is one line naming
    the file, and the rest of the batch goes on: in predict.py and in visualize_results.py's
    reading (dataset.decode_all, which training reads through too)."""
    real_open = Image.open

    def flaky_open(fp, *args, **kwargs):
        if "IM-" in str(fp):
            raise RuntimeError("decoder crashed")
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(imagefiles.Image, "open", flaky_open)
    import predict
    import visualize_results

    assert predict.main(["--model", str(model_path), "--dir", str(TINY / "test"), "--quiet",
                         "--workers", "0", "--out", str(tmp_path / "p")]) == 0
    rows = rows_of(tmp_path / "p")
    crashed = [r for r in rows if "decoder crashed" in r["error"]]
    assert crashed and all("IM-" in r["file"] for r in crashed)
    assert len(rows) == 16 and any(r["prediction"] for r in rows)
    files, labels, others, _ = evalfiles.labelled_files(str(TINY / "test"), "chest_xray", [model_path])
    paths, y, images, skipped = visualize_results.read_images(files, labels, others, 64)
    assert len(paths) + len(skipped) == 16 and len(skipped) == len(crashed)
    array, reason = dataset.try_load_image_array(sorted((TINY / "test" / "NORMAL").glob("IM-*"))[0])
    assert array is None and "RuntimeError: decoder crashed" in reason


def test_training_skips_and_names_unreadable_files(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TINY, data)
    good = (data / "train" / "PNEUMONIA" / "person23_bacteria_101.jpeg").read_bytes()
    (data / "train" / "PNEUMONIA" / "person999_bacteria_1.jpeg").write_bytes(good[:300])
    proc = run_script("train_cxray.py", "--data", data, "--image-size", 64, "--out",
                      tmp_path / "runs", "--cache-dir", "", "--batch-size", 8, "--epochs", 1)
    assert "person999_bacteria_1.jpeg: corrupt or truncated" in proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "person999_bacteria_1.jpeg" in (run_dir / "skipped_files.txt").read_text()
    assert "person999_bacteria_1.jpeg" not in (run_dir / "val_split.csv").read_text()
    assert (run_dir / "mobilenet_cxr.pth").exists()


def dicom_with(tmp_path, name, **tags):
    """A valid 64 x 64 8-bit DICOM whose header then gets the given tags."""
    pytest.importorskip("pydicom")
    from pydicom.uid import ExplicitVRLittleEndian
    from test_inputs import grey_dicom

    arr = np.asarray(Image.open(XRAY).convert("L"))
    return grey_dicom(tmp_path / name, ExplicitVRLittleEndian, arr.tobytes(), *arr.shape,
                      **tags)


def test_dicom_header_is_checked_before_decoding(tmp_path):
    """A header that claims gigapixels, odd samples, or a zero window is refused before
    pydicom touches the pixels (the data here is only 64 x 64)."""
    cases = {
        "huge.dcm": ({"NumberOfFrames": 20000}, "too large"),
        "samples.dcm": ({"SamplesPerPixel": 4}, "4 samples per pixel"),
        "window.dcm": ({"WindowCenter": 100, "WindowWidth": 0}, "window width 0"),
        "tiny.dcm": ({"Rows": 8}, "too small"),
    }
    for name, (tags, words) in cases.items():
        path = dicom_with(tmp_path, name)
        import pydicom

        ds = pydicom.dcmread(path)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(path)
        with pytest.raises(imagefiles.ImageReadError, match=words):
            imagefiles.read_image_gray(path)
    assert imagefiles.read_image_gray(dicom_with(tmp_path, "fine.dcm")).size == (64, 64)


def test_dir_reads_dicoms_without_extension_gif_webp_and_lists_the_rest(model_path, tmp_path):
    folder = tmp_path / "pacs"
    folder.mkdir()
    dicom_with(tmp_path, "x.dcm").rename(folder / "1.2.840.99")  # a PACS export name
    Image.open(XRAY).convert("L").save(folder / "film.gif")
    Image.open(XRAY).convert("L").save(folder / "film.webp", lossless=True)
    (folder / "notes.txt").write_text("not an image")
    proc = run_script("predict.py", "--model", model_path, "--dir", folder, "--quiet",
                      "--out", tmp_path / "o")
    rows = {Path(r["file"]).name: r for r in rows_of(tmp_path / "o")}
    for name in ("1.2.840.99", "film.gif", "film.webp"):
        assert rows[name]["prediction"] in network.CLASS_NAMES, name
    assert "not an image or DICOM file (extension .txt)" in rows["notes.txt"]["error"]
    assert "Predicted 3 image(s)" in proc.stdout and "Skipped 1 file(s)" in proc.stdout


def children_of(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process tree")
def test_decoder_workers_die_with_a_killed_predict(model_path, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        shutil.copy(DATA / "fullres" / "person20_bacteria_69.jpeg", folder / f"x{i}.jpeg")
    proc = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--model",
                             str(model_path), "--dir", str(folder), "--workers", "2",
                             "--batch-size", "4", "--quiet", "--out", str(tmp_path / "o")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(children_of(proc.pid)) < 2:
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    workers = children_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.time()
    while [w for w in workers if alive(w)]:
        assert time.time() - t0 < 10, "a decoder worker outlived its killed parent"
        time.sleep(0.1)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- resume: consistent outputs after any kill, keyed by resolved path ----------------


def test_resume_repairs_any_cut_and_keys_by_resolved_path(model_path, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["a\fb.jpeg", "c\u2028d.jpeg", "e,\"f\".jpeg", "plain.jpeg"]
    for n in names:
        shutil.copy(XRAY, folder / n)
    run_script("predict.py", "--model", model_path, "--dir", "odd", "--json", "--quiet",
               "--out", tmp_path / "o", cwd=tmp_path)
    out = run_folder(tmp_path / "o")
    whole = {r["resolved_path"]: r for r in rows_of(out)}
    assert len(whole) == 4
    csv_path, jsonl = out / "predictions.csv", out / "predictions.jsonl"

    def resume(where):  # by absolute path this time: the same files, not new ones
        return run_script("predict.py", "--model", model_path, "--dir", where, "--json",
                          "--quiet", "--resume", out, cwd=ROOT)

    cases = {
        "killed before the first flush": lambda: (csv_path.write_bytes(b""),
                                                  jsonl.write_bytes(b"")),
        "a row cut in half": lambda: csv_path.write_bytes(csv_path.read_bytes()[:-25]),
        "JSONL one row short": lambda: jsonl.write_text(
            "".join(jsonl.read_text().splitlines(keepends=True)[:-1])),
    }
    for what, cut in cases.items():
        cut()
        proc = resume(folder)
        rows = rows_of(out)
        assert sorted(r["resolved_path"] for r in rows) == sorted(whole), what
        assert [r for r in rows if r["file"] == ""] == [], what
        jrows = [json.loads(x) for x in jsonl.read_text().split("\n") if x]
        assert sorted(r["resolved_path"] for r in jrows) == sorted(whole), what
        for r in rows:
            assert abs(float(r["prob_pneumonia"])
                       - float(whole[r["resolved_path"]]["prob_pneumonia"])) < 1e-6
        assert "Traceback" not in proc.stderr
    again = resume(folder)
    assert "Resuming: 4 of 4 files already done" in again.stdout
    assert "Predicted 0 image(s)" in again.stdout


# --- bad arguments and bad training data ---------------------------------------------


BAD_ARGUMENTS = [
    ("train_cxray", ["--epochs", "0"]),
    ("train_cxray", ["--batch-size", "0"]),
    ("train_cxray", ["--workers", "-1"]),
    ("train_cxray", ["--out", str(ROOT / "README.md")]),
    ("predict", ["--image", "x.png", "--batch-size", "0"]),
    ("predict", ["--image", "x.png", "--workers", "-1"]),
    ("predict", ["--image", "x.png", "--out", str(ROOT / "README.md")]),
    ("visualize_results", ["--bootstrap", "0"]),
]


@pytest.mark.parametrize("script,args", BAD_ARGUMENTS)
def test_bad_arguments_are_argparse_errors(script, args, capsys):
    """Each used to be a traceback or a silent substitute (batch size 0 became 1)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).parse_args(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err or "error: --out" in err, err


def test_a_bad_argument_is_one_line_from_the_command_line():
    proc = run_script("predict.py", "--image", "x.png", "--workers", "-1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("predict.py: error: argument --workers")


def test_training_refuses_an_empty_class_and_leaves_no_folder(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TINY, data)
    for f in (data / "train" / "NORMAL").iterdir():
        f.unlink()
    proc = run_script("train_cxray.py", *train_args(tmp_path / "runs", "--epochs", 1),
                      "--data", data, check=False)
    one_line_error(proc, "no usable NORMAL images")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_visualize_one_class_in_lowercase_folder(model_path, tmp_path):
    shutil.copytree(TINY / "test" / "NORMAL", tmp_path / "site" / "normal")
    proc = run_script("visualize_results.py", "--model", model_path, "--split",
                      tmp_path / "site", "--out", tmp_path / "v", "--bootstrap", 50)
    out = run_folder(tmp_path / "v")
    assert "only NORMAL images" in proc.stdout
    assert "ROC AUC: not defined with one class" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["at_threshold"]["sensitivity"] is None
    assert 0 <= metrics["at_threshold"]["specificity"] <= 1
    assert (out / "prediction_confidence.png").exists()
    assert not (out / "roc_curve.png").exists()


def test_training_resume_on_a_damaged_state_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last_state.pth").write_bytes(b"PK\x03\x04 this is not a state file")
    proc = run_script("train_cxray.py", "--resume", run, check=False)
    one_line_error(proc, "damaged")
    assert sorted(p.name for p in run.iterdir()) == ["last_state.pth"]


def test_resumed_run_keeps_the_command_that_made_it(tmp_path):
    args = train_args(tmp_path / "cut", "--epochs", 2, "--seed", 5)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cxray.py"), *map(str, args)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while not list((tmp_path / "cut").glob("*/last_state.pth")):
        assert proc.poll() is None and time.time() - t0 < 240
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = (tmp_path / "cut").iterdir()
    run_script("train_cxray.py", "--resume", run_dir)
    meta = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)["meta"]
    assert "--seed 5" in meta["command"] and "--resume" not in meta["command"]
    assert len(meta["resumed_with"]) == 1 and "--resume" in meta["resumed_with"][0]
    text = next(run_dir.glob("training_results_*.txt")).read_text()
    assert "Resumed with: " in text
