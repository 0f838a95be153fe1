"""Shared fixtures: the scripts are run as a user runs them, on real (downscaled) images."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TINY = DATA / "cxr64"  # 64 real Kermany images, 64 x 64 px
sys.path.insert(0, str(ROOT))


def run_script(script, *args, cwd=None, check=True, timeout=300, env=None):
    """Run a top-level script in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env, errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


def train_args(out, *extra):
    return ["--data", TINY, "--image-size", 64, "--out", out, "--cache-dir", "",
            "--batch-size", 8, *extra]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 3-epoch reference-recipe run on the tiny data (ImageNet weights, 64 px)."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_script("train_cxray.py", *train_args(out, "--epochs", 3, "--seed", 0))
    (run_dir,) = list(out.iterdir())
    return run_dir, proc


@pytest.fixture(scope="session")
def model_path(trained_run):
    return trained_run[0] / "mobilenet_cxr.pth"
