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


# torchrun starts train_cxray.py through this wrapper, which changes nothing in the run
# but saves every process's parameters each time train_cxray.evaluate is handed the
# model (once per epoch, on every rank): the test can then compare the replicas.
DDP_WRAPPER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train_cxray

real_evaluate, calls = train_cxray.evaluate, [0]


def evaluate(model, *args, **kwargs):
    calls[0] += 1
    params = {{k: v.detach().cpu().clone() for k, v in model.named_parameters()}}
    torch.save(params, os.path.join({dump!r}, f"rank{{os.environ['RANK']}}_call{{calls[0]}}.pt"))
    return real_evaluate(model, *args, **kwargs)


train_cxray.evaluate = evaluate
sys.argv[0] = train_cxray.__file__  # the command recorded in the checkpoint
sys.exit(train_cxray.main())
"""
DDP_EPOCHS = 2


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process gloo run (seed 3, 2 epochs, global batch 8), shared by the tests."""
    tmp = tmp_path_factory.mktemp("ddp")
    dump = tmp / "params"
    dump.mkdir()
    wrapper = tmp / "ddp_wrapper.py"
    wrapper.write_text(DDP_WRAPPER.format(root=str(ROOT), dump=str(dump)))
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(wrapper), *map(str, train_args(out, "--epochs", DDP_EPOCHS, "--seed", 3))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    return proc, run_dir, dump


@pytest.mark.slow
def test_torchrun_two_gloo_processes(ddp_run):
    proc, run_dir, _ = ddp_run
    assert proc.stdout.count("Epoch 2/2\n") == 1  # rank 0 alone logs
    assert "x 2 process(es)" in proc.stdout
    ckpt = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)
    assert ckpt["meta"]["processes"] == 2
    assert ckpt["meta"]["command"].startswith("torchrun --nproc_per_node 2")
    assert 0 <= ckpt["meta"]["metrics"]["test_acc"] <= 1


@pytest.mark.slow
def test_ddp_processes_share_gradients(ddp_run):
    """Guards against training without the DDP wrapper (each process would fit its own
    half of the data): after every epoch both processes hold the same parameters, and
    the parameters did change from epoch to epoch.

    Not checked: that DDP matches a one-process run of the same seed and global batch.
    The processes draw other batches (DistributedSampler) and BatchNorm statistics are
    per process (4 images, not 8), so the two runs differ by more than any tolerance
    that 6 validation images could resolve."""
    _, _, dump = ddp_run
    for call in range(1, DDP_EPOCHS + 1):
        a = torch.load(dump / f"rank0_call{call}.pt", weights_only=True)
        b = torch.load(dump / f"rank1_call{call}.pt", weights_only=True)
        assert a.keys() == b.keys() and len(a) > 100
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7), (call, k)
    first = torch.load(dump / "rank0_call1.pt", weights_only=True)
    last = torch.load(dump / f"rank0_call{DDP_EPOCHS}.pt", weights_only=True)
    assert any(not torch.equal(first[k], last[k]) for k in first)


REPLICA_LINE = "DDP: weights identical on all 2 processes"


@pytest.mark.slow
@pytest.mark.xfail(reason="needs the replica check in train_cxray.py", strict=False)
def test_ddp_run_reports_identical_replicas(ddp_run):
    """train_cxray.py checks, at the end of a DDP run, that every process holds the same
    weights (an all-gathered checksum) and says so on rank 0."""
    proc, _, _ = ddp_run
    assert proc.stdout.count(REPLICA_LINE) == 1, proc.stdout[-2000:]
