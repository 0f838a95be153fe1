"""The one metrics module: decisions at a threshold, accuracy / sensitivity /
specificity / F1 / AUC, calibration error, patient bootstrap intervals, error analysis.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15

CONFIDENT = 0.8  # "confidently wrong": an error made with confidence above this

def decide(p: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (1 = PNEUMONIA when p >= threshold) and its confidence."""
    pred = (np.asarray(p) >= threshold).astype(int)
    return pred, np.where(pred == 1, p, 1 - np.asarray(p))

def binary_metrics(y, p, threshold: float, sample_weight=None) -> dict:
    """Accuracy, sensitivity, specificity, F1 (PNEUMONIA positive) and ROC AUC; NaN where
    a measure is not defined (sensitivity needs PNEUMONIA images, AUC both classes).
    sample_weight weights the images (importance-weighted validation)."""
    # imported here: scikit-learn costs 1.5 s at start-up, which predict.py never needs
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y = np.asarray(y)
    pred, _ = decide(p, threshold)
    w = {"sample_weight": sample_weight}
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1], **w).ravel()
    return {
        "accuracy": float(accuracy_score(y, pred, **w)),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=0, **w)),
        "auc": float(roc_auc_score(y, p, **w)) if len(set(y.tolist())) == 2 else float("nan"),
    }

def expected_calibration_error(correct, conf, bins: int = ECE_BINS):
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins,
    weighted by the share of images in each bin. Returns (ece, per-bin rows)."""
    correct, conf = np.asarray(correct, dtype=float), np.asarray(conf, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    ece, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            acc, c = correct[m].mean(), conf[m].mean()
            ece += m.mean() * abs(acc - c)
            rows.append((lo, hi, acc, c, int(m.sum())))
    return float(ece), rows

def classwise_ece(y, p, bins: int = ECE_BINS) -> float:
    """Class-wise ECE: for each class, the size-weighted mean |frequency of the class -
    mean predicted probability of it| over equal-width bins of that probability,
    averaged over the classes. Unlike the top-label ECE it does not depend on a
    threshold."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    return float(np.mean([expected_calibration_error(y == k, pk, bins)[0]
                          for k, pk in ((1, p), (0, 1 - p))]))

def log_loss(y, p, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of the labels under P(PNEUMONIA) (natural log)."""
    y, p = np.asarray(y), np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log(1 - p))))

def bootstrap_ci(y, p, threshold, n: int, seed: int = 0, groups=None):
    """95% percentile intervals of accuracy, sensitivity, specificity and ROC AUC over n
    resamples, of patients when groups (a patient id per image) is given, else of images
    (a measure not defined in a resample, e.g. AUC with one class drawn, skips it).
    threshold: one (a dict back) or several (a tuple of dicts, one per threshold, all on
    the same resamples, the AUC computed once each)."""
    from sklearn.metrics import roc_auc_score  # scikit-learn costs 1.5 s at start-up

    y, p = np.asarray(y), np.asarray(p)
    thresholds = threshold if isinstance(threshold, tuple) else (threshold,)
    draws = [{k: [] for k in ("accuracy", "sensitivity", "specificity", "auc")} for _ in thresholds]
    for idx in resample_indices(len(y), n, seed, groups):
        yi, pi = y[idx], p[idx]
        pos = yi == 1
        auc = float(roc_auc_score(yi, pi)) if 0 < pos.sum() < len(yi) else None
        for t, d in zip(thresholds, draws):  # the counts binary_metrics takes from its confusion matrix
            called = pi >= t
            tp, fn = int((called & pos).sum()), int((~called & pos).sum())
            tn, fp = int((~called & ~pos).sum()), int((called & ~pos).sum())
            d["accuracy"].append((tp + tn) / len(yi))
            if tp + fn:
                d["sensitivity"].append(tp / (tp + fn))
            if tn + fp:
                d["specificity"].append(tn / (tn + fp))
            if auc is not None:
                d["auc"].append(auc)
    out = tuple({k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                 for k, v in d.items() if v} for d in draws)
    return out if isinstance(threshold, tuple) else out[0]

def resample_indices(n_items: int, n: int, seed: int = 0, groups=None):
    """n bootstrap resamples (index arrays) of n_items, drawing whole groups when given,
    so that two models scored on the same resamples are compared pairwise."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n):
            yield rng.integers(0, n_items, n_items)
        return
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    for _ in range(n):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])

def error_analysis(y, pred, conf) -> dict:
    """The published run's error analysis: counts and the confidence of the errors."""
    y, pred, conf = np.asarray(y), np.asarray(pred), np.asarray(conf)
    wrong = pred != y
    cw = conf[wrong]
    return {
        "errors": int(wrong.sum()),
        "false_positives": int(((pred == 1) & (y == 0)).sum()),
        "false_negatives": int(((pred == 0) & (y == 1)).sum()),
        "error_conf_mean": float(cw.mean()) if len(cw) else float("nan"),
        "error_conf_median": float(np.median(cw)) if len(cw) else float("nan"),
        "confident_error_share": float((cw > CONFIDENT).mean()) if len(cw) else 0.0,
    }
