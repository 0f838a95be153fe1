"""Shared fixtures: the scripts are run as a user runs them, on real (downscaled) images."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TINY = DATA / "cxr64"  # 64 real Kermany images, 64 x 64 px
sys.path.insert(0, str(ROOT))

# Every process of the suite, this one and the scripts it starts:
# - one BLAS/OpenMP thread: on a loaded 2-core machine, building the shared test model
#   took 142 s with the default thread count and 7 s with one;
# - no network: an HTTP(S) download goes to a closed local port and fails at once
#   (torchvision's weight download is tried before the offline package), instead of
#   waiting on DNS or a firewall timeout. Set before torch is imported.
TEST_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}
os.environ.update(TEST_ENV)

# Hypothesis draws the same examples on every run, so a failure reproduces.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile("ci")

HAVE_PYDICOM = importlib.util.find_spec("pydicom") is not None
needs_pydicom = pytest.mark.skipif(not HAVE_PYDICOM,
                                   reason="needs the optional package pydicom")


def script_env(extra=None):
    """The environment for a test subprocess (see TEST_ENV)."""
    return dict(os.environ, **TEST_ENV, **(extra or {}))


def run_script(script, *args, cwd=None, check=True, timeout=300, env=None):
    """Run a top-level script in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=script_env(env), errors="replace")
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
