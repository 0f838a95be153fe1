"""Shared fixtures: the scripts are run as a user runs them, on real (downscaled) images."""

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
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


# A script run starts a new process. By default it is forked from this test process,
# which has imported torch already (the import costs ~4 s of CPU per process, most of the
# suite's time): the child sets its argv, working folder, standard streams and signal
# handlers as a new interpreter would, runs the file as __main__ and exits with its status.
# CXR_TEST_SUBPROCESS=1 starts every script with a fresh interpreter instead; so does any
# call that changes the environment (variables read at import time would not apply).
FORK = hasattr(os, "fork") and os.environ.get("CXR_TEST_SUBPROCESS") != "1"


def run_script(script, *args, cwd=None, check=True, timeout=300, env=None):
    """Run a top-level script in a new process; returns the CompletedProcess."""
    argv = [sys.executable, str(ROOT / script), *map(str, args)]
    if FORK and not env:
        proc = run_forked(argv, cwd or ROOT, timeout)
    else:
        proc = subprocess.run(argv, cwd=cwd or ROOT, capture_output=True, text=True,
                              timeout=timeout, env=script_env(env), errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


def run_forked(argv, cwd, timeout):
    """`python script args` in a child forked from this process (see FORK)."""
    import tempfile
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            os._exit(_child_main(argv, cwd, out.fileno(), err.fileno()))
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.02)
        code = os.waitstatus_to_exitcode(status)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess(argv, code, *texts)


def _child_main(argv, cwd, out_fd, err_fd) -> int:
    import atexit
    import faulthandler
    import io
    import locale
    import runpy
    import signal
    import traceback

    code = 1
    try:
        faulthandler.disable()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        encoding = locale.getpreferredencoding(False)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding,
                                      write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                      errors="backslashreplace", write_through=True)
        sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGPIPE, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
        atexit._clear()  # this test process's handlers are not the script's
        os.chdir(cwd)
        sys.argv = argv[1:]
        sys.path.insert(0, str(Path(argv[1]).parent))
        try:
            runpy.run_path(argv[1], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return code


def run_folder(parent) -> Path:
    """The one new folder a script made under --out parent (they never reuse one)."""
    (child,) = [p for p in Path(parent).iterdir() if p.is_dir()]
    return child


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


@pytest.fixture(scope="session")
def ablation_run(tmp_path_factory):
    """A 1-epoch run of the improved recipe minus equalisation: a calibrating recipe (it
    holds out a calibration split) that never reads test."""
    out = tmp_path_factory.mktemp("ablation")
    proc = run_script("train_cxray.py", *train_args(out, "--epochs", 1, "--recipe",
                                                    "improved", "--ablate", "equalize"))
    (run_dir,) = list(out.iterdir())
    return run_dir, proc


SELECTION_SEED = 6


@pytest.fixture(scope="session")
def selection_run(tmp_path_factory):
    """A second 3-epoch reference run, another seed: a second, different model."""
    out = tmp_path_factory.mktemp("selection")
    proc = run_script("train_cxray.py",
                      *train_args(out, "--epochs", 3, "--seed", SELECTION_SEED))
    (run_dir,) = list(out.iterdir())
    return run_dir, proc


# ---------------------------------------------------------------------------------
# Checkpoints with a non-trivial calibration. With temperature 1 and threshold 0.5 many
# wrong formulas (logits * T, argmax, ...) agree with the right one; these do not.
# They are built from the two shipped models, not from a model trained here: a training
# run's exact weights differ between CPUs, inference of fixed weights only in the last
# bits, which the cuts' margins absorb.
# ---------------------------------------------------------------------------------

SHIPPED = ROOT / "models" / "mobilenet_cxr.pth"  # the improved recipe (equalisation)
SHIPPED_REFERENCE = ROOT / "models" / "reference_seed1.pth"


def tiny_test_files():
    from cxr import scan

    return scan.list_images(TINY / "test")


def logits_of(checkpoint, files):
    """Logits of the model in `checkpoint` for `files`, computed here, in-process, from
    the documented preprocessing (load_image_array, model_input): the reference the
    scripts' outputs are checked against."""
    import numpy as np
    import torch

    from cxr import checkpoints, dataset, network

    model, meta = checkpoints.load_checkpoint(checkpoint)
    size = meta["preprocessing"]["image_size"]
    gray = torch.from_numpy(np.stack([dataset.load_image_array(f, size) for f in files]))
    with torch.no_grad():
        return model(network.model_input(gray.unsqueeze(1), network.intensity_of(meta))).double()


def scaled_probability(logits, temperature):
    """softmax(logits / T)[:, 1] as a numpy float64 array."""
    return (logits / temperature).softmax(1)[:, 1].numpy()


def cuts_between(probs, margin=2e-4, near=0.04):
    """Thresholds that fall between the given probabilities, farthest from 0.5 first:
    midpoints of two neighbouring probabilities at most `near` apart (both images land
    within near/2 of it), with at least three probabilities below and two above. No
    probability lies within `margin` of one, so decisions do not hinge on the last bits
    of a float."""
    import numpy as np

    q = np.sort(np.asarray(probs, dtype=float))
    mids = [float((q[k - 1] + q[k]) / 2) for k in range(3, len(q) - 2)
            if margin * 2 < q[k] - q[k - 1] <= near]
    assert mids, f"no two neighbouring probabilities close enough: {q}"
    return sorted(mids, key=lambda t: -abs(t - 0.5))


def confidence_cuts(probs, threshold, margin=2e-4):
    """The confidence cuts c that put neither c nor 1 - c within `margin` of any
    probability and the threshold inside (1 - c, c), lowest first: the midpoints between
    neighbouring values of {p} and {1 - p} above max(threshold, 1 - threshold). A film
    whose confidence of the call is below c has 1 - c < p < c, whichever side of the
    threshold it lies, so which films such a cut refers does not hinge on float rounding."""
    import numpy as np

    p = np.asarray(probs, dtype=float)
    floor = max(threshold, 1 - threshold) + margin
    v = np.unique(np.r_[p, 1 - p, floor])
    v = v[v >= floor]
    return [float((a + b) / 2) for a, b in zip(v[:-1], v[1:]) if b - a > 2 * margin]


def referred_at(probs, threshold, min_confidence):
    """Which films a rule with this cut refers: the confidence of the call at the
    threshold (p if p >= threshold, else 1 - p) is below min_confidence."""
    import numpy as np

    p = np.asarray(probs, dtype=float)
    return np.where(p >= threshold, p, 1 - p) < min_confidence


def referral_record(probs, labels, threshold, min_confidence):
    """A full referral record (fit_referral's fields) with this cut, its counts those of
    these films."""
    import numpy as np

    from cxr import selective

    p, y = np.asarray(probs, dtype=float), np.asarray(labels)
    answered = ~referred_at(p, threshold, min_confidence)
    errors = int(((p >= threshold).astype(int) != y)[answered].sum())
    n, m = int(answered.sum()), len(p)
    steps = max(1, int(np.ceil(np.log2(m))))
    return {"rule": "SGR (Geifman & El-Yaniv 2017)", "target_risk": selective.REFERRAL_RISK,
            "delta": selective.REFERRAL_DELTA, "films": m, "coverage_fitted": n / m,
            "min_confidence": float(min_confidence), "answered": n, "errors": errors,
            "bound": selective.risk_bound(errors, n, selective.REFERRAL_DELTA / steps)}


def labels_of(files):
    import numpy as np

    return np.array([0 if f.parent.name == "NORMAL" else 1 for f in files])


def with_calibration(src, dst, temperature, threshold, referral):
    """A copy of checkpoint src with the given calibration in its metadata (and no
    record of an earlier recalibration). referral: the referral record, or a dict of
    other calibration fields to store instead (e.g. {"uncertain_band": [lo, hi]})."""
    import torch

    from cxr import checkpoints

    payload = torch.load(src, weights_only=True)
    meta = {k: v for k, v in payload["meta"].items() if k != "recalibrated"}
    stored = referral if "min_confidence" not in referral else {"referral": referral}
    meta["calibration"] = {"temperature": temperature, "threshold": threshold, **stored}
    checkpoints.save_checkpoint(dst, payload["state_dict"], meta)
    return dst


@dataclass
class Calibrated:
    """A checkpoint and what predicting TINY/test with it must give, computed here."""

    path: Path
    files: list  # TINY/test images, in scan.list_images order
    prob: object  # expected P(PNEUMONIA) per file (numpy float64)
    threshold: float
    min_confidence: float  # the stored referral rule's cut

    def referred(self):
        """Per file, whether the stored referral rule refers it."""
        return referred_at(self.prob, self.threshold, self.min_confidence)

    def expected(self, name):
        """(prediction, referred by the rule) for the file with this base name."""
        i = [f.name for f in self.files].index(name)
        p = self.prob[i]
        return "PNEUMONIA" if p >= self.threshold else "NORMAL", bool(self.referred()[i])


def cuts_for(probs, far_from_half=0.0):
    """(threshold, lenient cut, cut): the first threshold of cuts_between() at least
    far_from_half from 0.5 with two confidence cuts of confidence_cuts() next to each
    other, the higher referring at least 3 films and at most n - 3 (as near a quarter of
    them as there is), the lower fewer."""
    import numpy as np

    n = len(probs)
    for threshold in cuts_between(probs):
        if abs(threshold - 0.5) <= far_from_half:
            continue
        cuts = confidence_cuts(probs, threshold)
        counts = [int(referred_at(probs, threshold, c).sum()) for c in cuts]
        ok = [k for k in range(1, len(cuts)) if 3 <= counts[k] < n - 2]
        if ok:
            k = min(ok, key=lambda k: abs(counts[k] - n / 4))
            return threshold, cuts[k - 1], cuts[k]
    raise AssertionError(f"no threshold and referral cuts fit these probabilities: {np.sort(probs)}")


CAL_TEMPERATURE = 2.5  # far from 1: logits * T and logits / T differ a lot
SECOND_TEMPERATURE = 4.0


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory):
    """The shipped model with temperature 2.5, a threshold far from 0.5 that falls
    between two test images' probabilities (both within 0.02 of it), and a referral rule
    whose cut refers some of the films and answers the others."""
    files = tiny_test_files()
    prob = scaled_probability(logits_of(SHIPPED, files), CAL_TEMPERATURE)
    threshold, _, c = cuts_for(prob, far_from_half=0.1)
    # the premise of the tests: argmax (0.5) and the stored threshold disagree on some
    # images; the rule refers some images and answers others, among them films called
    # NORMAL (which P(PNEUMONIA) < cut, instead of the call's confidence, would refer)
    assert ((prob >= 0.5) != (prob >= threshold)).sum() >= 2
    referred = referred_at(prob, threshold, c)
    assert 2 <= referred.sum() < len(prob) - 2
    assert ((prob < threshold) & ~referred).any() and ((prob >= threshold) & ~referred).any()
    path = with_calibration(SHIPPED, tmp_path_factory.mktemp("cal") / "calibrated.pth",
                            CAL_TEMPERATURE, threshold,
                            referral_record(prob, labels_of(files), threshold, c))
    return Calibrated(path, files, prob, threshold, c)


@pytest.fixture(scope="session")
def ensemble(calibrated, tmp_path_factory):
    """Two different checkpoints (different weights, preprocessing, temperatures,
    thresholds): the calibrated model and the shipped reference model at temperature 4.
    The members' thresholds are the ensemble's threshold (which falls between the
    ensemble's probabilities) shifted by -d and +d, so their mean is the ensemble's on
    any machine; their rules' cuts are the ensemble's cut (the second member's, the
    strictest) and a lower one (the first member's) that refers fewer of the ensemble's
    films, each member's threshold inside its own (1 - cut, cut). Returns (the member
    files, the expected figures with path: the ensemble file experiments/build_ensemble.py
    built of them)."""
    files = calibrated.files
    second = SHIPPED_REFERENCE
    t2 = SECOND_TEMPERATURE
    p2 = scaled_probability(logits_of(second, files), t2)
    prob = (calibrated.prob + p2) / 2
    threshold, lenient, strict = cuts_for(prob)
    d = min(0.05, (lenient - max(threshold, 1 - threshold)) / 2)
    assert d > 0, (threshold, lenient)  # the members' thresholds differ
    y = labels_of(files)
    folder = tmp_path_factory.mktemp("ens")
    members = [with_calibration(src, folder / name, t, threshold + s * d,
                                referral_record(prob, y, threshold, c))
               for src, name, t, s, c in (
                   (calibrated.path, "first.pth", CAL_TEMPERATURE, -1, lenient),
                   (second, "second.pth", t2, 1, strict))]
    # premise: the first member alone gives clearly different probabilities, and its
    # rule alone would refer fewer films
    assert (abs(prob - calibrated.prob) > 0.01).sum() >= 4
    assert (referred_at(prob, threshold, lenient) != referred_at(prob, threshold, strict)).any()
    built = folder / "ensemble.pth"
    run_script("experiments/build_ensemble.py", "--model", members[0], "--model", members[1],
               "--out", built)
    return members, Calibrated(built, files, prob, threshold, strict)
