#!/usr/bin/env python3
"""Which check tells a chest film from a picture that is not one, chosen on the model's
own films (train + validation + calibration, rebuilt from its seed) and the generated
non-radiographs only; then measured on test and the samples (experiments/LOG.md).

    python experiments/site_shift.py --data DATA --model models/mobilenet_cxr.pth --save-ratios outputs/ratios
    python experiments/radiograph_checks.py --data DATA --load-ratios outputs/ratios

Candidate statistics of the 224 px grey image the model sees (higher = more like a
chest film): symmetry (correlation of the 32 x 32 block means with their left-right
mirror), spread (entropy in bits of the grey-level histogram in 32 bins), coarseness
(share of the grey-level variance the 32 x 32 block means keep). Each one's floor lies
below every film of the model's own splits; the rule (choose) picks the design.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import checkpoints, dataset, network, runtime, scan  # noqa: E402

sys.path.insert(0, str(ROOT / "experiments"))
from site_shift import SAMPLES, non_radiographs, refused  # noqa: E402

NAMES = ("symmetry", "spread", "coarseness")


def blocks_of(a: np.ndarray, grid: int = 32) -> np.ndarray:
    k = max(1, min(a.shape) // grid)
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k).mean((1, 3))


def candidate_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    out = {n: [] for n in NAMES}
    for im in images:
        a = im.astype(np.float64)
        b = blocks_of(a)
        m = b[:, ::-1]
        sym = np.corrcoef(b.ravel(), m.ravel())[0, 1] if b.std() > 0 else 0.0
        out["symmetry"].append(0.0 if not np.isfinite(sym) else sym)
        hist = np.bincount(im.ravel() // 8, minlength=32) / im.size
        hist = hist[hist > 0]
        out["spread"].append(float(-(hist * np.log2(hist)).sum()))
        out["coarseness"].append(float(b.var() / a.var()) if a.var() > 0 else 0.0)
    return {n: np.array(v) for n, v in out.items()}


def floor_of(values: np.ndarray) -> float:
    """Below every film: min - 10% of (median - min), rounded down to two decimals."""
    lo, med = float(values.min()), float(np.median(values))
    return float(np.floor((lo - 0.1 * (med - lo)) * 100) / 100)


def choose(t_stats, n_stats, n_refused, n_ratio, v_stats, v_ratio):
    """The pre-registered rule (experiments/LOG.md): design A (new structure checks, no
    silence from typicality) if one or two candidates stop >= 99% of the non-radiographs
    with the present checks; else design B (no verdict when atypical AND a candidate
    below its 1% quantile of the model's films), if it stops >= 99% of them with at most
    2% of validation; else C (no change)."""
    floors = {n: floor_of(t_stats[n]) for n in NAMES}
    print("floors (below every film of the model's own splits): "
          + ", ".join(f"{n} {f:g} (min {t_stats[n].min():.3f}, median {np.median(t_stats[n]):.3f})"
                      for n, f in floors.items()))
    for size in (1, 2):
        best = None
        for combo in itertools.combinations(NAMES, size):
            stop = n_refused.copy()
            for n in combo:
                stop |= n_stats[n] < floors[n]
            print(f"  A {'+'.join(combo):<24} non-radiographs stopped {stop.mean():.1%}")
            if stop.mean() >= 0.99 and (best is None or stop.mean() > best[1]):
                best = (combo, stop.mean())
        if best:
            return "A", {n: floors[n] for n in best[0]}
    quant = {n: float(np.quantile(t_stats[n], 0.01)) for n in NAMES}
    best = None
    for n in NAMES:
        stop = n_refused | ((n_ratio > 1) & (n_stats[n] < quant[n]))
        v = np.mean((v_ratio > 1) & (v_stats[n] < quant[n]))
        print(f"  B {n:<24} 1% quantile {quant[n]:.4f}: non-radiographs stopped {stop.mean():.1%}, "
              f"validation {v:.2%}")
        if stop.mean() >= 0.99 and v <= 0.02 and (best is None or stop.mean() > best[1]):
            best = (n, stop.mean())
    if best:
        return "B", {best[0]: quant[best[0]]}
    return "C", {}


def share(flags) -> str:
    return f"{np.mean(flags):6.1%} of {len(flags):>4}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mobilenet_cxr.pth")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--load-ratios", type=Path, required=True, metavar="NPZ")
    p.add_argument("--choose-only", action="store_true", help="stop before test and the samples")
    args = p.parse_args()
    runtime.pick_device("cpu")
    _, meta = checkpoints.load_checkpoint(args.model)
    with np.load(f"{args.load_ratios}.{args.model.stem}.npz") as z:
        ratios = dict(z)
    splits = dataset.checkpoint_splits(meta, args.data)[0]
    t_images = np.concatenate([splits[s][0] for s in splits])
    print(f"model's own films: {len(t_images)} ({', '.join(f'{s} {len(splits[s][0])}' for s in splits)})")
    t_stats = candidate_stats(t_images)
    v_stats = candidate_stats(splits["val"][0])
    kinds = non_radiographs(network.IMAGE_SIZE)
    n_images = np.concatenate(list(kinds.values()))
    n_kind = np.concatenate([[k] * len(v) for k, v in kinds.items()])
    n_refused = np.concatenate([refused(v) for v in kinds.values()])
    n_ratio = np.concatenate([ratios[f"non-radiograph:{k}"] for k in kinds])
    n_stats = candidate_stats(n_images)
    design, checks = choose(t_stats, n_stats, n_refused, n_ratio, v_stats, ratios["validation"])
    print(f"design {design}, checks {checks}")
    if args.choose_only or design == "C":
        return

    def stopped(stats, ratio, refused_=None):
        weak = np.zeros(len(ratio), bool)
        for n, f in checks.items():
            weak |= stats[n] < f
        stop = weak if design == "A" else weak & (ratio > 1)
        return stop if refused_ is None else stop | refused_

    size = meta["preprocessing"]["image_size"]
    _, _, (tp, tl), _ = dataset.checkpoint_splits(meta, args.data)
    x_test, kept, _ = dataset.decode_all(tp, size, ".cache", "test")
    y = np.array(tl)[kept]
    test_stats = candidate_stats(x_test)
    sets = {"validation": (v_stats, ratios["validation"]),
            "test NORMAL": ({n: v[y == 0] for n, v in test_stats.items()}, ratios["test NORMAL"]),
            "test PNEUMONIA": ({n: v[y == 1] for n, v in test_stats.items()}, ratios["test PNEUMONIA"])}
    for sub in ("fullres", "dicom"):
        files = scan.scan_folder(SAMPLES / sub)[0] if (SAMPLES / sub).is_dir() else []
        arrays = [a for a, _ in (dataset.try_load_image_array(f, size) for f in files) if a is not None]
        if arrays:
            sets[f"samples/{sub}"] = (candidate_stats(np.stack(arrays)), ratios[f"samples/{sub}"])
    print(f"  {'images':<26} {'atypical (ratio > 1)':>20} | stopped (design {design})")
    for name, (stats, r) in sets.items():
        print(f"    {name:<24} {share(r > 1):>20} | {share(stopped(stats, r))}")
    n_stop = stopped(n_stats, n_ratio, n_refused)
    for k in kinds:
        print(f"    {k:<24} {share(n_ratio[n_kind == k] > 1):>20} | {share(n_stop[n_kind == k])}")
    print(f"    {'all non-radiographs':<24} {share(n_ratio > 1):>20} | {share(n_stop)}")
    t_stop = stopped(test_stats, ratios["test:ratio"])
    correct = (ratios["test:label"] == 0) & (ratios["test:decision"] == 0)
    confident = correct & ratios["test:confident"]
    print(f"  test: {correct.sum()} correct NORMAL calls ({confident.sum()} confident): atypical "
          f"{(correct & (ratios['test:ratio'] > 1)).sum()}, silenced {(correct & t_stop).sum()} "
          f"({(confident & t_stop).sum()} confident); test films refused by the new check "
          f"{int(sum((test_stats[n] < f).sum() for n, f in checks.items()))}")
    val = stopped(v_stats, ratios["validation"]).mean()
    met = (correct & t_stop).sum() == 0 and n_stop.mean() >= 0.99 and val <= 0.02
    print(f"  acceptance: correct NORMAL calls silenced {(correct & t_stop).sum()} (0) | "
          f"non-radiographs stopped {n_stop.mean():.1%} (>= 99%) | validation stopped {val:.1%} "
          f"(<= 2%): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
