"""Interrupted runs resume to the same result, for training and for prediction."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_folder, run_script, script_env, train_args


def start(script, *args):
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=script_env())


def kill_when(proc, condition, timeout=240):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_train_resume_gives_the_same_model(tmp_path):
    args = train_args(tmp_path / "full", "--epochs", 3, "--seed", 7)
    run_script("train_cxray.py", *args)
    (full,) = (tmp_path / "full").iterdir()

    proc = start("train_cxray.py", *train_args(tmp_path / "cut", "--epochs", 3, "--seed", 7))
    state = lambda: list((tmp_path / "cut").glob("*/last_state.pth"))  # noqa: E731
    kill_when(proc, lambda: (tmp_path / "cut").exists() and state())
    (cut,) = (tmp_path / "cut").iterdir()
    assert not (cut / "mobilenet_cxr.pth").exists()  # really interrupted
    proc = run_script("train_cxray.py", "--resume", cut)
    assert "Resuming after epoch" in proc.stdout

    a = torch.load(full / "mobilenet_cxr.pth", weights_only=True)
    b = torch.load(cut / "mobilenet_cxr.pth", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    ha = json.loads(next(full.glob("training_history_*.json")).read_text())["history"]
    hb = json.loads(sorted(cut.glob("training_history_*.json"))[-1].read_text())["history"]
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(ha) == strip(hb)


@pytest.mark.parametrize("option, value", [("add", ["noise"]), ("skip_test", True), ("amp", "off"),
                                           ("no_pretrained", True)])
def test_train_resume_refuses_a_state_with_an_option_the_script_does_not_have(
        option, value, tmp_path, monkeypatch):
    """A run state that holds --add, --skip-test, --amp or --no-pretrained with other than
    its default would resume as another run (another recipe, test read, other precision,
    other initial weights): refused in one line; with the defaults it resumes. The
    learning rate and validation share it recorded (no longer options) are its own."""
    import train_cxray as tc
    from cxr import runstate

    saved = {**vars(tc.parse_args(["--data", str(TINY)])), "add": [], "skip_test": False,
             "amp": "auto", "no_pretrained": False, "lr": 5e-4, "val_fraction": 0.2}
    monkeypatch.setattr(runstate, "load_state", lambda run_dir: {"args": json.dumps(saved)})
    args, _ = runstate.resume_arguments(tc.parse_args(["--resume", str(tmp_path)]))
    assert args.data == str(TINY) and args.resume == str(tmp_path)
    assert args.lr == 5e-4 and args.val_fraction == 0.2
    saved[option] = value
    with pytest.raises(SystemExit, match=f"the run used --{option.replace('_', '-')}, an option"):
        runstate.resume_arguments(tc.parse_args(["--resume", str(tmp_path)]))


def test_predict_resume_redoes_and_duplicates_nothing(model_path, tmp_path):
    src = TINY / "train"
    run_script("predict.py", "--model", model_path, "--dir", src, "--quiet", "--batch-size", 4,
               "--out", tmp_path / "whole")
    whole = list(csv.DictReader(open(run_folder(tmp_path / "whole") / "predictions.csv")))

    parent = tmp_path / "cut"
    proc = start("predict.py", "--model", model_path, "--dir", src, "--batch-size", 4,
                 "--gradcam", "--json", "--out", parent)
    csvs = lambda: list(parent.glob("*/predictions.csv"))  # noqa: E731
    rows = lambda: csvs() and len(csvs()[0].read_text().splitlines()) > 8  # noqa: E731
    kill_when(proc, rows)
    out = run_folder(parent)
    done_before = len((out / "predictions.csv").read_text().splitlines()) - 1
    assert done_before < len(whole)
    resumed = run_script("predict.py", "--model", model_path, "--dir", src, "--quiet",
                         "--batch-size", 4, "--json", "--resume", out)
    assert f"Resuming: {done_before} of {len(whole)} files already done" in resumed.stdout
    assert f"Predicted {len(whole) - done_before} image(s)" in resumed.stdout
    after = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(r["file"] for r in after) == sorted(r["file"] for r in whole)
    by_file = {r["file"]: r for r in whole}
    for r in after:
        assert abs(float(r["prob_pneumonia"]) - float(by_file[r["file"]]["prob_pneumonia"])) < 1e-5
    jsonl = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in jsonl) == sorted(r["file"] for r in whole)
