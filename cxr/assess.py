"""Every number of an evaluation on labelled images, from labels and probabilities:
metrics at the stored threshold and at 0.5 with bootstrap intervals, the calibration
check, error analysis, the uncertain band's coverage and referrals per class; and
those numbers as plain JSON.
"""

from __future__ import annotations

import numpy as np

from cxr import network, scoring


def evaluate(y, p, cal, n_boot, p_at_t1, groups=None) -> dict:
    """Every number of the report, from labels y and probabilities p (and p_at_t1, the
    same members' probabilities at temperature 1, to see what the temperature does)."""
    from sklearn.metrics import confusion_matrix  # scikit-learn costs 1.5 s at start-up

    thr = cal["threshold"]
    lo, hi = cal["uncertain_band"]
    pred, conf = scoring.decide(p, thr)
    correct = pred == y
    answered = ~((p >= lo) & (p < hi))
    pred_half, conf_half = scoring.decide(p, 0.5)
    conf_t1 = np.where(pred == 1, p_at_t1, 1 - p_at_t1)  # the same decisions, stated at T = 1
    return {
        "n": int(len(y)), "counts": np.bincount(y, minlength=2).tolist(),
        "pred": pred, "conf": conf, "correct": correct, "answered": answered,
        "at_0.5": scoring.binary_metrics(y, p, 0.5), "at_threshold": scoring.binary_metrics(y, p, thr),
        "ci95_at_0.5": scoring.bootstrap_ci(y, p, 0.5, n_boot, groups=groups),
        "ci95_at_threshold": scoring.bootstrap_ci(y, p, thr, n_boot, groups=groups),
        "bootstrap": "by patient" if groups is not None else "by image",
        "ece_at_0.5": scoring.expected_calibration_error(pred_half == y, conf_half)[0],
        "ece": scoring.expected_calibration_error(correct, conf)[0],
        "calibration_check": {
            "ece_variant": f"top-label, {scoring.ECE_BINS} equal-width bins, correct = the decision "
                           "at the stored threshold",
            "ece": scoring.expected_calibration_error(correct, conf)[0],
            "ece_at_T1": scoring.expected_calibration_error(correct, conf_t1)[0],
            "classwise_ece": scoring.classwise_ece(y, p),
            "classwise_ece_at_T1": scoring.classwise_ece(y, p_at_t1),
            "nll": scoring.log_loss(y, p), "nll_at_T1": scoring.log_loss(y, p_at_t1)},
        "confusion": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        **scoring.error_analysis(y, pred, conf),
        "coverage": float(answered.mean()),
        "referral_rate": {name: float((~answered)[y == k].mean()) if (y == k).any()
                          else float("nan") for k, name in enumerate(network.CLASS_NAMES)},
        "accuracy_answered": float(correct[answered].mean()) if answered.any() else float("nan"),
    }

def coverage_curve(correct, conf):
    """Accuracy when only the most confident fraction of images is answered."""
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(correct[order])
    n = np.arange(1, len(conf) + 1)
    return n / len(conf), hits / n

def json_safe(obj):
    """Plain JSON types; a measure that is not defined (NaN) becomes null."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
