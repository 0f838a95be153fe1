"""Calibration: the temperature, the sensitivity threshold and the uncertain band, fitted
on a patient-grouped calibration split (with simulated acquisition shift) and stored in
the checkpoint. One Calibration object fits, applies, decides and serialises them;
nothing else reads their fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

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

def calibrate(model, x_cal, y_cal, patients, intensity: str, seed: int) -> Calibration:
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
    return Calibration.from_dict(calibration)


# ---------------------------------------------------------------------------------
# The calibration a model predicts with: applied, decided on, stored and read back.
# ---------------------------------------------------------------------------------

MISSING = object()  # a field the stored calibration does not have


class CalibrationError(ValueError):
    """A stored calibration's field (its key, "" for the whole) that is missing, of the
    wrong type or out of bounds: field, value (MISSING when absent) and rule."""

    def __init__(self, field: str, value, rule: str):
        super().__init__(f"{field or 'calibration'} (must be {rule})")
        self.field, self.value, self.rule = field, value, rule


def _number(value) -> bool:
    """A finite int or float (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _checked(d: dict, key: str, ok, rule: str, default=MISSING):
    value = d.get(key, default)
    if value is MISSING or not ok(value):
        raise CalibrationError(key, value, "given" if value is MISSING else rule)
    return value


_TEMPERATURE = (lambda t: _number(t) and t > 0, "a finite number > 0")
_THRESHOLD = (lambda t: _number(t) and 0 <= t <= 1, "a number within [0, 1]")
_BAND = (lambda b: isinstance(b, (list, tuple)) and len(b) == 2 and all(map(_number, b))
         and 0 <= b[0] <= b[1] <= 1 + 1e-9, "[low, high] with 0 <= low <= high <= 1")
_SINGLE = ("temperature", "threshold", "uncertain_band")  # a checkpoint's meta.calibration
_ENSEMBLE = ("temperatures", "ensemble_temperature", "threshold", "uncertain_band", "shared",
             "fitted")  # an ensemble file's calibration


@dataclass(frozen=True, eq=False)
class Calibration:
    """What turns a model's logits into P(PNEUMONIA), a verdict and a referral.

    temperatures: one per member (a single model is one member); ensemble_temperature:
    the mean probability's logit is divided by it (an ensemble calibrated on a shared
    set; else 1); threshold on P(PNEUMONIA); band: the uncertain band [low, high), whose
    films are referred; fitted: False for a model without calibration (temperature 1,
    threshold 0.5, no band: argmax); shared: for an ensemble, whether its threshold and
    band were fitted on one shared set (None for one model); record: the stored form as
    read or fitted (the fit's decision, intervals, rule, fitted_on, ...)."""

    temperatures: tuple = (1.0,)
    threshold: float = 0.5
    band: tuple = (0.5, 0.5)
    ensemble_temperature: float = 1.0
    fitted: bool = False
    shared: bool | None = None
    record: dict = field(default_factory=dict, repr=False)

    # --- fitting, and the stored form --------------------------------------------

    @classmethod
    def fit(cls, logits: torch.Tensor, labels, groups=None, seed: int = 0) -> Calibration:
        """fit_calibration on held-out logits (one model)."""
        return cls.from_dict(fit_calibration(logits, labels, groups, seed))

    @classmethod
    def from_dict(cls, d, members: list[Calibration] | None = None) -> Calibration:
        """The calibration stored as d (to_dict's form), every field checked
        (CalibrationError names the first bad one). One model's (a checkpoint's
        meta.calibration): absent fields are temperature 1, threshold 0.5 and an empty
        band; an empty dict is an uncalibrated model. An ensemble's ("temperatures"):
        every field is required, one temperature per member, and with members given
        (their own calibrations), the temperatures must be theirs."""
        if not isinstance(d, dict):
            raise CalibrationError("", d, "a dictionary")
        if "temperatures" not in d:
            t = float(_checked(d, "temperature", *_TEMPERATURE, default=1.0))
            thr = float(_checked(d, "threshold", *_THRESHOLD, default=0.5))
            return cls((t,), thr,
                       tuple(map(float, _checked(d, "uncertain_band", *_BAND, default=[thr, thr]))),
                       fitted=bool(d), record=dict(d))
        temps = _checked(d, "temperatures", lambda v: isinstance(v, list) and len(v) >= 1 and all(
            _TEMPERATURE[0](t) for t in v) and (members is None or len(v) == len(members)),
            "a finite number > 0 per member")
        if members is not None and [float(t) for t in temps] != [m.temperatures[0] for m in members]:
            raise CalibrationError("temperatures", temps, "the members' own stored temperatures")
        flag = (lambda v: isinstance(v, bool), "true or false")
        shared = _checked(d, "shared", *flag)
        return cls(tuple(map(float, temps)), float(_checked(d, "threshold", *_THRESHOLD)),
                   tuple(map(float, _checked(d, "uncertain_band", *_BAND))),
                   float(_checked(d, "ensemble_temperature", *_TEMPERATURE)),
                   _checked(d, "fitted", *flag), shared, dict(d))

    @classmethod
    def from_meta(cls, meta: dict) -> Calibration:
        """A checkpoint's stored calibration (meta["calibration"]; none: uncalibrated)."""
        stored = meta.get("calibration")
        return cls() if stored is None else cls.from_dict(stored)

    @classmethod
    def of_members(cls, members: list[Calibration]) -> Calibration:
        """An ensemble's calibration without one fitted for it: each member's temperature,
        the means of the members' thresholds and bands (each fitted on its own member's
        split, so an approximation: shared False)."""
        return cls(tuple(c.temperatures[0] for c in members),
                   float(np.mean([c.threshold for c in members])),
                   tuple(float(np.mean([c.band[i] for c in members])) for i in (0, 1)),
                   fitted=all(c.fitted for c in members), shared=False)

    @property
    def is_ensemble(self) -> bool:
        return self.shared is not None

    def to_dict(self) -> dict:
        """The stored form (plain JSON types), which from_dict reads back."""
        if self.is_ensemble:
            core = dict(zip(_ENSEMBLE, (list(self.temperatures), self.ensemble_temperature,
                                        self.threshold, list(self.band), self.shared, self.fitted)))
            return {**core, **{k: v for k, v in self.record.items() if k not in core}}
        out = dict(self.record)
        out.update(zip(_SINGLE, (self.temperatures[0], self.threshold, list(self.band))))
        return out

    def summary(self) -> dict:
        """The calibration in a results folder's run.json and an evaluation's metrics.json."""
        out = {"temperatures": list(self.temperatures)}
        if self.shared:
            out["ensemble_temperature"] = self.ensemble_temperature
        out.update(threshold=self.threshold, uncertain_band=list(self.band))
        if self.is_ensemble:
            out["shared"] = self.shared
        return out

    def columns(self) -> dict:
        """The calibration columns of a prediction row."""
        return {"threshold": self.threshold, "temperature": list(self.temperatures)}

    def refitted(self, site: Calibration, fitted_on: str) -> Calibration:
        """This model's calibration with site's (fitted on its P(PNEUMONIA) as logits, one
        member) on top: its temperature multiplies the stored one (one model) or the
        ensemble temperature (shared from then on); its threshold and band replace these."""
        record = dict(site.record, fitted_on=fitted_on)
        if not self.is_ensemble:
            t = site.temperatures[0] * self.temperatures[0]
            return replace(site, temperatures=(t,), record=record)
        return replace(self, ensemble_temperature=site.temperatures[0] * self.ensemble_temperature,
                       threshold=site.threshold, band=site.band, fitted=True, shared=True,
                       record={"fitted_on": fitted_on, "details": record})

    @property
    def sensitivity_promised(self) -> float:
        return self.record["sensitivity_promised"]

    # --- applying it -----------------------------------------------------------------

    def probability(self, logits: list[torch.Tensor]) -> np.ndarray:
        """P(PNEUMONIA) from each member's logits: the mean of the members' temperature-
        scaled ones, then its logit divided by the ensemble temperature (if not 1)."""
        p = network.mean_probability(logits, self.temperatures)
        if self.ensemble_temperature == 1.0:
            return p
        return network.probabilities(torch.from_numpy(np.c_[np.zeros(len(p)), network.logit(p)]),
                                     self.ensemble_temperature)

    def decide(self, p):
        """(predicted class, its confidence) at the threshold."""
        return scoring.decide(p, self.threshold)

    def positive(self, p):
        """Called PNEUMONIA (bool)."""
        return np.asarray(p) >= self.threshold

    def referred(self, p):
        """Sent to a radiologist first by this calibration's rule: inside the band."""
        lo, hi = self.band
        return (p >= lo) & (p < hi)

    def answered(self, p) -> np.ndarray:
        return np.logical_not(self.referred(np.asarray(p)))

    @property
    def refers(self) -> bool:
        """Whether the rule can refer anything (an empty band refers nothing)."""
        return self.band[1] > self.band[0]

    # --- in words ----------------------------------------------------------------------

    def describe(self) -> str:
        """One line: what predict applies (its header)."""
        if not self.fitted:
            return "uncalibrated: PNEUMONIA when P(PNEUMONIA) >= 0.5, no uncertain band"
        lo, hi = self.band
        return (f"temperature {', '.join(f'{t:.4f}' for t in self.temperatures)} | threshold "
                f"P(PNEUMONIA) >= {self.threshold:.3f} | uncertain band [{lo:.3f}, {hi:.3f})")

    def referral(self, referred: bool) -> str:
        """Whether this calibration's rule sends a film to a radiologist first, and why."""
        lo, hi = self.band
        if not self.refers:
            return "no rule of this model's (it has no uncertain band" + (
                "" if self.fitted else ": uncalibrated") + ")"
        if referred:
            return (f"YES - P(PNEUMONIA) is inside the uncertain band {lo:.1%} to {hi:.1%}, chosen "
                    "on labelled films held out from training as where this model's calls are unreliable")
        return f"not by this model's rules (outside its uncertain band {lo:.1%} to {hi:.1%})"

    def temperature_words(self, spec: str = ".4f") -> str:
        return ", ".join(format(t, spec) for t in self.temperatures)

    def rule_words(self) -> str:
        """The referral rule, as the evaluation report names it."""
        lo, hi = self.band
        return f"Uncertain band [{lo:.3f}, {hi:.3f})"

    def caveat(self) -> str | None:
        """A note on how far to trust these cuts, or None."""
        if self.shared is False:
            return ("note: the ensemble's threshold and band are the means of its members' own, "
                    "each fitted on a different split; fit one on a shared labelled set with "
                    "visualize_results.py --recalibrate K --save-calibrated ENSEMBLE.pth")
        return None


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
