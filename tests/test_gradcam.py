"""Grad-CAM: a finite map in [0, 1] that depends on the class and on the weights."""


import numpy as np
import pytest
import torch
from conftest import TINY

from cxr import checkpoints, dataset, network
from gradcam import GradCAM, overlay


def xray(size=64):
    f = sorted((TINY / "test" / "PNEUMONIA").iterdir())[0]
    g = dataset.load_image_array(f, size)
    return g, network.normalize_batch(torch.from_numpy(g)[None, None])


def test_gradcam_is_finite_in_range_and_depends_on_the_model(model_path):
    model, _ = checkpoints.load_checkpoint(model_path)
    gray, x = xray()
    heat, cls, probs = GradCAM(model)(x)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert heat.max() == pytest.approx(1.0) and heat.std() > 0.05
    assert cls == int(np.argmax(probs)) and probs.sum() == pytest.approx(1, abs=1e-5)
    other, _, _ = GradCAM(model)(x, class_idx=1 - cls)
    assert np.abs(other - heat).mean() > 0.05  # the chosen class matters
    torch.manual_seed(0)
    random_model, _ = network.build_model(pretrained=False)
    rand, _, _ = GradCAM(random_model.eval())(x, class_idx=cls)
    assert np.isfinite(rand).all()
    assert np.abs(rand - heat).mean() > 0.05  # the weights matter (sanity check)
    rgb = overlay(gray, heat)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(1)[0], torch.from_numpy(probs), atol=1e-5)
