"""The referral rule: selective classification with guaranteed risk (cxr.selective.fit_referral)."""

import numpy as np
import pytest

from cxr import selective


@pytest.mark.parametrize("n", [1, 20, 500])
def test_bound_without_errors_is_the_exact_binomial_tail(n):
    # P(0 errors in n | rate b) = (1 - b)^n = delta  <=>  b = 1 - delta^(1/n)
    assert selective.risk_bound(0, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)


def test_bound_lies_above_the_observed_rate_and_shrinks_with_more_films():
    assert selective.risk_bound(4, 100, 0.1) > 0.04
    assert selective.risk_bound(40, 1000, 0.1) < selective.risk_bound(4, 100, 0.1)
    assert selective.risk_bound(0, 0, 0.1) == 1.0 and selective.risk_bound(5, 5, 0.1) == 1.0


def _films(n, rng):
    """Confidences in [0.5, 1] and errors whose rate falls from 30% to 0 with confidence."""
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) >= 0.3 * (1 - conf) / 0.5 * (conf < 0.8)
    return conf, correct


def test_the_cut_answers_exactly_the_films_at_or_above_it_and_certifies_the_target():
    conf, correct = _films(2000, np.random.default_rng(0))
    r = selective.fit_referral(conf, correct, risk=0.02, delta=0.1)
    answered = conf >= r["min_confidence"]
    assert r["answered"] == answered.sum() and r["errors"] == (~correct[answered]).sum()
    assert 0.3 < r["coverage_fitted"] < 1 and r["bound"] < 0.02
    assert r["bound"] == selective.risk_bound(r["errors"], r["answered"], 0.1 / np.ceil(np.log2(2000)))


def test_too_few_films_to_certify_refer_every_film():
    conf, correct = _films(40, np.random.default_rng(1))
    r = selective.fit_referral(conf, correct, risk=0.02, delta=0.1)
    assert r["min_confidence"] > 1 and r["answered"] == 0
    assert selective.fit_referral([], [], 0.02, 0.1)["answered"] == 0


def test_the_promise_holds_over_calibration_sets():
    """Fitted on 300 films, the true error among answered films (on 20,000 new films from
    the same source) exceeds the target in at most delta of 200 fits (plus sampling slack);
    the empirical-risk cut, with no bound, exceeds it far more often."""
    rng = np.random.default_rng(2)
    new_conf, new_correct = _films(20000, rng)
    over = over_plain = 0
    for _ in range(200):
        conf, correct = _films(300, rng)
        cut = selective.fit_referral(conf, correct, risk=0.05, delta=0.1)["min_confidence"]
        answered = new_conf >= cut
        over += answered.any() and (~new_correct[answered]).mean() > 0.05
        order = np.sort(conf)  # the most films whose error on the fitted films is <= 5%
        plain = next(c for c in order if (~correct[conf >= c]).mean() <= 0.05)
        over_plain += (~new_correct[new_conf >= plain]).mean() > 0.05
    assert over <= 0.1 * 200 + 8
    assert over_plain > 60


def test_the_words_never_overstate_the_rule():
    """A rule that certified no cut says its search found none (not that no cut exists);
    an ensemble's borrowed rule promises nothing; a certified rule states its promise with
    its probability and the films it holds for."""
    rule = {"target_risk": 0.04, "delta": 0.1, "films": 150, "min_confidence": 2.0,
            "answered": 0, "errors": 0, "bound": 1.0}
    assert "none of the cuts the rule's search tried" in selective.why_referred(rule, 0.9)
    assert "refers every film" in selective.rule_words(rule)
    assert selective.promise_words(dict(rule, approximate=True)).startswith("nothing certified")
    certified = dict(rule, min_confidence=0.8, answered=140, bound=0.03)
    words = selective.why_referred(certified, 0.7)
    assert "70.0% for its call" in words and "80.00%" in words
    assert "<= 4% with probability >= 90%, on films like the 150 it was fitted on" in words
