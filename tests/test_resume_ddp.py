"""Interrupted runs resume to the same result; torchrun runs DDP on CPU (gloo)."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_script, script_env, train_args


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


def test_predict_resume_redoes_and_duplicates_nothing(model_path, tmp_path):
    src = TINY / "train"
    run_script("predict.py", "--model", model_path, "--dir", src, "--quiet", "--batch-size", 4,
               "--out", tmp_path / "whole")
    whole = list(csv.DictReader(open(tmp_path / "whole" / "predictions.csv")))

    out = tmp_path / "cut"
    proc = start("predict.py", "--model", model_path, "--dir", src, "--batch-size", 4,
                 "--gradcam", "--json", "--out", out)
    rows = lambda: (out / "predictions.csv").exists() and len(  # noqa: E731
        (out / "predictions.csv").read_text().splitlines()) > 8
    kill_when(proc, rows)
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


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "train_cxray.py"), *map(str, train_args(out, "--epochs", 2, "--seed", 3))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Epoch 2/2\n") == 1  # rank 0 alone logs
    assert "x 2 process(es)" in proc.stdout
    (run_dir,) = out.iterdir()
    ckpt = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)
    assert ckpt["meta"]["processes"] == 2
    assert ckpt["meta"]["command"].startswith("torchrun --nproc_per_node 2")
    assert 0 <= ckpt["meta"]["metrics"]["test_acc"] <= 1
