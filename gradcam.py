"""Grad-CAM for the MobileNetV2 classifier: where in the X-ray did the model look?

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last convolutional block
by the mean gradient of the class score with respect to it, sums the channels, keeps
the positive part and upsamples the 7 x 7 map to the image. It shows what drove the
score, not where the disease is: a map on the edge of the film or on a text marker is a
warning sign, not an explanation.

    from gradcam import GradCAM, overlay
    cam = GradCAM(model)                  # hooks model.features[-1]
    heat, cls, probs = cam(x)             # x: (1, 3, H, W) normalised tensor
    rgb = overlay(gray_u8, heat)          # uint8 (H, W, 3)
    save_figure(figure_path(folder, image_path), gray_u8, heat, "PNEUMONIA", 0.9, name)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cxr import network

MAX_STEM_BYTES = 200  # of a figure's file name, leaving room for _gradcam_NN.png in 255


class GradCAM:
    """Grad-CAM on a target layer (default: MobileNetV2's last conv block)."""

    def __init__(self, model: nn.Module, layer: nn.Module | None = None):
        self.model = model
        self.layer = layer if layer is not None else model.features[-1]

    def __call__(self, x: torch.Tensor, class_idx: int | None = None):
        """Returns (heatmap in [0, 1] as float32 (H, W) numpy, class used, probabilities)."""
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError("GradCAM expects one image: a (1, 3, H, W) tensor")
        store = {}

        def keep(_module, _inputs, output):
            store["act"] = output
            output.register_hook(lambda g: store.__setitem__("grad", g))

        handle = self.layer.register_forward_hook(keep)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # grads flow even with frozen weights
                logits = self.model(x)
                probs = logits.softmax(1)[0].detach().cpu().numpy()
                cls = int(logits.argmax(1)) if class_idx is None else int(class_idx)
                self.model.zero_grad(set_to_none=True)
                logits[0, cls].backward()
        finally:
            handle.remove()
            self.model.train(was_training)
        act, grad = store["act"].detach(), store["grad"].detach()
        weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
        cam = F.relu((weights * act).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        cam = cam[0, 0].float().cpu().numpy()
        top = cam.max()
        cam = cam / top if top > 0 else np.zeros_like(cam)
        return np.clip(cam, 0.0, 1.0).astype(np.float32), cls, probs


def overlay(gray_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.4,
            cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap (any size; resized) over a greyscale image: uint8 RGB."""
    if heat.shape != gray_u8.shape:
        t = torch.from_numpy(heat)[None, None]
        heat = F.interpolate(t, size=gray_u8.shape, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    from matplotlib import colormaps  # imported here: predict without --gradcam never needs it

    colored = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    base = np.repeat(gray_u8[..., None].astype(np.float32) / 255.0, 3, axis=2)
    out = (1 - alpha) * base + alpha * colored
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_figure(path_out, gray, heat, prediction, confidence, name, explained=""):
    """A PNG of the film beside its Grad-CAM overlay, titled with the class explained and
    its confidence (and `explained`, e.g. which ensemble member's map it is), captioned
    with the film's name and the disclaimer. Raises OSError when it cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"X-ray ({gray.shape[1]} px, as decoded)")
    axes[1].imshow(overlay(gray, heat))
    axes[1].set_title(f"Grad-CAM for {prediction} ({confidence * 100:.1f}%)"
                      + (f"\n{explained}" if explained else ""), fontsize=10, parse_math=False)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{name}\n{network.DISCLAIMER}", fontsize=8, parse_math=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    try:
        fig.savefig(path_out, dpi=100)
    finally:
        plt.close(fig)


def figure_path(folder: Path, image) -> Path:
    """A new file folder/<image name>_gradcam.png: unprintable characters of the name
    become _, a long name is cut to fit the file-name limit, and _2, _3, ... is added
    when two inputs come to the same name."""
    stem = "".join(c if c.isprintable() else "_" for c in Path(image).stem)
    stem = stem.encode("utf-8")[:MAX_STEM_BYTES].decode("utf-8", "ignore")
    path, n = Path(folder) / f"{stem}_gradcam.png", 1
    while path.exists():
        n += 1
        path = Path(folder) / f"{stem}_gradcam_{n}.png"
    return path
