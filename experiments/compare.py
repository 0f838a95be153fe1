#!/usr/bin/env python3
"""Paired comparison of two evaluations of the same images, with patient-bootstrap
intervals on the difference.

    python visualize_results.py --model models/reference_seed1.pth --out outputs/ref
    python visualize_results.py --out outputs/imp
    python experiments/compare.py outputs/ref/eval_<ts> outputs/imp/eval_<ts>

Reads each folder's predictions.csv (every image's label, decision at its model's stored
threshold, and P(PNEUMONIA)), keeps the images both scored, and resamples patients (all
of a patient's images together) 2000 times; both models are scored on the same resample,
so the interval is on the difference B - A, not two separate intervals. One seed per
side: the spread over training seeds is a separate figure (experiments/accuracy.py).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import dataset, network, scoring  # noqa: E402


def read(folder: Path) -> dict:
    rows = csv.DictReader(open(folder / "predictions.csv", newline="", encoding="utf-8"))
    return {r["file"]: (network.CLASS_NAMES.index(r["label"]), network.CLASS_NAMES.index(r["prediction"]),
                        float(r["prob_pneumonia"])) for r in rows}


def scores(y, pred, p) -> dict:
    m = scoring.binary_metrics(y, (pred + 0.5) / 2, 0.5)  # the stored decisions
    m["auc"] = scoring.binary_metrics(y, p, 0.5)["auc"]
    m["ece"] = scoring.expected_calibration_error(pred == y, np.where(pred == 1, p, 1 - p))[0]
    return {k: m[k] for k in ("accuracy", "sensitivity", "specificity", "auc", "ece")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="evaluation folder A (visualize_results.py output)")
    p.add_argument("b", type=Path, help="evaluation folder B")
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args()
    a, b = read(args.a), read(args.b)
    files = sorted(set(a) & set(b))
    if not files or any(a[f][0] != b[f][0] for f in files):
        raise SystemExit("error: the two folders share no images, or disagree on a label")
    y = np.array([a[f][0] for f in files])
    pa, pb = (np.array([d[f][1] for f in files]) for d in (a, b))
    qa, qb = (np.array([d[f][2] for f in files]) for d in (a, b))
    groups = [dataset.patient_id(f) for f in files]
    sa, sb = scores(y, pa, qa), scores(y, pb, qb)
    diffs = {k: [] for k in sa}
    for idx in scoring.resample_indices(len(y), args.resamples, 0, groups):
        ra, rb = scores(y[idx], pa[idx], qa[idx]), scores(y[idx], pb[idx], qb[idx])
        for k in diffs:
            if np.isfinite(ra[k]) and np.isfinite(rb[k]):
                diffs[k].append(rb[k] - ra[k])
    print(f"{len(files)} images, {len(set(groups))} patients; A = {args.a}, B = {args.b}")
    print(f"{'metric':<12} {'A':>8} {'B':>8} {'B - A':>8}  95% interval (patient bootstrap, paired)")
    for k in sa:
        lo, hi = np.percentile(diffs[k], [2.5, 97.5])
        print(f"{k:<12} {sa[k]:8.4f} {sb[k]:8.4f} {sb[k] - sa[k]:+8.4f}  [{lo:+.4f}, {hi:+.4f}]")


if __name__ == "__main__":
    main()
