"""Calibration: the temperature, the sensitivity threshold and the uncertain band, fitted
on a patient-grouped calibration split (with simulated acquisition shift) and stored in
the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cxr import network, scoring

# Calibration rule of the recipes that calibrate (fitted on validation data only)
TARGET_SENSITIVITY = 0.97  # the threshold: expected sensitivity on new films >= this

BAND_LEVEL = 0.995  # uncertain band: between the sensitivity- and specificity-0.995 cuts

# Metrics
TEMPERATURE_RANGE = (0.25, 4.0)  # a fitted temperature is bounded (a floor of 0.05 collapsed

# the band of a separable validation set to [1, 1))
BOOTSTRAP_CUTS = 200  # resamples whose median sets the threshold and the band

def fit_calibration(logits: torch.Tensor, labels, groups=None, seed: int = 0) -> dict:
    """Temperature, threshold and uncertain band from held-out data (never test).

    Temperature: minimum NLL on a grid within TEMPERATURE_RANGE, kept only if it also
    lowers the NLL on groups it was not fitted on (5-fold, grouped cross-fitting), else
    1. Threshold (cuts()) and band: medians over BOOTSTRAP_CUTS group-resamples, so one
    or two images cannot set them. groups: an id per row (patient, or an image and its
    shifted copies); default one per row."""
    from sklearn.model_selection import GroupKFold

    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    y = torch.as_tensor(labels)
    fitted = _fit_temperature(logits, y)
    nll_t = nll_1 = 0.0
    folds = GroupKFold(n_splits=min(5, len(np.unique(groups))))
    for fit_idx, held_idx in folds.split(labels, labels, groups):
        t = _fit_temperature(logits[fit_idx], y[fit_idx])
        held, yh = logits[held_idx], y[held_idx]
        nll_t += nn.functional.cross_entropy(held / t, yh, reduction="sum").item()
        nll_1 += nn.functional.cross_entropy(held, yh, reduction="sum").item()
    keep = nll_t < nll_1
    temperature = fitted if keep else 1.0
    p = network.probabilities(logits, temperature)
    draws = []
    for idx in scoring.resample_indices(len(labels), BOOTSTRAP_CUTS, seed, groups):
        if len(np.unique(labels[idx])) == 2:
            draws.append(cuts(p[idx], labels[idx]))
    threshold, lo, hi = np.median(draws, axis=0)
    band = [threshold, threshold] if hi <= lo else [min(lo, threshold), max(hi, threshold)]
    spread = np.percentile(draws, [2.5, 97.5], axis=0)
    n = len(labels)
    return {
        "temperature": float(temperature), "threshold": float(threshold),
        "sensitivity_promised": threshold_rank(int((labels == 1).sum()))[1],
        "uncertain_band": [float(b) for b in band],
        "temperature_fitted": float(fitted), "temperature_kept": bool(keep),
        "temperature_decision": (
            f"temperature {fitted:.3f} fitted; cross-fitted NLL {nll_t / n:.4f} vs "
            f"{nll_1 / n:.4f} at T = 1: " + ("kept" if keep else "not kept, T = 1")),
        "nll_cross_fitted": {"fitted": nll_t / n, "T1": nll_1 / n},
        "threshold_interval": [float(v) for v in spread[:, 0]],
        "band_low_interval": [float(v) for v in spread[:, 1]],
        "band_high_interval": [float(v) for v in spread[:, 2]],
        "nll_at_temperature": nn.functional.cross_entropy(logits / temperature, y).item(),
        "nll_at_1": nn.functional.cross_entropy(logits, y).item(),
    }

def threshold_rank(n_positive: int) -> tuple[int, float]:
    """(j, promised sensitivity): the threshold is the j-th lowest (from 0) of the
    n_positive pneumonia scores it is fitted on. Split-conformal rank: a new pneumonia
    film exchangeable with them falls below the j-th lowest with probability
    (j + 1) / (n + 1), so j = floor(alpha (n + 1)) - 1 keeps the expected sensitivity on
    new films >= TARGET_SENSITIVITY. ("Sensitivity >= 0.97 on the fitted films" lets
    floor(alpha n) fall below and promises less: 0.968 for 62 films.) Below
    1 / alpha - 1 films no rank keeps it: j = 0, and the promise says how far short.
    The promise counts rows as films: where rows are clustered (shifted copies of one
    film, several films of one patient) it is nominal, and only the sensitivity measured
    on other films (recalibration is cross-fitted) checks it."""
    alpha = 1 - TARGET_SENSITIVITY
    j = max(0, int(np.floor(alpha * (n_positive + 1) + 1e-9)) - 1)
    return j, 1 - (j + 1) / (n_positive + 1)

def cuts(p, labels) -> tuple[float, float, float]:
    """(threshold, band low, band high) on P(PNEUMONIA): the threshold of
    threshold_rank() (expected sensitivity on new films >= TARGET_SENSITIVITY); the
    highest with sensitivity >= BAND_LEVEL on these films; the lowest with specificity
    >= BAND_LEVEL on them."""
    p, labels = np.asarray(p), np.asarray(labels)
    pos, neg = np.sort(p[labels == 1]), np.sort(p[labels == 0])
    threshold = float(pos[threshold_rank(len(pos))[0]])
    lo = float(pos[int(np.floor((1 - BAND_LEVEL) * len(pos)))])
    hi = float(np.nextafter(neg[min(len(neg) - 1, int(np.ceil(BAND_LEVEL * len(neg))) - 1)], 1))
    return threshold, lo, hi

def _fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    grid = np.exp(np.linspace(*np.log(TEMPERATURE_RANGE), 400))
    nll = [nn.functional.cross_entropy(logits / t, y).item() for t in grid]
    return float(grid[int(np.argmin(nll))])

STRESS_COPIES = 3  # shifted copies of the calibration split that calibration is fitted on

CALIBRATION_RULE = (  # in words, stored with every calibration a run fits
    f"fitted on a patient-grouped calibration split (not used for selection) under "
    f"simulated acquisition shift: temperature by min NLL within "
    f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], kept only if it lowers "
    f"the cross-fitted NLL, else 1; threshold (expected sensitivity on new films >= "
    f"{TARGET_SENSITIVITY}, split-conformal rank) and uncertain band (between the sensitivity-"
    f"{BAND_LEVEL} and specificity-{BAND_LEVEL} cuts) as medians over "
    f"patient-grouped bootstrap resamples")

def stress_transform(size: int):
    """Simulated acquisition shift for calibration: exposure, contrast, gamma, field of
    view, blur. Applied to calibration-split images only (never to test)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.4, contrast=0.4),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.5),
        v2.Lambda(lambda x: v2.functional.adjust_gamma(
            x, float(torch.empty(1).uniform_(0.6, 1.6)))),
    ])

def stressed_copies(images: np.ndarray, labels: np.ndarray, copies: int, seed: int):
    """copies x len(images) perturbed versions of the images (fixed seed)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed + 1000)
    t = stress_transform(images.shape[-1])
    out = np.stack([t(torch.from_numpy(im)[None])[0].numpy()
                    for _ in range(copies) for im in images])
    torch.set_rng_state(state)
    return out, np.tile(labels, copies)

def calibrate(model, x_cal, y_cal, patients, intensity: str, seed: int) -> dict:
    """Temperature, threshold and uncertain band, fitted on shifted copies of the
    calibration split (patients that neither training nor epoch selection saw)."""
    x_sv, y_sv = stressed_copies(x_cal, y_cal, STRESS_COPIES, seed)
    groups = np.tile(patients, STRESS_COPIES)  # a patient's images and copies stay together
    calibration = fit_calibration(network.predict_logits(model, x_sv, intensity), y_sv, groups, seed)
    calibration["fitted_on"] = (f"{STRESS_COPIES} shifted copies of the {len(y_cal)} "
                                "calibration-split images (stress_transform)")
    calibration["rule"] = CALIBRATION_RULE
    lo, hi = calibration["uncertain_band"]
    print(f"\nCalibration on the shifted calibration split: {calibration['temperature_decision']}")
    print(f"Temperature {calibration['temperature']:.3f}, "
          f"threshold P(PNEUMONIA) >= {calibration['threshold']:.4f}, uncertain band "
          f"[{lo:.4f}, {hi:.4f})")
    return calibration

# The referral rule: answer a film only when the model is confident enough that the error
# among the films it answers stays at or below REFERRAL_RISK (with probability >= 1 -
# REFERRAL_DELTA over calibration sets like the one it was fitted on).
REFERRAL_RISK = 0.04  # the smallest of 1-5% that the shipped model's 522 calibration films certify

REFERRAL_DELTA = 0.10

def risk_bound(errors: int, n: int, delta: float) -> float:
    """The largest error rate under which errors or fewer of n films would still be seen
    with probability >= delta (the binomial tail inversion B* of SGR, i.e. the one-sided
    Clopper-Pearson upper bound at level 1 - delta); 1 when nothing is answered."""
    from scipy.stats import beta  # scipy is installed with scikit-learn

    if n == 0 or errors >= n:
        return 1.0
    return float(beta.ppf(1 - delta, errors + 1, n - errors))

def fit_referral(conf, correct, risk: float = REFERRAL_RISK, delta: float = REFERRAL_DELTA) -> dict:
    """The confidence cut of selective classification with guaranteed risk (SGR: Geifman &
    El-Yaniv 2017, "Selective classification for deep neural networks", Algorithm 1).

    conf: the calibrated probability of the decided class, per labelled film; correct:
    whether the decision was right. Binary search over the sorted confidences for
    ceil(log2 m) steps; at each tested cut, the bound of risk_bound() at delta / steps on
    the films answered (confidence >= cut). The cut kept is the one of largest coverage
    whose bound is below risk: then, with probability >= 1 - delta, the error among the
    answered films of new films like these is <= risk. None meets it: min_confidence is
    above 1 (every film referred). The films are counted as independent."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    m = len(conf)
    ranked = np.sort(conf)
    steps = max(1, int(np.ceil(np.log2(m)))) if m > 1 else 1
    lo, hi, kept = 0, m - 1, None
    for _ in range(steps if m else 0):
        z = int(np.ceil((lo + hi) / 2))
        cut = float(ranked[z])
        answered = conf >= cut
        n, errors = int(answered.sum()), int((~correct[answered]).sum())
        bound = risk_bound(errors, n, delta / steps)
        if bound < risk:
            if kept is None or n > kept["answered"]:
                kept = {"min_confidence": cut, "answered": n, "errors": errors, "bound": bound}
            hi = z
        else:
            lo = z
    kept = kept or {"min_confidence": 2.0, "answered": 0, "errors": 0, "bound": 1.0}
    return {"rule": "SGR (Geifman & El-Yaniv 2017)", "target_risk": risk, "delta": delta,
            "films": m, "coverage_fitted": kept["answered"] / m if m else 0.0, **kept}
