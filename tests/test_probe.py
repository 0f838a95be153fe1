"""The probe recipe (--recipe probe): the classifier head alone is trained, on features of
one inference pass; the backbone leaves training with ImageNet's weights, the checkpoint
is one predict.py uses, and the test split is read once, after training, calibration and
typicality. A run on the tiny data, in this process, with the steps recorded."""

import csv

import pytest
import torch
from conftest import TINY, run_folder, run_script, train_args

import train_cxray
from cxr import calib, dataset, engine, network, siteshift


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """The probe for 3 epochs; events lists, in order, each split decoded, each image
    passed through the network while the head trains, and the steps after it."""
    out = tmp_path_factory.mktemp("probe")
    events, initial = [], {}
    mp = pytest.MonkeyPatch()

    def recorded(name, real):
        def wrapper(*args, **kwargs):
            events.append(name)
            return real(*args, **kwargs)
        return wrapper

    real_decode, real_make, real_head = dataset.decode_all, engine.make_model, engine.train_head
    real_logits = network.predict_logits

    def decode_all(paths, size, cache_dir=None, name="", *args, **kwargs):
        events.append(f"decode {name}")
        return real_decode(paths, size, cache_dir, name, *args, **kwargs)

    def make_model(*args, **kwargs):
        model, source = real_make(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, source

    def train_head(model, splits, *args, **kwargs):
        events.append("head: start")
        result = real_head(model, splits, *args, **kwargs)
        events.append("head: end")
        return result

    def predict_logits(model, images, *args, **kwargs):
        events.append(("images", len(images)))
        return real_logits(model, images, *args, **kwargs)

    def no_epoch(*args, **kwargs):
        raise AssertionError("the probe ran the epoch loop")

    mp.setattr(dataset, "decode_all", decode_all)
    mp.setattr(engine, "make_model", make_model)
    mp.setattr(engine, "train_head", train_head)
    mp.setattr(network, "predict_logits", predict_logits)
    mp.setattr(calib, "calibrate", recorded("calibrate", calib.calibrate))
    mp.setattr(siteshift, "typicality_stats", recorded("typicality", siteshift.typicality_stats))
    mp.setattr(train_cxray, "train_one_epoch", no_epoch)
    try:
        argv = train_args(out, "--recipe", "probe", "--epochs", 3, "--seed", 1)
        assert train_cxray.main([str(a) for a in argv]) == 0
    finally:
        mp.undo()
    return run_folder(out), events, initial


def test_the_probe_trains_the_head_alone(probe_run):
    run_dir, _, initial = probe_run
    payload = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)
    state, meta = payload["state_dict"], payload["meta"]
    imagenet, _ = network._imagenet_state_dict()
    head = {"classifier.1.weight", "classifier.1.bias"}
    assert state.keys() == initial.keys() and head < state.keys()
    backbone = [k for k in state if k not in head]
    assert len(backbone) > 250  # every feature layer, BatchNorm statistics included
    for k in backbone:
        assert torch.equal(state[k], imagenet[k]), f"{k} moved"
    for k in head:  # ...and the head did move
        assert not torch.equal(state[k], initial[k]), f"{k} was not trained"
    assert meta["recipe"] == "probe" and meta["recipe_fields"]["train"] == "head"
    assert meta["recipe_details"]["training"].startswith("the classifier head alone")
    assert meta["calibration"] is not None and payload["typicality"] is not None
    assert 1 <= meta["metrics"]["best_epoch"] <= 3 and "test_auc" in meta["metrics"]


def test_the_probe_computes_features_once_and_reads_test_last(probe_run):
    _, events, _ = probe_run
    start, end = events.index("head: start"), events.index("head: end")
    # training decoded its splits (never test) before the head trained
    decoded = [e for e in events[:start] if isinstance(e, str) and e.startswith("decode")]
    assert sorted(decoded) == ["decode cal", "decode train", "decode val"]
    # one inference pass over the training and validation images, then the head alone
    passed = [n for e in events[start:end] if isinstance(e, tuple) for _, n in [e]]
    split_sizes = {}
    for row in csv.DictReader(open(probe_run[0] / "val_split.csv", encoding="utf-8")):
        split_sizes[row["split"]] = split_sizes.get(row["split"], 0) + 1
    assert passed == [split_sizes["train"], split_sizes["val"]]
    # the test split: decoded once, at the end, after calibration and typicality
    assert events.count("decode test") == 1
    steps = [e for e in events if e in ("head: end", "calibrate", "typicality", "decode test")]
    assert steps == ["head: end", "calibrate", "typicality", "decode test"]
    assert not any(isinstance(e, str) and e.startswith("decode")
                   for e in events[events.index("decode test") + 1:])


def test_predict_uses_the_probe_checkpoint(probe_run, tmp_path):
    run_dir, _, _ = probe_run
    run_script("predict.py", "--model", run_dir / "mobilenet_cxr.pth", "--dir", TINY / "test",
               "--out", tmp_path, "--quiet", "--workers", 0)
    rows = list(csv.DictReader(open(run_folder(tmp_path) / "predictions.csv", encoding="utf-8")))
    assert len(rows) == len(list((TINY / "test").rglob("*.jpeg")))
    assert all(not r["error"] and 0 <= float(r["prob_pneumonia"]) <= 1 for r in rows)
    assert {r["prediction"] for r in rows} <= {*network.CLASS_NAMES, "OUTSIDE"}
