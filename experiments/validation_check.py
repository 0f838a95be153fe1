#!/usr/bin/env python3
"""Validation-only comparison of runs: the evidence for recipe decisions (never test).

    python experiments/validation_check.py runs/<reference run> runs/<improved run> ...
    python experiments/validation_check.py --markdown runs/*seed1     # table rows

For each run folder, rebuilds its patient-grouped validation split from val_split.csv
and scores the run's checkpoint (at its stored temperature and threshold) on three
versions of those validation images:

1. validation: the images as they are (as easy as train: AUC ~0.997 for every run);
2. shifted validation: 3 copies under cxr.calib.stress_transform (crop, rotation,
   brightness/contrast, blur, gamma), the data the improved recipe's temperature and
   threshold were fitted on, so it flatters that recipe;
3. held-out shifts: one copy per acquisition change that neither the training
   augmentation nor the calibration stress contains (sensor noise, low resolution,
   heavy JPEG, zoom-out with a black border, off-centre, edge enhancement). The mean
   over these families is the fairer proxy for a new hospital's data; it is still a
   simulation, not the test split, which no decision here reads.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import calib, checkpoints, dataset, network, scoring  # noqa: E402


def noise(x, rng):
    return np.clip(x + rng.normal(0, 12, x.shape), 0, 255)


def low_resolution(x, rng):
    t = torch.from_numpy(x)[None]
    small = v2.functional.resize(t, [x.shape[0] // 3, x.shape[1] // 3], antialias=True)
    return v2.functional.resize(small, list(x.shape), antialias=True)[0].numpy()


def jpeg(x, rng):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=15)
    return np.asarray(Image.open(buf).convert("L"))


def zoom_out(x, rng):
    h, w = x.shape
    small = np.asarray(Image.fromarray(x).resize((int(w * 0.8), int(h * 0.8)),
                                                Image.Resampling.BILINEAR))
    out = np.zeros_like(x)
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


def off_centre(x, rng):
    """Shifted by 12% of the side in a random diagonal direction, black fill."""
    dy, dx = (rng.choice([-1, 1], 2) * 0.12 * np.array(x.shape)).astype(int)
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    return v2.functional.affine(t, angle=0.0, translate=[int(dx), int(dy)], scale=1.0,
                                shear=[0.0, 0.0])[0].numpy()


def edge_enhance(x, rng):
    return np.asarray(Image.fromarray(x).filter(ImageFilter.UnsharpMask(4, 150, 2)))


HELD_OUT_SHIFTS = {
    "noise": noise, "low-res": low_resolution, "jpeg-q15": jpeg, "zoom-out": zoom_out,
    "off-centre": off_centre, "edge-enhance": edge_enhance,
}


def held_out_copies(images: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([HELD_OUT_SHIFTS[name](im, rng) for im in images]).astype(np.uint8)


def scores(probs, y, thr) -> dict:
    m = scoring.binary_metrics(y, probs, thr)
    pred, conf = scoring.decide(probs, thr)
    m["ece"], _ = scoring.expected_calibration_error(pred == y, conf)
    m["nll"] = scoring.log_loss(y, probs)
    return m


def line(name, m):
    return (f"  {name:<22} AUC {m['auc']:.4f}  NLL {m['nll']:.3f}  ECE {m['ece']:.3f}  "
            f"acc {m['accuracy']:.3f}  sens {m['sensitivity']:.3f}  spec {m['specificity']:.3f}")


def kept_epoch_loss(run: Path, meta: dict) -> float:
    """The validation loss the run logged for the epoch its checkpoint kept (training's
    loss at T = 1, the measure the improved recipe selects its epoch on)."""
    (history_file,) = run.glob("training_history_*.json")
    history = json.loads(history_file.read_text())["history"]
    (kept,) = [h for h in history if h["epoch"] == meta["metrics"]["best_epoch"]]
    return float(kept["val_loss"])


def check(run: Path) -> dict:
    with open(run / "val_split.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    model, meta = checkpoints.load_checkpoint(run / "mobilenet_cxr.pth")
    size, intensity = meta["preprocessing"]["image_size"], network.intensity_of(meta)
    x = np.stack([dataset.load_image_array(r["file"], size) for r in rows])
    y = np.array([network.CLASS_NAMES.index(r["label"]) for r in rows])
    cal = checkpoints.calibration_of(meta)
    name = meta["recipe"] + "".join(f" -{a}" for a in meta.get("ablate", [])) \
        + "".join(f" +{a}" for a in meta.get("add", []))
    print(f"{run.name} ({name}, seed {meta['seed']}, temperature {cal.temperature_words('.3f')}, "
          f"threshold {cal.threshold:.4f})", flush=True)

    def probs(images):
        return cal.probability([network.predict_logits(model, images, intensity)])

    out = {"run": run.name, "name": name, "seed": meta["seed"],
           "kept_val_loss": kept_epoch_loss(run, meta)}
    print(f"  kept epoch {meta['metrics']['best_epoch']}: validation loss "
          f"{out['kept_val_loss']:.4f} (training's own, at T = 1)")
    out["validation"] = scores(probs(x), y, cal.threshold)
    xs, ys = calib.stressed_copies(x, y, calib.STRESS_COPIES, meta["seed"])
    out["shifted"] = scores(probs(xs), ys, cal.threshold)
    for key in ("validation", "shifted"):
        print(line(key, out[key]))
    fams = {}
    for fam in HELD_OUT_SHIFTS:
        fams[fam] = scores(probs(held_out_copies(x, fam)), y, cal.threshold)
        print(line(f"held-out: {fam}", fams[fam]))
    out["held_out"] = {k: float(np.mean([f[k] for f in fams.values()]))
                       for k in ("auc", "nll", "ece", "accuracy", "sensitivity", "specificity")}
    out["held_out_worst_auc"] = min(f["auc"] for f in fams.values())
    print(line("held-out: mean", out["held_out"]), flush=True)
    return out


def markdown(results):
    print("\n| run | seed | kept-epoch val loss | val AUC | shifted AUC | shifted spec | "
          "held-out AUC (mean / worst) | held-out sens | held-out spec | held-out ECE | "
          "held-out NLL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        h = r["held_out"]
        print(f"| {r['name']} | {r['seed']} | {r['kept_val_loss']:.4f} | {r['validation']['auc']:.4f} | "
              f"{r['shifted']['auc']:.4f} | {r['shifted']['specificity']:.3f} | "
              f"{h['auc']:.4f} / {r['held_out_worst_auc']:.4f} | {h['sensitivity']:.3f} | "
              f"{h['specificity']:.3f} | {h['ece']:.3f} | {h['nll']:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (with val_split.csv)")
    p.add_argument("--markdown", action="store_true", help="also print a summary table")
    args = p.parse_args()
    results = [check(run) for run in args.runs]
    if args.markdown:
        markdown(results)


if __name__ == "__main__":
    main()
