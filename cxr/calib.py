"""Calibration: the temperature, the sensitivity threshold and the referral rule, fitted
on a patient-grouped calibration split and stored in the checkpoint. One Calibration
object fits, applies, decides and serialises them; nothing else reads their fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from cxr import network, scoring, selective

# Calibration rule of the recipes that calibrate (fitted on validation data only)
TARGET_SENSITIVITY = 0.97  # the threshold: expected sensitivity on new films >= this

TEMPERATURE_RANGE = (0.25, 4.0)  # a fitted temperature is bounded (a floor of 0.05 collapsed
# the cuts of a separable validation set)

BOOTSTRAP_CUTS = 200  # resamples whose median sets the threshold

def fit_calibration(logits: torch.Tensor, labels, groups=None, seed: int = 0, films=None) -> dict:
    """Temperature, threshold and referral rule from held-out data (never test).

    Temperature: minimum NLL on a grid within TEMPERATURE_RANGE, kept only if it also
    lowers the NLL on groups it was not fitted on (5-fold, grouped cross-fitting), else
    1. Threshold (threshold_rank()): the median over BOOTSTRAP_CUTS group-resamples, so
    one or two images cannot set it. groups: an id per row (patient, or an image and its
    shifted copies); default one per row. Referral rule (fit_referral()): on films, (logits,
    labels) of one row per film (default: these rows), at the fitted temperature and
    threshold."""
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
            draws.append(sensitivity_cut(p[idx], labels[idx]))
    threshold = float(np.median(draws))
    film_logits, film_labels = films if films is not None else (logits, labels)
    pred, conf = scoring.decide(network.probabilities(film_logits, temperature), threshold)
    n = len(labels)
    return {
        "temperature": float(temperature), "threshold": threshold,
        "sensitivity_promised": threshold_rank(int((labels == 1).sum()))[1],
        "referral": selective.fit_referral(conf, pred == np.asarray(film_labels)),
        "temperature_fitted": float(fitted), "temperature_kept": bool(keep),
        "temperature_decision": (
            f"temperature {fitted:.3f} fitted; cross-fitted NLL {nll_t / n:.4f} vs "
            f"{nll_1 / n:.4f} at T = 1: " + ("kept" if keep else "not kept, T = 1")),
        "nll_cross_fitted": {"fitted": nll_t / n, "T1": nll_1 / n},
        "threshold_interval": [float(v) for v in np.percentile(draws, [2.5, 97.5])],
        "nll_at_temperature": nn.functional.cross_entropy(logits / temperature, y).item(),
        "nll_at_1": nn.functional.cross_entropy(logits, y).item(),
    }

def threshold_rank(n_positive: int) -> tuple[int, float]:
    """(j, promised sensitivity): the threshold is the j-th lowest (from 0) of the
    n_positive pneumonia scores it is fitted on. Split-conformal rank: a new pneumonia
    film exchangeable with them falls below the j-th lowest with probability
    (j + 1) / (n + 1), so j = floor(alpha (n + 1)) - 1 keeps the expected sensitivity on
    new films >= TARGET_SENSITIVITY, on average over calibration sets (a given fit may
    fall short). ("Sensitivity >= 0.97 on the fitted films" lets floor(alpha n) fall
    below and promises less: 0.968 for 62 films.) Below 1 / alpha - 1 films no rank keeps
    it: j = 0, and the promise says how far short. The promise counts rows as films:
    where rows are clustered (shifted copies of one film, several films of one patient)
    it is nominal, and only the sensitivity measured on other films (recalibration is
    cross-fitted) checks it."""
    alpha = 1 - TARGET_SENSITIVITY
    j = max(0, int(np.floor(alpha * (n_positive + 1) + 1e-9)) - 1)
    return j, 1 - (j + 1) / (n_positive + 1)

def sensitivity_cut(p, labels) -> float:
    """The threshold on P(PNEUMONIA) of threshold_rank(): expected sensitivity on new films
    >= TARGET_SENSITIVITY."""
    pos = np.sort(np.asarray(p)[np.asarray(labels) == 1])
    return float(pos[threshold_rank(len(pos))[0]])

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
    f"{TARGET_SENSITIVITY} on average over calibration sets, split-conformal rank) as the "
    f"median over patient-grouped bootstrap resamples; referral rule on the unshifted "
    f"calibration films (SGR: error among answered films <= {selective.REFERRAL_RISK:.0%} with "
    f"probability >= {1 - selective.REFERRAL_DELTA:.0%})")

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
    """Temperature and threshold fitted on shifted copies of the calibration split
    (patients that neither training nor epoch selection saw), the referral rule on its
    films as they are."""
    x_sv, y_sv = stressed_copies(x_cal, y_cal, STRESS_COPIES, seed)
    groups = np.tile(patients, STRESS_COPIES)  # a patient's images and copies stay together
    films = (network.predict_logits(model, x_cal, intensity), y_cal)
    calibration = fit_calibration(network.predict_logits(model, x_sv, intensity), y_sv, groups,
                                  seed, films)
    calibration["fitted_on"] = (f"{STRESS_COPIES} shifted copies of the {len(y_cal)} "
                                "calibration-split images (stress_transform); the referral rule "
                                "on the images themselves")
    calibration["rule"] = CALIBRATION_RULE
    cal = Calibration.from_dict(calibration)
    print(f"\nCalibration on the shifted calibration split: {calibration['temperature_decision']}")
    print(f"Temperature {cal.temperatures[0]:.3f}, threshold P(PNEUMONIA) >= {cal.threshold:.4f}; "
          f"referral rule: {cal.rule_words()}")
    return cal


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


def is_int(value) -> bool:
    """An int (a bool is not one here); checkpoints' checks use it too."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (a bool is not a number here); checkpoints' checks use it too."""
    if not (is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _count(value) -> bool:
    return is_int(value) and value >= 0


def _checked(d: dict, key: str, ok, rule: str, default=MISSING):
    value = d.get(key, default)
    if value is MISSING or not ok(value):
        raise CalibrationError(key, value, "given" if value is MISSING else rule)
    return value


_TEMPERATURE = (lambda t: is_number(t) and t > 0, "a finite number > 0")
_THRESHOLD = (lambda t: is_number(t) and 0 <= t <= 1, "a number within [0, 1]")
_REFERRAL = {  # the stored referral rule's fields (fit_referral), each with its check
    "min_confidence": (lambda v: is_number(v) and 0 <= v <= 2, "a number within [0, 2]"),
    "target_risk": (lambda v: is_number(v) and 0 < v < 1, "a number within (0, 1)"),
    "delta": (lambda v: is_number(v) and 0 < v < 1, "a number within (0, 1)"),
    "films": (_count, "a count"),
    "answered": (_count, "a count"),
    "bound": (lambda v: is_number(v) and 0 <= v <= 1, "a number within [0, 1]")}
_SINGLE = ("temperature", "threshold", "referral")  # a checkpoint's meta.calibration
_ENSEMBLE = ("temperatures", "ensemble_temperature", "threshold", "referral", "shared",
             "fitted")  # an ensemble file's calibration


def _referral(d: dict, required: bool):
    """The stored referral rule (None: the calibration has none), every field checked."""
    rule = d.get("referral", MISSING if required else None)
    if rule is MISSING or rule is None:
        if rule is MISSING:
            raise CalibrationError("referral", rule, "given (null for none)")
        return None
    if not isinstance(rule, dict):
        raise CalibrationError("referral", rule, "a dictionary")
    for key, (ok, words) in _REFERRAL.items():
        try:
            _checked(rule, key, ok, words)
        except CalibrationError as e:
            raise CalibrationError(f"referral.{key}", e.value, e.rule) from None
    if rule["answered"] > rule["films"]:
        raise CalibrationError("referral.answered", rule["answered"], "at most referral.films")
    return dict(rule)


@dataclass(frozen=True, eq=False)
class Calibration:
    """What turns a model's logits into P(PNEUMONIA), a verdict and a referral.

    temperatures: one per member (a single model is one member); ensemble_temperature:
    the mean probability's logit is divided by it (an ensemble calibrated on a shared
    set; else 1); threshold on P(PNEUMONIA); referral: the referral rule (fit_referral's
    record: films whose confidence is below its min_confidence are referred; None: no
    rule); fitted: False for a model without calibration (temperature 1, threshold 0.5,
    no rule: argmax); shared: for an ensemble, whether its threshold and rule were fitted
    on one shared set (None for one model); record: the stored form as read or fitted
    (the fit's decision, intervals, rule, fitted_on, ...)."""

    temperatures: tuple = (1.0,)
    threshold: float = 0.5
    referral: dict | None = None
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
        meta.calibration): absent fields are temperature 1, threshold 0.5 and no referral
        rule (a calibration fitted before the rule existed has none); an empty dict is an
        uncalibrated model. An ensemble's ("temperatures"): every field is required, one
        temperature per member, and with members given (their own calibrations), the
        temperatures must be theirs."""
        if not isinstance(d, dict):
            raise CalibrationError("", d, "a dictionary")
        if "temperatures" not in d:
            t = float(_checked(d, "temperature", *_TEMPERATURE, default=1.0))
            thr = float(_checked(d, "threshold", *_THRESHOLD, default=0.5))
            return cls((t,), thr, _referral(d, required=False), fitted=bool(d), record=dict(d))
        temps = _checked(d, "temperatures", lambda v: isinstance(v, list) and len(v) >= 1 and all(
            _TEMPERATURE[0](t) for t in v) and (members is None or len(v) == len(members)),
            "a finite number > 0 per member")
        if members is not None and [float(t) for t in temps] != [m.temperatures[0] for m in members]:
            raise CalibrationError("temperatures", temps, "the members' own stored temperatures")
        flag = (lambda v: isinstance(v, bool), "true or false")
        shared = _checked(d, "shared", *flag)
        return cls(tuple(map(float, temps)), float(_checked(d, "threshold", *_THRESHOLD)),
                   _referral(d, required=True),
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
        the mean of the members' thresholds and the strictest of their referral rules
        (each fitted on its own member's split, so an approximation: shared False)."""
        rules = [c.referral for c in members]
        rule = (None if None in rules else
                dict(max(rules, key=lambda r: r["min_confidence"]), approximate=True))
        return cls(tuple(c.temperatures[0] for c in members),
                   float(np.mean([c.threshold for c in members])), rule,
                   fitted=all(c.fitted for c in members), shared=False)

    @property
    def is_ensemble(self) -> bool:
        return self.shared is not None

    def to_dict(self) -> dict:
        """The stored form (plain JSON types), which from_dict reads back."""
        if self.is_ensemble:
            core = dict(zip(_ENSEMBLE, (list(self.temperatures), self.ensemble_temperature,
                                        self.threshold, self.referral, self.shared, self.fitted)))
            return {**core, **{k: v for k, v in self.record.items() if k not in core}}
        out = dict(self.record)
        out.update(zip(_SINGLE, (self.temperatures[0], self.threshold, self.referral)))
        if self.referral is None:
            del out["referral"]
        return out

    def summary(self) -> dict:
        """The calibration in a results folder's run.json and an evaluation's metrics.json."""
        out = {"temperatures": list(self.temperatures)}
        if self.shared:
            out["ensemble_temperature"] = self.ensemble_temperature
        out.update(threshold=self.threshold, referral=self.referral)
        if self.is_ensemble:
            out["shared"] = self.shared
        return out

    def columns(self) -> dict:
        """The calibration columns of a prediction row."""
        return {"threshold": self.threshold, "temperature": list(self.temperatures)}

    def refitted(self, site: Calibration, fitted_on: str) -> Calibration:
        """This model's calibration with site's (fitted on its P(PNEUMONIA) as logits, one
        member) on top: its temperature multiplies the stored one (one model) or the
        ensemble temperature (shared from then on); its threshold and referral rule
        replace these."""
        record = dict(site.record, fitted_on=fitted_on)
        if not self.is_ensemble:
            t = site.temperatures[0] * self.temperatures[0]
            return replace(site, temperatures=(t,), record=record)
        return replace(self, ensemble_temperature=site.temperatures[0] * self.ensemble_temperature,
                       threshold=site.threshold, referral=site.referral, fitted=True, shared=True,
                       record={"fitted_on": fitted_on, "details": record})

    @property
    def sensitivity_promised(self) -> float | None:
        return self.record.get("sensitivity_promised", self.record.get("details", {}).get(
            "sensitivity_promised"))

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
        return self.decide(p)[0] == 1

    def referred(self, p):
        """Sent to a radiologist first by the referral rule: the confidence of the call is
        below the rule's cut (nothing, without a rule)."""
        conf = self.decide(p)[1]
        if self.referral is None:
            return np.zeros(np.shape(conf), dtype=bool)
        return conf < self.referral["min_confidence"]

    def answered(self, p) -> np.ndarray:
        return np.logical_not(self.referred(np.asarray(p)))

    @property
    def refers(self) -> bool:
        """Whether there is a referral rule."""
        return self.referral is not None

    def promise_kept(self, measured) -> dict | None:
        """The rule's promise beside the error measured among the films it answered
        (assess.selective's numbers); None without a rule."""
        return selective.promise_kept(measured, self.referral)

    # --- in words ----------------------------------------------------------------------

    def promise(self) -> str:
        """What the referral rule promises, in words ("" without one)."""
        return "" if self.referral is None else selective.promise_words(self.referral)

    def describe(self) -> str:
        """One line: what predict applies (its header)."""
        if not self.fitted and self.threshold == 0.5 and self.temperatures == (1.0,) * len(self.temperatures):
            return "uncalibrated: PNEUMONIA when P(PNEUMONIA) >= 0.5, no referral rule"
        if not self.fitted:  # an ensemble of calibrated and uncalibrated members
            return (f"members not all calibrated: temperature {self.temperature_words()} | "
                    f"threshold P(PNEUMONIA) >= {self.threshold:.3f} (the members' mean) | "
                    f"{self.rule_words(short=True)}")
        return (f"temperature {self.temperature_words()} | threshold P(PNEUMONIA) >= "
                f"{self.threshold:.3f} | {self.rule_words(short=True)}")

    def why_referred(self, p) -> str:
        """Why the rule refers a film with probability p, in plain words."""
        return selective.why_referred(self.referral, float(self.decide(p)[1]))

    def threshold_words(self) -> str:
        """The threshold's promise, as what it is."""
        if not self.fitted:
            return f"PNEUMONIA when P(PNEUMONIA) >= {self.threshold:.1%} (uncalibrated: no promise)"
        share = self.sensitivity_promised
        promise = (f" catches >= {share:.1%} of pneumonias on average over calibration sets like "
                   "the one it was fitted on (a given set can fall short)" if share else "")
        return f"PNEUMONIA when P(PNEUMONIA) >= {self.threshold:.1%}" + (":" + promise if share else "")

    def temperature_words(self, spec: str = ".4f") -> str:
        return ", ".join(format(t, spec) for t in self.temperatures)

    def rule_words(self, short: bool = False) -> str:
        """The referral rule, as the header (short), the report and training name it."""
        if self.referral is None:
            return "no referral rule" if short else "none"
        return selective.rule_words(self.referral, short)

    def caveat(self) -> str | None:
        """A note on how far to trust these cuts, or None."""
        if self.shared is False:
            rule = ("its referral rule the strictest of theirs" if self.referral else
                    "it has no referral rule (a member has none)")
            return (f"note: the ensemble's threshold is the mean of its members' own and {rule}, "
                    "each fitted on a different split; fit them on a shared labelled set with "
                    "visualize_results.py --recalibrate K --save-calibrated ENSEMBLE.pth")
        if self.fitted and self.referral is None:
            return ("note: this model's calibration has no referral rule (fitted before it "
                    "existed): python experiments/upgrade_checkpoint.py --calibrate-for MODEL")
        return None
