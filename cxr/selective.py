"""The referral rule: selective classification with a guaranteed risk. A film is answered
only when the confidence of the call is at or above a cut fitted on labelled films so
that the error among the films answered stays at or below a stated level, with a stated
probability over the sets it could have been fitted on; and whether the films of an
evaluation keep that promise.
"""

from __future__ import annotations

import numpy as np

# The referral rule: answer a film only when the model is confident enough that the error
# among the films it answers stays at or below REFERRAL_RISK, with probability >= 1 -
# REFERRAL_DELTA over calibration sets like the one it was fitted on (fit_referral).
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
    above 1 (every film referred). The promise is nominal in two ways: the films are
    counted as independent (a patient's films are not), and the confidence is taken as
    fixed, though its temperature and threshold were fitted on the same films."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    m = len(conf)
    ranked = np.sort(conf)
    steps = max(1, int(np.ceil(np.log2(m)))) if m else 0
    lo, hi, kept = 0, m - 1, None
    for _ in range(steps):
        z = int(np.ceil((lo + hi) / 2))
        cut = float(ranked[z])
        answered = conf >= cut
        n, errors = int(answered.sum()), int((~correct[answered]).sum())
        bound = risk_bound(errors, n, delta / steps)
        if bound < risk:  # later cuts are lower: each one kept answers at least as many films
            kept = {"min_confidence": cut, "answered": n, "errors": errors, "bound": bound}
            hi = z
        else:
            lo = z
    kept = kept or {"min_confidence": 2.0, "answered": 0, "errors": 0, "bound": 1.0}
    return {"rule": "SGR (Geifman & El-Yaniv 2017)", "target_risk": risk, "delta": delta,
            "films": m, "coverage_fitted": kept["answered"] / m if m else 0.0, **kept}

def promise_kept(measured, referral) -> dict | None:
    """The referral rule's promise (error among answered films <= its target, with
    probability >= 1 - delta, on films like those it was fitted on) beside the error
    measured here, and whether the excess, if any, is beyond chance (one-sided binomial
    test of the errors among the answered films at the target rate, p < 0.05); None
    without a rule."""
    from scipy.stats import binom  # scipy is installed with scikit-learn

    if referral is None:
        return None
    risk, target, n, errors = (measured["risk"], referral["target_risk"], measured["answered"],
                               measured["errors"])
    p_value = float(binom.sf(errors - 1, n, target)) if n else float("nan")
    if not n:
        seen = "here no film was answered"
    elif risk <= target:
        seen = f"here {risk:.1%} on the {measured['coverage']:.1%} answered: within the promise"
    elif p_value < 0.05:
        seen = (f"here {risk:.1%} on the {measured['coverage']:.1%} answered, above it beyond chance "
                f"(p = {p_value:.2g}): these films differ from those (another site?), or this fit "
                f"is one of the up to {referral['delta']:.0%} the promise allows to fail")
    else:
        seen = (f"here {risk:.1%} on the {measured['coverage']:.1%} answered, above it but within "
                f"chance for {n} films (p = {p_value:.2g})")
    words = f"promised {promise_words(referral)}; " + seen
    return {"target_risk": target, "delta": referral["delta"], "measured_risk": risk,
            "coverage": measured["coverage"], "answered": n, "p_value_above_target": p_value,
            "within_promise": bool(n and risk <= target), "verdict": words}


# The rule in words: what predict, the report and training print.

def promise_words(rule: dict) -> str:
    """What a stored rule promises."""
    if rule.get("approximate"):
        return ("nothing certified for this ensemble: the strictest of its members' cuts, each "
                "fitted on its own member")
    return (f"error among answered films <= {rule['target_risk']:.0%} with probability >= "
            f"{1 - rule['delta']:.0%}, on films like the {rule['films']} it was fitted on")

def why_referred(rule: dict, conf: float) -> str:
    """Why the rule refers a film whose call has this confidence."""
    if rule["min_confidence"] > 1:
        return (f"none of the cuts the rule's search tried on its {rule['films']} labelled films "
                "could be certified, so it refers every film")
    return (f"the model is not sure enough ({conf:.1%} for its call; it answers from "
            f"{rule['min_confidence']:.2%}, where its {promise_words(rule)})")

def rule_words(rule: dict, short: bool = False) -> str:
    """The rule in one phrase (short: the header's) or in full."""
    if rule["min_confidence"] > 1:
        return (f"refers every film (no cut its search tried was certified at "
                f"{rule['target_risk']:.0%} on {rule['films']} films)")
    if short:
        return (f"answers when confidence >= {rule['min_confidence']:.4f} (see the referral rule "
                "below)")
    return (f"answer when the confidence of the call is >= {rule['min_confidence']:.4f} (SGR: "
            f"{promise_words(rule)}; {rule['answered']} of them answered, bound {rule['bound']:.2%})")
