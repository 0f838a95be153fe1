#!/usr/bin/env python3
"""Does an importance-weighted validation score rank models as the test split does?
(docs/site_shift.md, pre-registration 9; issue 10 part 4)

    python benchmarks/iw_validation.py MODEL.pth [MODEL.pth ...]

Validation images come from the training source; the test split is another site. If we
weight each validation image by how much it looks like the target site's images, the
validation score might predict the target score better. The weights:
  1. frozen ImageNet MobileNetV2 features (the same for every model) of all train/
     images and of the target folder's images (unlabelled);
  2. a logistic regression telling them apart (the domain classifier of
     cc.domain_auc), 5-fold out-of-fold probability p for each train/ image;
  3. weight = p / (1 - p) x n_train / n_target (the density ratio), capped at the 99th
     percentile.
Each model is then scored on its own validation split (rebuilt from its seed), plainly
and weighted, and on the test split. The check is a rank correlation over the models.

The target folder's images are used without labels: selecting with this score is a
transductive protocol, to be named as such. Test labels are used here only to check the
score, never to choose anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cxr_common as cc  # noqa: E402
import cxr_io as cio  # noqa: E402
import train_cxray as tc  # noqa: E402

CAP_PERCENTILE = 99
MIN_SPEARMAN = 0.7  # the pre-registered bar


def imagenet_features(paths, cache: Path, desc: str) -> np.ndarray:
    """Frozen ImageNet MobileNetV2 penultimate features (1280-d), cached on disk."""
    file = cache / f"imagenet_features_{desc}_{cc._cache_key(paths, cc.IMAGE_SIZE)}.npy"
    if file.exists():
        return np.load(file)
    model, _ = cc.build_model(pretrained=True)
    model.eval()
    images = cc.decode_all(paths, cc.IMAGE_SIZE, cache, desc)[0]
    feats = cc.predict_logits(model, images, "none", desc=f"features: {desc}",
                              features=True)[1].numpy()
    cio.write_atomic(file, lambda f: np.save(f, feats))
    return feats


def density_ratio(source_feats, target_feats, seed: int = 0) -> tuple[np.ndarray, float]:
    """Out-of-fold p(target | x) / p(source | x) x n_source / n_target for each source
    image (the domain classifier of cc.domain_auc), capped at the CAP_PERCENTILE-th
    percentile; with the classifier's AUC."""
    from sklearn.metrics import roc_auc_score

    p = cc.domain_probabilities(source_feats, target_feats, seed=seed)
    auc = float(roc_auc_score(np.r_[np.zeros(len(source_feats)), np.ones(len(target_feats))], p))
    p = np.clip(p[: len(source_feats)], 1e-6, 1 - 1e-6)
    w = p / (1 - p) * len(source_feats) / len(target_feats)
    return np.minimum(w, np.percentile(w, CAP_PERCENTILE)), auc


def effective_size(w) -> float:
    return float(w.sum() ** 2 / (w ** 2).sum())


def score_model(path: Path, data: Path, weight_of: dict, test, cache: Path) -> dict:
    """Plain and weighted validation metrics on the model's own split; test metrics."""
    model, meta = cc.load_checkpoint(path)
    cal = cc.calibration_of(meta)
    args, recipe = tc.checkpoint_split_args(meta, data)
    val_paths, val_labels = tc.split_files(args, recipe)[0]["val"]
    size, intensity = meta["preprocessing"]["image_size"], cc.intensity_of(meta)

    def p_of(images):
        return cc.probabilities(cc.predict_logits(model, images, intensity),
                                cal["temperature"])

    x_val, kept, _ = cc.decode_all(val_paths, size, cache, "val")
    y_val = np.array(val_labels)[kept]
    w = np.array([weight_of[str(val_paths[i])] for i in kept])
    p_val = p_of(x_val)
    test_paths, test_labels = test
    x_test, kept, _ = cc.decode_all(test_paths, size, cache, "test")
    y_test = np.array(test_labels)[kept]
    out = {"plain": cc.binary_metrics(y_val, p_val, cal["threshold"]),
           "weighted": cc.binary_metrics(y_val, p_val, cal["threshold"], sample_weight=w),
           "test": cc.binary_metrics(y_test, p_of(x_test), cal["threshold"]),
           "ess": effective_size(w), "n_val": len(y_val),
           "name": f"{path} ({meta['recipe']}, seed {meta['seed']})"}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="checkpoints already scored on test")
    p.add_argument("--data", type=Path, default=ROOT / "chest_xray")
    p.add_argument("--target", type=Path, help="unlabelled target folder (default: "
                   "the test split's images, labels ignored)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache",
                   help="where decoded images and ImageNet features are kept")
    args = p.parse_args()
    cio.pick_device("cpu")
    from scipy.stats import spearmanr  # scikit-learn's own dependency

    cache = args.cache_dir
    train_paths, _ = cc.list_labelled(args.data / "train")
    if (args.data / "val").is_dir():  # a Kaggle-style val/ is training source too
        train_paths += cc.list_labelled(args.data / "val")[0]
    test_paths, test_labels = cc.list_labelled(args.data / "test")
    target = cio.scan_folder(args.target)[0] if args.target else test_paths
    w, auc = density_ratio(imagenet_features(train_paths, cache, "train"),
                           imagenet_features(target, cache, "target"))
    weight_of = dict(zip(map(str, train_paths), w))
    print(f"Domain classifier train/ vs target ({len(target)} images): AUC {auc:.3f}; "
          f"weights capped at {w.max():.2f}, effective size {effective_size(w):.0f} of "
          f"{len(w)} train/ images")
    test = (test_paths, test_labels)

    rows = [score_model(m, args.data, weight_of, test, cache) for m in args.models]
    print(f"\n{'model':<70} {'val acc':>8} {'IW acc':>8} {'val AUC':>8} {'IW AUC':>8} "
          f"{'ESS':>9} {'test acc':>9} {'test AUC':>9}")
    for r in rows:
        print(f"{r['name']:<70} {r['plain']['accuracy']:8.4f} {r['weighted']['accuracy']:8.4f} "
              f"{r['plain']['auc']:8.4f} {r['weighted']['auc']:8.4f} "
              f"{r['ess']:5.0f}/{r['n_val']:<3} {r['test']['accuracy']:9.4f} "
              f"{r['test']['auc']:9.4f}")
    if len(rows) < 3:
        print("\nFewer than 3 models: no rank correlation.")
        return
    print("\nSpearman rank correlation with the test score over "
          f"{len(rows)} models (pre-registered bar: {MIN_SPEARMAN}):")
    verdict = {}
    for metric in ("accuracy", "auc"):
        test_scores = [r["test"][metric] for r in rows]
        for kind in ("plain", "weighted"):
            rho = spearmanr([r[kind][metric] for r in rows], test_scores).statistic
            verdict[kind, metric] = rho
            print(f"  {kind:<8} validation {metric:<8} vs test {metric:<8}: {rho:+.3f}")
    use = (verdict["weighted", "accuracy"] >= MIN_SPEARMAN
           and verdict["weighted", "accuracy"] > verdict["plain", "accuracy"])
    print("\nVerdict (accuracy): " + (
        "the weighted score ranks these models as test does better than the plain one, "
        "above the bar: it may judge the candidates (a transductive protocol)." if use else
        "the weighted score does not pass the pre-registered rule: report the candidates "
        "on all scores and keep the default recipe."))


if __name__ == "__main__":
    main()
