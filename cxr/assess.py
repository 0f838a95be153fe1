"""Every number of an evaluation on labelled images, from labels and probabilities:
metrics at the stored threshold and at 0.5 with bootstrap intervals, the calibration
check, error analysis, the referral rule's coverage and error per class beside what it
promised; and those numbers as plain JSON.
"""

from __future__ import annotations

import numpy as np

from cxr import network, scoring


def evaluate(y, p, cal, n_boot, p_at_t1, groups=None) -> dict:
    """Every number of the report, from labels y and probabilities p (and p_at_t1, the
    same members' probabilities at temperature 1, to see what the temperature does)."""
    from sklearn.metrics import confusion_matrix  # scikit-learn costs 1.5 s at start-up

    thr = cal.threshold
    pred, conf = cal.decide(p)
    correct = pred == y
    answered = cal.answered(p)
    pred_half, conf_half = scoring.decide(p, 0.5)
    conf_t1 = np.where(pred == 1, p_at_t1, 1 - p_at_t1)  # the same decisions, stated at T = 1
    ece = scoring.expected_calibration_error(correct, conf)[0]
    ci_half, ci_thr = scoring.bootstrap_ci(y, p, (0.5, thr), n_boot, groups=groups)  # same resamples
    return {
        "n": int(len(y)), "counts": np.bincount(y, minlength=2).tolist(),
        "pred": pred, "conf": conf, "correct": correct, "answered": answered,
        "at_0.5": scoring.binary_metrics(y, p, 0.5), "at_threshold": scoring.binary_metrics(y, p, thr),
        "ci95_at_0.5": ci_half, "ci95_at_threshold": ci_thr,
        "bootstrap": "by patient" if groups is not None else "by image",
        "ece_at_0.5": scoring.expected_calibration_error(pred_half == y, conf_half)[0],
        "ece": ece,
        "calibration_check": {
            "ece_variant": f"top-label, {scoring.ECE_BINS} equal-width bins, correct = the decision "
                           "at the stored threshold",
            "ece": ece,
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
        **risk_coverage(y, correct, conf, answered, cal),
    }

def risk_coverage_curve(correct, conf):
    """The risk-coverage curve of selective classification (Geifman & El-Yaniv 2017,
    "Selective classification for deep neural networks"): answer only the films whose
    confidence (the calibrated probability of the predicted class) is >= a cut, most
    confident first; coverage = share answered, selective risk = error among them.
    One point per distinct confidence: films with equal confidence are answered together.
    Returns (coverage, risk) arrays, coverage increasing to 1."""
    correct, conf = np.asarray(correct, dtype=bool), np.asarray(conf, dtype=float)
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(~correct[order])
    last = np.r_[np.flatnonzero(np.diff(conf[order]) != 0), len(conf) - 1]  # end of each tie
    n = last + 1
    return n / len(conf), errors[last] / n

def aurc(correct, conf) -> float:
    """Area under the risk-coverage curve (AURC, Geifman, Uziel & El-Yaniv 2019; Ding et
    al. 2020): the mean over films of the selective risk when every film at least as
    confident as it is answered, i.e. the curve as a step function of coverage (in steps
    of 1/n, a tie group as one step). Lower is better; 0 only without errors."""
    cov, risk = risk_coverage_curve(correct, conf)
    return float(np.sum(np.diff(np.r_[0.0, cov]) * risk))

def aurc_oracle(correct) -> float:
    """The AURC of the best possible ranking of the same errors: every correct film
    answered before every error (the lower bound; AURC - this is Ding et al.'s E-AURC)."""
    n = len(correct)
    i = np.arange(1, n + 1)  # films answered; the errors come after the n - e correct ones
    return float(np.mean(np.maximum(0, i - int(np.sum(correct))) / i)) if n else float("nan")

def least_confident_referred(conf, n_answered: int) -> np.ndarray:
    """Which films "refer the least confident" answers when it answers n_answered of
    them: the most confident ones (equal confidences in file order)."""
    answered = np.zeros(len(conf), dtype=bool)
    answered[np.argsort(-np.asarray(conf, dtype=float), kind="stable")[:n_answered]] = True
    return answered

def selective(y, correct, answered) -> dict:
    """Coverage and selective risk of a set of answered films, overall and per true class."""
    def risk(m):
        return float((~correct[m]).mean()) if m.any() else float("nan")
    return {"coverage": float(answered.mean()), "answered": int(answered.sum()),
            "errors": int((~correct[answered]).sum()), "risk": risk(answered), "per_class": {
        name: {"coverage": float(answered[y == k].mean()) if (y == k).any() else float("nan"),
               "risk": risk(answered & (y == k))} for k, name in enumerate(network.CLASS_NAMES)}}

def risk_coverage(y, correct, conf, answered, cal=None) -> dict:
    """The risk-coverage summary of an evaluation: AURC beside the oracle AURC and the
    error at full coverage, overall and per true class; the referral rule (films answered:
    confidence at or above its cut) against "refer the least confident" at equal coverage;
    and, given the Calibration (cal), what its rule promised beside what these films show
    (both None when it has no rule)."""
    y, correct, conf = np.asarray(y), np.asarray(correct, dtype=bool), np.asarray(conf, dtype=float)
    lc = least_confident_referred(conf, int(answered.sum()))
    rule, least = selective(y, correct, answered), selective(y, correct, lc)
    n, er, el = int(answered.sum()), int((~correct[answered]).sum()), int((~correct[lc]).sum())
    better = ("the referral rule" if er < el else "referring the least confident" if el < er
              else "neither")
    verdict = (f"At equal coverage ({n} of {len(y)} films answered), the referral rule leaves "
               f"{er} error{'s' * (er != 1)} among them, referring the least confident films {el}: "
               + (f"{better} is better on these films." if er != el else "both are equally good."))
    if n == len(y) or n == 0:
        verdict = (f"The referral rule {'refers no' if n else 'answers no'} film here: there is "
                   "nothing to compare.")
    compared = {"answered": n, "rule": rule, "least_confident": least, "better": better,
                "verdict": verdict}
    return {"aurc": aurc(correct, conf), "aurc_oracle": aurc_oracle(correct),
            "risk_full_coverage": float((~correct).mean()),
            "risk_coverage_by_class": {
                name: {"aurc": aurc(correct[y == k], conf[y == k]),
                       "aurc_oracle": aurc_oracle(correct[y == k]),
                       "risk_full_coverage": float((~correct[y == k]).mean())}
                if (y == k).any() else None for k, name in enumerate(network.CLASS_NAMES)},
            "referral_vs_least_confident": compared if cal is None or cal.refers else None,
            "referral_promise": cal.promise_kept(rule) if cal is not None else None}

def risk_coverage_text(m) -> str:
    """The risk-coverage lines of the console and the report, from evaluate's numbers."""
    def cell(s):
        return f"{s['risk']:.2%} on {s['coverage']:.1%}" if np.isfinite(s["risk"]) else "none answered"

    bl, promise = m["referral_vs_least_confident"], m["referral_promise"]
    lines = [f"Risk-coverage (the most confident answered first): AURC {m['aurc']:.4f}, oracle AURC "
             f"{m['aurc_oracle']:.4f}, error at full coverage {m['risk_full_coverage']:.4f}"]
    if bl is None:
        return "\n".join([*lines, "  No referral rule (uncalibrated, or fitted before the rule "
                                   "existed): every film is answered."]) + "\n"
    lines.append("  Error among the answered films, on the share answered:")
    for name, s in (("referral rule", bl["rule"]), ("refer the least confident", bl["least_confident"])):
        lines.append(f"    {name:<26} all {cell(s)}; " + ", ".join(
            f"{c} {cell(v)}" for c, v in s["per_class"].items() if np.isfinite(v["coverage"])))
    return "\n".join([*lines, f"  {bl['verdict']}", f"  Referral rule: {promise['verdict']}"]) + "\n"

def record(m, cal, source, model_paths, skipped, adapted, shift, recal) -> dict:
    """metrics.json of an evaluation (plain JSON): where the numbers come from, the
    calibration used, every number of evaluate(m) but the per-image arrays, the skipped
    files, the protocol, the site-shift report and the local recalibration."""
    keep = {k: v for k, v in m.items() if k not in ("pred", "conf", "correct", "answered")}
    return json_safe({
        "data": source, "models": [str(x) for x in model_paths], **cal.summary(), **keep,
        "skipped": skipped, "protocol": "label-free adaptation (AdaBN on these images)" if adapted
        else "zero-shot (nothing fitted on these images)",
        "site_shift": {k: v for k, v in (shift or {}).items() if k not in ("scores", "flag")},
        "recalibration": recal})

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
