#!/usr/bin/env python3
"""Which check tells a chest film from a picture that is not one, chosen on the model's
own films (train + validation + calibration, rebuilt from its seed) and the generated
non-radiographs only; then measured on test and the samples (experiments/LOG.md).

    python experiments/site_shift.py --data DATA --model models/mobilenet_cxr.pth --save-ratios outputs/ratios
    python experiments/radiograph_checks.py --data DATA --load-ratios outputs/ratios
    python experiments/radiograph_checks.py --data DATA --load-ratios R --model M --stored

The statistics (cxr.imagefiles.film_statistics, on the 224 px grey image the model
sees; higher = more like a chest film): layout, the correlation of the image's 8 x 8
block means with those of the model's average film; detail, the share of its grey-level
variance finer than a 32 x 32 grid of blocks. The rule (choose): no verdict when the
typicality ratio is above 1 AND layout or detail is below its 1% quantile over the
model's films, rounded down to two significant digits (unrounded if the rounding breaks
the check: >= 99% of the non-radiographs stopped, <= 2% of validation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import checkpoints, dataset, imagefiles, network, runtime, scan  # noqa: E402

sys.path.insert(0, str(ROOT / "experiments"))
from site_shift import SAMPLES, non_radiographs, refused  # noqa: E402

NAMES = ("layout", "detail")


def mean_layout(images: np.ndarray) -> np.ndarray:
    """The average film's 8 x 8 block means, rounded to integers."""
    return np.round(np.mean([imagefiles.block_means(im.astype(np.float64), 8) for im in images],
                            axis=0)).astype(int)


def candidate_stats(images: np.ndarray, layout) -> dict[str, np.ndarray]:
    pairs = np.array([imagefiles.film_statistics(im, layout) for im in images]).reshape(-1, 2)
    return {"layout": pairs[:, 0], "detail": pairs[:, 1]}


def floor_2_digits(x: float) -> float:
    """x rounded down to two significant digits."""
    unit = 10.0 ** (np.floor(np.log10(abs(x))) - 1)
    return float(round(np.floor(x / unit) * unit, 10))


def choose(t_stats, n_stats, n_refused, n_ratio, v_stats, v_ratio):
    """The round-2 rule of experiments/LOG.md: floors (the 1% quantiles over the model's
    films, rounded down to two digits, else unrounded) if they stop >= 99% of the
    non-radiographs with at most 2% of validation; else None (no change)."""
    quant = {n: float(np.quantile(t_stats[n], 0.01)) for n in NAMES}
    for floors in ({n: floor_2_digits(q) for n, q in quant.items()}, quant):
        n_stop = n_refused | ((n_ratio > 1) & weak(n_stats, floors))
        v_stop = (v_ratio > 1) & weak(v_stats, floors)
        print(f"  floors {floors}: non-radiographs stopped {n_stop.mean():.1%}, validation "
              f"{v_stop.mean():.2%}, model's films weak {weak(t_stats, floors).mean():.2%}")
        if n_stop.mean() >= 0.99 and v_stop.mean() <= 0.02:
            return floors
    return None


def weak(stats, floors) -> np.ndarray:
    return np.any([stats[n] < floors[n] for n in NAMES], axis=0)


def share(flags) -> str:
    return f"{np.mean(flags):6.1%} of {len(flags):>4}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mobilenet_cxr.pth")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--load-ratios", type=Path, required=True, metavar="NPZ")
    p.add_argument("--choose-only", action="store_true", help="stop before test and the samples")
    p.add_argument("--stored", action="store_true",
                   help="measure the levels stored in cxr.imagefiles instead of choosing (another model)")
    args = p.parse_args()
    runtime.pick_device("cpu")
    _, meta = checkpoints.load_checkpoint(args.model)
    with np.load(f"{args.load_ratios}.{args.model.stem}.npz") as z:
        ratios = dict(z)
    splits, _, (tp, tl), _ = dataset.checkpoint_splits(meta, args.data)  # test read after the choice
    t_images = np.concatenate([splits[s][0] for s in splits])
    print(f"model's own films: {len(t_images)} ({', '.join(f'{s} {len(splits[s][0])}' for s in splits)})")
    layout = np.array(imagefiles.FILM_LAYOUT) if args.stored else mean_layout(t_images)
    print(f"the average film's 8 x 8 layout: {layout.tolist()}")
    t_stats = candidate_stats(t_images, layout)
    v_stats = candidate_stats(splits["val"][0], layout)
    kinds = non_radiographs(network.IMAGE_SIZE)
    n_images = np.concatenate(list(kinds.values()))
    n_kind = np.concatenate([[k] * len(v) for k, v in kinds.items()])
    n_refused = np.concatenate([refused(v) for v in kinds.values()])
    n_ratio = np.concatenate([ratios[f"non-radiograph:{k}"] for k in kinds])
    n_stats = candidate_stats(n_images, layout)
    floors = ({"layout": imagefiles.MIN_LAYOUT, "detail": imagefiles.MIN_DETAIL} if args.stored
              else choose(t_stats, n_stats, n_refused, n_ratio, v_stats, ratios["validation"]))
    print(f"floors chosen: {floors}")
    stored = ({"layout": imagefiles.MIN_LAYOUT, "detail": imagefiles.MIN_DETAIL},
              np.array(imagefiles.FILM_LAYOUT).tolist())
    print("cxr.imagefiles holds " + ("the same" if stored == (floors, layout.tolist()) else
                                     f"OTHER values: {stored}"))
    if args.choose_only or floors is None:
        return

    def stopped(stats, ratio, refused_=None):
        stop = weak(stats, floors) & (ratio > 1)
        return stop if refused_ is None else stop | refused_

    size = meta["preprocessing"]["image_size"]
    x_test, kept, _ = dataset.decode_all(tp, size, ".cache", "test")
    y = np.array(tl)[kept]
    test_stats = candidate_stats(x_test, layout)
    sets = {"validation": (v_stats, ratios["validation"]),
            "test NORMAL": ({n: v[y == 0] for n, v in test_stats.items()}, ratios["test NORMAL"]),
            "test PNEUMONIA": ({n: v[y == 1] for n, v in test_stats.items()}, ratios["test PNEUMONIA"])}
    for sub in ("fullres", "dicom"):
        files = scan.scan_folder(SAMPLES / sub)[0] if (SAMPLES / sub).is_dir() else []
        arrays = [a for a, _ in (dataset.try_load_image_array(f, size) for f in files) if a is not None]
        if arrays:
            sets[f"samples/{sub}"] = (candidate_stats(np.stack(arrays), layout), ratios[f"samples/{sub}"])
    print(f"  {'images':<26} {'atypical (ratio > 1)':>20} | stopped (refused, or atypical and weak)")
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
          f"({(confident & t_stop).sum()} confident); test films weak (atypical or not) "
          f"{weak(test_stats, floors).sum()} of {len(x_test)}")
    val = stopped(v_stats, ratios["validation"]).mean()
    met = (correct & t_stop).sum() == 0 and n_stop.mean() >= 0.99 and val <= 0.02
    print(f"  acceptance: correct NORMAL calls silenced {(correct & t_stop).sum()} (0) | "
          f"non-radiographs stopped {n_stop.mean():.1%} (>= 99%) | validation stopped {val:.1%} "
          f"(<= 2%): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
