"""torchrun runs DDP on CPU (gloo): the processes share their gradients."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, script_env, train_args

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
def test_ddp_run_reports_identical_replicas(ddp_run):
    """train_cxray.py checks, at the end of a DDP run, that every process holds the same
    weights (an all-gathered checksum) and says so on rank 0."""
    proc, _, _ = ddp_run
    assert proc.stdout.count(REPLICA_LINE) == 1, proc.stdout[-2000:]
