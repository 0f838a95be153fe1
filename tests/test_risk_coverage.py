"""The risk-coverage curve, AURC, the referral rule against "refer the least confident"
and its promise beside what was measured:
cxr.assess against hand computations (with ties in confidence) and a brute-force
definition, and visualize_results.py's metrics.json against the same definition
computed here from its predictions.csv."""

import csv
import html
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_folder, run_script
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from cxr import assess, calib, scoring

# Six films, confidences with two tie groups (0.9 and 0.7) that each hold an error.
CORRECT = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
CONF = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.6])


def brute_force_aurc(correct, conf):
    """The definition, film by film: the error among the films at least as confident as
    film i (they are answered together), averaged over the films."""
    return np.mean([np.mean(~correct[conf >= c]) for c in conf])


def test_curve_and_aurc_by_hand_with_ties():
    """Coverage and risk at each distinct confidence, a tie group answered at once:
    0.9 -> 2 films, 1 error; 0.8 -> 3, 1; 0.7 -> 5, 2; 0.6 -> 6, 2."""
    cov, risk = assess.risk_coverage_curve(CORRECT, CONF)
    assert cov == pytest.approx([2 / 6, 3 / 6, 5 / 6, 1])
    assert risk == pytest.approx([1 / 2, 1 / 3, 2 / 5, 1 / 3])
    # AURC: 2/6 * 1/2 + 1/6 * 1/3 + 2/6 * 2/5 + 1/6 * 1/3 = 37/90
    assert assess.aurc(CORRECT, CONF) == pytest.approx(37 / 90)
    # oracle: the 4 correct films first, then the 2 errors: (1/5 + 2/6) / 6 = 8/90
    assert assess.aurc_oracle(CORRECT) == pytest.approx(8 / 90)
    # the order of the films within a tie group changes nothing
    swap = [1, 0, 2, 4, 3, 5]
    assert assess.aurc(CORRECT[swap], CONF[swap]) == pytest.approx(37 / 90)


def test_aurc_rewards_confidence_that_ranks_errors_last():
    """Errors at the lowest confidence give the oracle AURC; at the highest, far more."""
    correct = np.array([1, 1, 1, 0, 0], dtype=bool)
    low = np.array([0.99, 0.95, 0.9, 0.6, 0.55])
    assert assess.aurc(correct, low) == pytest.approx(assess.aurc_oracle(correct))
    assert assess.aurc(correct, low) == pytest.approx((1 / 4 + 2 / 5) / 5)
    high = low[::-1]
    # errors answered first: risks 1, 1, 2/3, 2/4, 2/5
    assert assess.aurc(correct, high) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4 + 2 / 5) / 5)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=40))
def test_aurc_is_the_definition_and_never_below_the_oracle(films):
    """Any labels and (heavily tied) confidences: AURC is the film-by-film definition,
    at least the oracle AURC, and the risk at full coverage is the error rate."""
    correct = np.array([c for c, _ in films], dtype=bool)
    conf = np.array([0.5 + k / 10 for _, k in films])
    value, oracle = assess.aurc(correct, conf), assess.aurc_oracle(correct)
    assert value == pytest.approx(brute_force_aurc(correct, conf))
    assert oracle <= value + 1e-12
    cov, risk = assess.risk_coverage_curve(correct, conf)
    assert cov[-1] == 1 and risk[-1] == pytest.approx(np.mean(~correct))
    assert np.all(np.diff(cov) > 0)


def test_referral_against_least_confident_at_equal_coverage():
    """A referral that refers films 2 and 5 answers both errors (films 1 and 4). Referring
    the least confident at the same coverage (4 answered) refers film 5 and one of the
    tied films 3 and 4 (file order keeps film 3): it answers one error."""
    y = np.array([0, 1, 0, 1, 1, 0])
    answered = np.array([1, 1, 0, 1, 1, 0], dtype=bool)
    rc = assess.risk_coverage(y, CORRECT, CONF, answered)
    bl = rc["referral_vs_least_confident"]
    assert bl["answered"] == bl["rule"]["answered"] == bl["least_confident"]["answered"] == 4
    assert bl["least_confident"]["coverage"] == bl["rule"]["coverage"] == pytest.approx(4 / 6)
    assert assess.least_confident_referred(CONF, 4).tolist() == [1, 1, 1, 1, 0, 0]
    assert bl["rule"]["risk"] == pytest.approx(2 / 4)  # films 1 and 4 are errors, both answered
    assert bl["least_confident"]["risk"] == pytest.approx(1 / 4)
    assert bl["rule"]["per_class"]["PNEUMONIA"] == pytest.approx({"coverage": 1.0, "risk": 2 / 3})
    assert bl["least_confident"]["per_class"]["NORMAL"] == pytest.approx({"coverage": 2 / 3, "risk": 0})
    assert bl["better"] == "referring the least confident"
    assert rc["risk_full_coverage"] == pytest.approx(2 / 6)
    assert rc["risk_coverage_by_class"]["PNEUMONIA"]["aurc"] == pytest.approx(
        brute_force_aurc(CORRECT[y == 1], CONF[y == 1]))
    assert rc["referral_promise"] is None  # no rule, no promise
    everything = assess.risk_coverage(y, CORRECT, CONF, np.ones(6, dtype=bool))
    assert everything["referral_vs_least_confident"]["better"] == "neither"
    assert "refers no film" in everything["referral_vs_least_confident"]["verdict"]


def rule(target_risk):
    return {"target_risk": target_risk, "delta": 0.1, "films": 500, "min_confidence": 0.75}


@pytest.mark.parametrize("target, within, words", [
    # P(>= 2 errors of 4 | 4%) = 1 - 0.96^4 - 4 * 0.04 * 0.96^3 = 0.0091
    (0.04, False, "here 50.0% on the 66.7% answered, above it beyond chance (p = 0.0091)"),
    # P(>= 2 errors of 4 | 30%) = 1 - 0.7^4 - 4 * 0.3 * 0.7^3 = 0.35
    (0.30, False, "here 50.0% on the 66.7% answered, above it but within chance for 4 films (p = 0.35)"),
    (0.50, True, "here 50.0% on the 66.7% answered: within the promise"),
])
def test_the_referral_promise_beside_what_was_measured(target, within, words):
    """The promise (error among answered films <= the target) against the error among the
    films answered here (2 of 4), with the one-sided binomial test of an excess at the
    target rate; the words say whether an excess is beyond chance."""
    y = np.array([0, 1, 0, 1, 1, 0])
    answered = np.array([1, 1, 0, 1, 1, 0], dtype=bool)
    cal = calib.Calibration(referral=rule(target))
    promise = assess.risk_coverage(y, CORRECT, CONF, answered, cal)["referral_promise"]
    expected_p = 1 - (1 - target) ** 4 - 4 * target * (1 - target) ** 3
    assert promise["p_value_above_target"] == pytest.approx(expected_p)
    assert promise["measured_risk"] == pytest.approx(0.5) and promise["answered"] == 4
    assert promise["coverage"] == pytest.approx(4 / 6)
    assert (promise["target_risk"], promise["delta"]) == (target, 0.1)
    assert promise["within_promise"] is within
    assert words in promise["verdict"]
    assert f"promised error among answered films <= {target:.0%} with probability >= 90%, " \
           "on films like the 500 it was fitted on; here" in promise["verdict"]
    none = assess.risk_coverage(y, CORRECT, CONF, np.zeros(6, dtype=bool), cal)
    assert none["referral_promise"]["within_promise"] is False
    assert "here no film was answered" in none["referral_promise"]["verdict"]


def test_visualize_metrics_hold_the_risk_coverage_of_its_predictions(calibrated, tmp_path):
    """metrics.json's AURC, oracle, full-coverage risk, rule-vs-least-confident numbers
    and the referral rule's promise beside what was measured equal the definition
    computed here from predictions.csv (labels, decisions, referrals) and the in-process
    confidences of the calibrated fixture."""
    run_script("visualize_results.py", "--model", calibrated.path, "--split", TINY / "test",
               "--out", tmp_path, "--bootstrap", 5, "--gallery", 0)
    out = run_folder(tmp_path)
    rows = {Path(r["file"]).name: r for r in csv.DictReader(open(out / "predictions.csv"))}
    metrics = json.loads((out / "metrics.json").read_text())
    names = [f.name for f in calibrated.files]
    _, conf = scoring.decide(calibrated.prob, calibrated.threshold)
    correct = np.array([rows[n]["correct"] == "1" for n in names])
    answered = np.array([rows[n]["referred"] == "0" for n in names])
    y = np.array([rows[n]["label"] == "PNEUMONIA" for n in names])
    # the premise: errors to rank, referred films, confidences without ties
    assert 1 <= (~correct).sum() and 1 <= (~answered).sum() < len(names)
    assert np.min(np.diff(np.sort(conf))) > 1e-6
    assert (~answered == calibrated.referred()).all()  # the stored rule's referrals
    assert metrics["aurc"] == pytest.approx(brute_force_aurc(correct, conf), abs=1e-12)
    n, e = len(names), int((~correct).sum())
    oracle = np.mean([max(0, i - (n - e)) / i for i in range(1, n + 1)])
    assert metrics["aurc_oracle"] == pytest.approx(oracle, abs=1e-12)
    assert metrics["risk_full_coverage"] == pytest.approx(e / n)
    bl = metrics["referral_vs_least_confident"]
    k = int(answered.sum())
    top = np.argsort(-conf)[:k]  # the k most confident films
    assert bl["answered"] == k
    assert bl["rule"]["risk"] == pytest.approx(np.mean(~correct[answered]))
    assert bl["rule"]["answered"] == bl["least_confident"]["answered"] == k
    assert bl["least_confident"]["risk"] == pytest.approx(np.mean(~correct[top]))
    for cls, name in ((False, "NORMAL"), (True, "PNEUMONIA")):
        share = np.isin(np.flatnonzero(y == cls), top).mean()
        assert bl["least_confident"]["per_class"][name]["coverage"] == pytest.approx(share)
        assert bl["rule"]["per_class"][name]["coverage"] == pytest.approx(answered[y == cls].mean())
        if (answered & (y == cls)).any():
            assert bl["rule"]["per_class"][name]["risk"] == pytest.approx(
                np.mean(~correct[answered & (y == cls)]))
        assert metrics["risk_coverage_by_class"][name]["aurc"] == pytest.approx(
            brute_force_aurc(correct[y == cls], conf[y == cls]), abs=1e-12)
    # the promise of the stored rule, beside the error among the films it answered here
    promise, stored = metrics["referral_promise"], metrics["referral"]
    errors = int((~correct[answered]).sum())
    assert promise["target_risk"] == stored["target_risk"] and promise["delta"] == stored["delta"]
    assert promise["measured_risk"] == pytest.approx(errors / k)
    assert promise["coverage"] == pytest.approx(k / n) and promise["answered"] == k
    assert promise["p_value_above_target"] == pytest.approx(binom.sf(errors - 1, k, stored["target_risk"]))
    assert promise["within_promise"] == (errors / k <= stored["target_risk"])
    report = (out / "report.html").read_text()
    assert "Read the figure" in report and bl["verdict"] in report
    assert html.escape(f"Referral rule: {promise['verdict']}", quote=False) in report


@pytest.mark.parametrize("cal", [calib.Calibration(), calib.Calibration.from_dict(
    {"temperature": 1.0, "threshold": 0.4, "uncertain_band": [0.1, 0.9]})], ids=["uncalibrated", "old"])
def test_without_a_rule_nothing_is_said_of_one(cal):
    """An uncalibrated model, or one calibrated before the referral rule existed: no
    rule-against-least-confident comparison, no promise, and the report says every film
    is answered (not "the referral rule refers no film")."""
    y = np.array([0, 1, 0, 1, 1, 0])
    rc = assess.risk_coverage(y, CORRECT, CONF, cal.answered(CONF), cal)
    assert rc["referral_vs_least_confident"] is None and rc["referral_promise"] is None
    text = assess.risk_coverage_text(rc)
    assert "No referral rule" in text and "every film is answered" in text
    assert "referral rule refers" not in text and "least confident" not in text
