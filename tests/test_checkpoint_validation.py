"""Every field read from a checkpoint or from an ensemble file is checked when it is
loaded: a bad one is refused in one line naming the file and the field, before any
size, cut or type from the file is used.

Bad checkpoints are the shipped reference checkpoint with one field edited, saved with
torch.save. The in-process tests cover every field; the script tests run predict.py as
a user does, under a memory limit and a timeout, so that a regression that trusts a size
from the file fails the test instead of exhausting the machine."""

import copy
import os
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, script_env

from cxr import calib, checkpoints, network, runtime

REAL = ROOT / "models" / "reference_seed1.pth"  # real weights and typicality statistics
IMAGES = [sorted((TINY / "test" / c).iterdir())[0] for c in network.CLASS_NAMES]
MEMORY_LIMIT = 6 * 2**30  # address space for a script: torch alone maps about 3.5 GB
NAN = float("nan")
MISSING = calib.MISSING
HUGE = 2**31  # bytes of a checkpoint file (sparse: no disk used)


@pytest.fixture(scope="module")
def real():
    return torch.load(REAL, map_location="cpu", weights_only=True)


def saved(payload, tmp_path, edit, name="bad.pth"):
    """A copy of payload changed by edit(payload), written with torch.save."""
    p = copy.deepcopy(payload)
    edit(p)
    path = tmp_path / name
    torch.save(p, path)
    return path


def put(path, value):
    """An edit that sets payload[a][b]... = value for path "a.b...", creating dicts."""
    *parents, last = path.split(".")

    def edit(p):
        for key in parents:
            p = p.setdefault(key, {})
        p[last] = value
    return edit


def drop(path):
    *parents, last = path.split(".")

    def edit(p):
        for key in parents:
            p = p[key]
        del p[last]
    return edit


def put_weight(key, value):
    def edit(p):
        p["state_dict"][key] = value
    return edit


def drop_weight(key):
    def edit(p):
        del p["state_dict"][key]
    return edit


def put_stat(key, make):
    """An edit that replaces a typicality statistic by make(the stored one)."""
    def edit(p):
        p["typicality"][key] = make(p["typicality"][key])
    return edit


RULE = {"rule": "SGR (Geifman & El-Yaniv 2017)", "target_risk": 0.04, "delta": 0.1, "films": 500,
        "coverage_fitted": 0.6, "min_confidence": 0.8, "answered": 300, "errors": 4, "bound": 0.035}


def rule(**fields):
    """A valid referral rule (fit_referral's record) with these fields changed; a field
    given as MISSING is left out."""
    return {k: v for k, v in {**RULE, **fields}.items() if v is not MISSING}


def calibration(**fields):
    return put("meta.calibration", {"temperature": 1.0, "threshold": 0.5, "referral": RULE, **fields})


# (id, edit, words the one-line refusal must hold)
BAD_CHECKPOINTS = [
    # trusted sizes: the process was killed at 30000 px, 3000 px took 2.7 GB for one image
    ("image_size-30000", put("meta.preprocessing.image_size", 30000), "image_size 30000"),
    ("image_size-3000", put("meta.preprocessing.image_size", 3000), "image_size 3000"),
    ("image_size-0", put("meta.preprocessing.image_size", 0), "image_size 0"),
    ("image_size-bool", put("meta.preprocessing.image_size", True), "image_size True"),
    ("image_size-float", put("meta.preprocessing.image_size", 224.0), "image_size 224"),
    ("image_size-text", put("meta.preprocessing.image_size", "224"), "image_size '224'"),
    ("image_size-missing", drop("meta.preprocessing.image_size"), "image_size missing"),
    # the typicality cut: NaN turned the flag off, 0 flagged everything
    ("cut-nan", put("typicality.cut", NAN), "typicality.cut nan"),
    ("cut-zero", put("typicality.cut", 0.0), "typicality.cut 0"),
    ("cut-negative", put("typicality.cut", -3.0), "typicality.cut -3"),
    ("cut-inf", put("typicality.cut", float("inf")), "typicality.cut inf"),
    ("cut-text", put("typicality.cut", "13"), "typicality.cut '13'"),
    ("cut-missing", drop("typicality.cut"), "typicality.cut missing"),
    ("level-above-1", put("typicality.level", 99.0), "typicality.level 99"),
    # structure
    ("no-meta", drop("meta"), "meta missing"),
    ("meta-list", put("meta", [1, 2]), "meta [1, 2]"),
    ("meta-tensor", put("meta.preprocessing.mean", torch.zeros(3)), "plain data"),
    ("classes", put("meta.class_names", ["A", "B"]), "class_names"),
    ("no-preprocessing", drop("meta.preprocessing"), "meta.preprocessing missing"),
    ("preprocessing-text", put("meta.preprocessing", "224"), "meta.preprocessing '224'"),
    ("intensity-unknown", put("meta.preprocessing.intensity", "sharpen"), "intensity 'sharpen'"),
    ("calibration-text", put("meta.calibration", "T=1"), "meta.calibration 'T=1'"),
    ("temperature-zero", calibration(temperature=0.0), "temperature 0"),
    ("temperature-negative", calibration(temperature=-1.0), "temperature -1"),
    ("temperature-nan", calibration(temperature=NAN), "temperature nan"),
    ("temperature-bool", calibration(temperature=True), "temperature True"),
    ("temperature-huge-int", calibration(temperature=10**400), "temperature 1000"),
    ("threshold-above-1", calibration(threshold=1.5), "threshold 1.5"),
    ("threshold-negative", calibration(threshold=-0.1), "threshold -0.1"),
    ("threshold-nan", calibration(threshold=NAN), "threshold nan"),
    ("threshold-text", calibration(threshold="0.5"), "threshold '0.5'"),
    ("referral-text", calibration(referral="ab"), "meta.calibration.referral 'ab'"),
    ("referral-list", calibration(referral=[0.8]), "meta.calibration.referral [0.8]"),
    ("min_confidence-nan", calibration(referral=rule(min_confidence=NAN)),
     "meta.calibration.referral.min_confidence nan"),
    ("min_confidence-negative", calibration(referral=rule(min_confidence=-0.1)),
     "meta.calibration.referral.min_confidence -0.1"),
    ("min_confidence-above-2", calibration(referral=rule(min_confidence=3.0)),
     "meta.calibration.referral.min_confidence 3"),
    ("min_confidence-text", calibration(referral=rule(min_confidence="0.8")),
     "meta.calibration.referral.min_confidence '0.8'"),
    ("min_confidence-missing", calibration(referral=rule(min_confidence=MISSING)),
     "meta.calibration.referral.min_confidence missing"),
    ("target_risk-zero", calibration(referral=rule(target_risk=0.0)),
     "meta.calibration.referral.target_risk 0"),
    ("target_risk-above-1", calibration(referral=rule(target_risk=4.0)),
     "meta.calibration.referral.target_risk 4"),
    ("delta-bool", calibration(referral=rule(delta=True)), "meta.calibration.referral.delta True"),
    ("films-negative", calibration(referral=rule(films=-5)), "meta.calibration.referral.films -5"),
    ("answered-text", calibration(referral=rule(answered="all")),
     "meta.calibration.referral.answered 'all'"),
    ("films-fraction", calibration(referral=rule(films=3.5)), "meta.calibration.referral.films 3.5"),
    ("answered-above-films", calibration(referral=rule(answered=10**6)),
     "meta.calibration.referral.answered 1000000 (must be at most referral.films)"),
    ("bound-above-1", calibration(referral=rule(bound=1.5)), "meta.calibration.referral.bound 1.5"),
    ("bound-missing", calibration(referral=rule(bound=MISSING)), "meta.calibration.referral.bound missing"),
    # fields read back by experiments/ (upgrade_checkpoint.py, ...)
    ("seed-text", put("meta.seed", "one"), "meta.seed 'one'"),
    ("recipe-number", put("meta.recipe", 5), "meta.recipe 5"),
    ("recipe_fields-list", put("meta.recipe_fields", [1]), "meta.recipe_fields [1]"),
    ("metrics-list", put("meta.metrics", [0.9]), "meta.metrics [0.9]"),
    ("val_fraction-2", put("meta.val_fraction", 2), "meta.val_fraction 2"),
    ("calib_fraction-nan", put("meta.calib_fraction", NAN), "meta.calib_fraction nan"),
    # weights
    ("no-state_dict", drop("state_dict"), "state_dict missing"),
    ("state_dict-list", put("state_dict", [1]), "state_dict [1]"),
    ("weight-int", put_weight("classifier.1.bias", 5), "state_dict['classifier.1.bias'] 5"),
    ("weight-shape", put_weight("classifier.1.weight", torch.zeros(3, 1280)),
     "state_dict['classifier.1.weight'] is a torch.float32 tensor of shape (3, 1280)"),
    ("weight-dtype", put_weight("classifier.1.bias", torch.zeros(2, dtype=torch.complex64)),
     "state_dict['classifier.1.bias'] is a torch.complex64"),
    ("weight-nan", put_weight("classifier.1.bias", torch.full((2,), NAN)), "NaN or infinity"),
    ("weight-extra", put_weight("extra.weight", torch.zeros(1)), "1 unexpected, first: 'extra"),
    ("weight-missing", drop_weight("classifier.1.bias"), "1 missing"),
    # typicality statistics: types, shapes against the model's 1280 features and each other
    ("typicality-text", put("typicality", "typical"), "typicality 'typical'"),
    ("components-shape", put_stat("components", lambda v: v[:, :1000]),
     "typicality.components is a torch.float32 tensor of shape (64, 1000)"),
    ("pca_mean-shape", put_stat("pca_mean", lambda v: v[:1000]), "typicality.pca_mean"),
    ("precision-shape", put_stat("precision", lambda v: v[:63, :63]), "typicality.precision"),
    ("class_means-rows", put_stat("class_means", lambda v: v.repeat(2, 1)),
     "typicality.class_means"),
    ("reference_z-shape", put_stat("reference_z", lambda v: v[:, :32]), "typicality.reference_z"),
    ("reference_labels-length", put_stat("reference_labels", lambda v: v[:-1]),
     "typicality.reference_labels"),
    ("reference_labels-value", put_stat("reference_labels", lambda v: v + 7),
     "typicality.reference_labels"),
    ("precision-nan", put_stat("precision", lambda v: v * NAN), "must be finite"),
    ("train_scores-list", put_stat("train_scores", lambda v: v.tolist()[:3]),
     "typicality.train_scores"),
    ("val_scores-missing", drop("typicality.val_scores"), "typicality.val_scores missing"),
    ("reference_z-expanded", put_stat("reference_z", lambda v: v[:1].expand(10**9, -1)),
     "typicality.reference_z"),
]


def test_the_shipped_checkpoints_load_unchanged():
    """The shipped checkpoints pass the checks, with the values they store."""
    for path in (REAL, ROOT / "models" / "mobilenet_cxr.pth"):
        payload = torch.load(path, weights_only=True)
        model, meta = checkpoints.load_checkpoint(path)
        assert meta == payload["meta"]
        assert model.typicality["cut"] == payload["typicality"]["cut"]
        assert checkpoints.calibration_of(meta).temperatures == ((
            payload["meta"].get("calibration") or {}).get("temperature", 1.0),)
        assert payload["format"] == checkpoints.CHECKPOINT_FORMAT
        members, cal, size = checkpoints.load_model(path)  # the one loader of predict/visualize
        assert [m for _, m in members] == [meta] and size == meta["preprocessing"]["image_size"]
        assert cal.fitted == bool(meta.get("calibration"))


def refusal(path, load=checkpoints.load_checkpoint, **kwargs) -> str:
    with pytest.raises(checkpoints.CheckpointError) as e:
        load(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(runtime.display_name(path)), message
    return message


@pytest.mark.parametrize("edit, words", [c[1:] for c in BAD_CHECKPOINTS],
                         ids=[c[0] for c in BAD_CHECKPOINTS])
def test_a_bad_field_is_refused_naming_it(real, tmp_path, edit, words):
    assert words in refusal(saved(real, tmp_path, edit))


def test_a_checkpoint_that_is_no_regular_file_or_too_big_is_refused(real, tmp_path):
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.pth"
    with open(huge, "wb") as f:
        f.truncate(HUGE)
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    assert "not a regular file" in refusal(folder)
    assert "not a regular file" in refusal(fifo)
    assert "more than the" in refusal(huge)
    assert "not a loadable checkpoint" in refusal(text)
    with pytest.raises(checkpoints.CheckpointError, match="model file not found"):
        checkpoints.load_checkpoint(tmp_path / "absent.pth")


def zip_bomb(real, tmp_path):
    """The real checkpoint plus a 300 MB tensor, compressed to a few hundred kB
    (torch.load inflates compressed entries)."""
    padding = torch.zeros(300 * 2**20, dtype=torch.uint8)
    plain = saved(real, tmp_path, put("padding", padding), "plain.pth")
    del padding
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            with zin.open(item) as src, zout.open(item.filename, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 2**20)
    plain.unlink()
    assert bomb.stat().st_size < 20 * 2**20
    return bomb


# --- an ensemble file (experiments/build_ensemble.py, visualize_results.py --save-calibrated) --


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory):
    """The payload of an ensemble file of REAL twice, with a shared calibration."""
    members = [checkpoints.load_checkpoint(REAL) for _ in range(2)]
    own = checkpoints.calibration_of(members[0][1])
    cal = calib.Calibration(own.temperatures * 2, 0.4, rule(min_confidence=0.7), 1.5, True, True)
    path = tmp_path_factory.mktemp("ens") / "ensemble.pth"
    checkpoints.save_ensemble(path, members, cal, {"built_from": []})
    return torch.load(path, weights_only=True)


def test_a_valid_ensemble_file_is_used(ensemble_file, tmp_path):
    members, cal, size = checkpoints.load_model(saved(ensemble_file, tmp_path, lambda p: None))
    assert len(members) == 2 and size == members[0][1]["preprocessing"]["image_size"]
    assert cal.to_dict() == ensemble_file["calibration"]
    assert cal.ensemble_temperature == 1.5 and cal.threshold == 0.4
    assert cal.referral == rule(min_confidence=0.7) and cal.shared is True
    assert cal.referred([0.35, 0.25, 0.8, 0.65]).tolist() == [True, False, False, True]
    assert members[1][0].typicality["cut"] == ensemble_file["members"][1]["typicality"]["cut"]


def test_an_ensemble_file_without_a_referral_rule_says_null(ensemble_file, tmp_path):
    """An ensemble's calibration must name its referral rule; null is none (nothing
    referred), not a refusal."""
    _, cal, _ = checkpoints.load_model(saved(ensemble_file, tmp_path, put("calibration.referral", None)))
    assert cal.referral is None and not cal.refers and cal.shared is True
    assert not cal.referred([0.35, 0.5, 0.99]).any()


def test_a_calibration_fitted_before_the_referral_rule_loads_without_one(real, tmp_path):
    """A checkpoint whose calibration has the old uncertain band and no referral rule is
    used (its temperature and threshold), with no rule: it refers nothing and says how to
    fit one."""
    path = saved(real, tmp_path, put("meta.calibration", {
        "temperature": 1.5, "threshold": 0.3, "uncertain_band": [0.2, 0.6]}))
    cal = checkpoints.calibration_of(checkpoints.load_checkpoint(path)[1])
    assert (cal.temperatures, cal.threshold, cal.fitted) == ((1.5,), 0.3, True)
    assert cal.referral is None and not cal.refers and not cal.referred([0.25, 0.35, 0.5]).any()
    assert "no referral rule" in cal.describe() and "--calibrate-for MODEL" in cal.caveat()


def member(i, edit):
    """An edit of member i of an ensemble file, as edit does a checkpoint's."""
    def apply(p):
        edit(p["members"][i])
    return apply


BAD_ENSEMBLE_FILES = [
    ("content-list", lambda p: p.clear() or p.update(format=[1]), "not a cxr-mobilenetv2/1 checkpoint"),
    ("members-text", put("members", "abc"), "members 'abc'"),
    ("members-one", lambda p: p["members"].pop(), "members a list of 1 (must be a list of 2 to"),
    ("member-list", lambda p: p["members"].__setitem__(1, [1]), "members[1]: member [1]"),
    ("member-weight-nan", member(1, put_weight("classifier.1.bias", torch.full((2,), NAN))),
     "members[1]: 1 weight tensor(s) hold NaN"),
    ("member-image_size", member(1, put("meta.preprocessing.image_size", 30000)),
     "members[1]: meta.preprocessing.image_size 30000"),
    ("member-cut-nan", member(0, put("typicality.cut", NAN)), "members[0]: typicality.cut nan"),
    ("member-calibration", member(1, calibration(threshold=2.0)),
     "members[1]: meta.calibration.threshold 2"),
    ("member-other-size", member(1, put("meta.preprocessing.image_size", 64)),
     "ensemble members use different image sizes"),
    ("calibration-missing", drop("calibration"), "calibration missing"),
    ("temperatures-bool", put("calibration.temperatures", [True, True]),
     "calibration.temperatures [True, True]"),
    ("temperatures-count", put("calibration.temperatures", [1.0]), "temperatures [1.0]"),
    ("temperatures-not-the-members", put("calibration.temperatures", [2.0, 2.0]),
     "temperatures [2.0, 2.0] (must be the members' own stored temperatures)"),
    ("ensemble_temperature-nan", put("calibration.ensemble_temperature", NAN), "ensemble_temperature nan"),
    ("threshold-missing", put("calibration.threshold", None), "threshold None"),
    ("referral-text", put("calibration.referral", "ab"), "calibration.referral 'ab'"),
    ("referral-missing", drop("calibration.referral"), "calibration.referral missing"),
    ("min_confidence-nan", put("calibration.referral.min_confidence", NAN),
     "calibration.referral.min_confidence nan"),
    ("shared-text", put("calibration.shared", "yes"), "calibration.shared 'yes'"),
    ("calibration-tensor", put("calibration.fitted_on", torch.zeros(3)),
     "calibration holds something other than plain data"),
]


@pytest.mark.parametrize("edit, words", [c[1:] for c in BAD_ENSEMBLE_FILES],
                         ids=[c[0] for c in BAD_ENSEMBLE_FILES])
def test_a_bad_ensemble_file_is_refused_naming_the_field(ensemble_file, tmp_path, edit, words):
    assert words in refusal(saved(ensemble_file, tmp_path, edit), checkpoints.load_model)


# --- the scripts, as a user runs them -----------------------------------------------------


def run_predict(*args, timeout=300):
    """predict.py on two real images with a bounded address space and a timeout."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    images = [a for image in IMAGES for a in ("--image", image)]
    cmd = [sys.executable, str(ROOT / "predict.py"), *images, "--device", "cpu", "--quiet",
           *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=script_env({"CUDA_VISIBLE_DEVICES": ""}),
                          preexec_fn=limit)


def refused_in_one_line(proc, path, *words):
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"error: {runtime.display_name(path)}"), line
    for w in words:
        assert w in line, line


WORDS = {case: words for case, _, words in BAD_CHECKPOINTS}
SCRIPT_CASES = [  # the hostile trial's cases, end to end
    ("image_size-30000", put("meta.preprocessing.image_size", 30000), WORDS["image_size-30000"]),
    ("cut-nan", put("typicality.cut", NAN), WORDS["cut-nan"]),
    ("meta-list", put("meta", [1, 2]), WORDS["meta-list"]),
    ("meta-tensor", put("meta.preprocessing.mean", torch.zeros(3)), WORDS["meta-tensor"]),
    ("min_confidence-nan", calibration(referral=rule(min_confidence=NAN)), WORDS["min_confidence-nan"]),
    ("weight-expanded", put_weight("classifier.1.bias", torch.zeros(1).expand(10**12)),
     "state_dict['classifier.1.bias'] is a torch.float32 tensor of shape (1000000000000,)"),
]


@pytest.mark.parametrize("edit, words", [c[1:] for c in SCRIPT_CASES],
                         ids=[c[0] for c in SCRIPT_CASES])
def test_predict_refuses_a_bad_checkpoint_in_one_line(real, tmp_path, edit, words):
    path = saved(real, tmp_path, edit)
    proc = run_predict("--model", path, "--out", tmp_path / "out")
    refused_in_one_line(proc, path, words)
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_zip_bomb_checkpoint(real, tmp_path):
    bomb = zip_bomb(real, tmp_path)
    refused_in_one_line(run_predict("--model", bomb, "--out", tmp_path / "out"), bomb,
                        "unpacks to")


@pytest.mark.parametrize("make, words", [
    ("member-tampered", "members[1]: meta.preprocessing.image_size 30000"),
    (Path("/dev/zero"), "not a regular file"),
    (os.mkfifo, "not a regular file"),
], ids=["member-tampered", "dev-zero", "fifo"])
def test_predict_refuses_a_bad_ensemble_file_in_one_line(ensemble_file, tmp_path, make, words):
    """A model file that would read /dev/zero without end or wait forever on a FIFO, or
    an ensemble file with one member's field tampered with, is refused in one line."""
    if isinstance(make, Path):
        path = make
    elif make == "member-tampered":
        path = saved(ensemble_file, tmp_path, member(1, put("meta.preprocessing.image_size", 30000)))
    else:
        path = tmp_path / "fifo.pth"
        make(path)
    proc = run_predict("--model", path, "--out", tmp_path / "out", timeout=120)
    refused_in_one_line(proc, path, words)
