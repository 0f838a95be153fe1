#!/usr/bin/env python3
"""Validation-only comparison of runs: the evidence for recipe decisions (never test).

    python benchmarks/validation_check.py runs/<reference run> runs/<improved run>

For each run folder, rebuilds its patient-grouped validation split from val_split.csv
and reports, on the plain validation images and on the same images under simulated
acquisition shift (train_cxray.stress_transform, 3 copies, fixed seed): ROC AUC, NLL,
ECE and accuracy / sensitivity / specificity at 0.5 and at the stored calibration.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cxr_common as cc  # noqa: E402
import train_cxray as tc  # noqa: E402
from visualize_results import binary_metrics, expected_calibration_error  # noqa: E402


def report(name, probs, y, thr):
    m5, mt = binary_metrics(y, probs, 0.5), binary_metrics(y, probs, thr)
    pred = (probs >= thr).astype(int)
    conf = np.where(pred == 1, probs, 1 - probs)
    ece, _ = expected_calibration_error(pred == y, conf)
    eps = 1e-7
    nll = -np.mean(np.where(y == 1, np.log(probs + eps), np.log(1 - probs + eps)))
    print(f"  {name:<28} AUC {m5['auc']:.4f}  NLL {nll:.4f}  ECE {ece:.4f}  "
          f"acc/sens/spec @0.5 {m5['accuracy']:.3f}/{m5['sensitivity']:.3f}/"
          f"{m5['specificity']:.3f}  @{thr:.3f} {mt['accuracy']:.3f}/"
          f"{mt['sensitivity']:.3f}/{mt['specificity']:.3f}")


def main():
    for run in map(Path, sys.argv[1:]):
        rows = [r for r in csv.DictReader(open(run / "val_split.csv")) if r["split"] == "val"]
        model, meta = cc.load_checkpoint(run / "mobilenet_cxr.pth")
        size, intensity = meta["preprocessing"]["image_size"], cc.intensity_of(meta)
        x = np.stack([cc.load_image_array(r["file"], size) for r in rows])
        y = np.array([cc.CLASS_NAMES.index(r["label"]) for r in rows])
        xs, ys = tc.stressed_copies(x, y, tc.STRESS_COPIES, meta["seed"])
        cal = cc.calibration(meta)
        print(f"{run.name} (recipe {meta['recipe']}, seed {meta['seed']}, temperature "
              f"{cal['temperature']:.3f}, threshold {cal['threshold']:.4f})")
        for label, images, labels in (("validation", x, y), ("shifted validation", xs, ys)):
            logits = tc.predict_logits(model, images, torch.device("cpu"), intensity=intensity)
            raw = logits.softmax(1)[:, 1].numpy()
            scaled = (logits / cal["temperature"]).softmax(1)[:, 1].numpy()
            report(f"{label}, T=1", raw, labels, cal["threshold"])
            report(f"{label}, stored T", scaled, labels, cal["threshold"])


if __name__ == "__main__":
    main()
