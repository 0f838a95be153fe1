"""The numbers behind the reports, on small arrays worked out by hand: ECE, the
bootstrap intervals, the metrics at a threshold, calibration fitting and the
learning-rate schedule. Each test names the bug it guards against."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import train_cxray
from cxr import calib, engine, network, recipes, scoring, selective
from cxr.scoring import binary_metrics, bootstrap_ci, expected_calibration_error
from cxr.scoring import decide as confidence_of_prediction

# --- expected calibration error --------------------------------------------------------


def test_ece_weights_each_bin_by_its_share_of_images():
    """Guards against an unweighted ECE (mean or sum of the bins' gaps).

    8 images at confidence 0.95, 6 right: gap |0.75 - 0.95| = 0.20, weight 8/10.
    2 images at confidence 0.55, both right: gap |1.00 - 0.55| = 0.45, weight 2/10.
    ECE = 0.8 * 0.20 + 0.2 * 0.45 = 0.25 (unweighted mean 0.325, sum 0.65)."""
    conf = np.array([0.95] * 8 + [0.55] * 2)
    correct = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    ece, rows = expected_calibration_error(correct, conf)
    assert ece == pytest.approx(0.25, abs=1e-12)
    assert [(n, acc, c) for _, _, acc, c, n in rows] == [
        (2, pytest.approx(1.0), pytest.approx(0.55)), (8, pytest.approx(0.75), pytest.approx(0.95))]


def test_ece_bins_are_equal_width_and_right_closed():
    """Guards against wrong bin edges: 15 bins of width 1/15, (lo, hi]; a confidence of
    exactly 1 belongs to the last bin, and 0.6 = 9/15 to the bin (8/15, 9/15]."""
    conf = np.array([1.0, 0.6, 0.6000001, 0.5])
    correct = np.array([1, 1, 0, 1], dtype=bool)
    ece, rows = expected_calibration_error(correct, conf)
    edges = [(round(lo * 15), round(hi * 15), n) for lo, hi, _, _, n in rows]
    assert edges == [(7, 8, 1), (8, 9, 1), (9, 10, 1), (14, 15, 1)]
    # per image: |1 - 0.5|, |1 - 0.6|, |0 - 0.6000001|, |1 - 1|, each weight 1/4
    assert ece == pytest.approx((0.5 + 0.4 + 0.6000001 + 0.0) / 4, abs=1e-12)


def test_ece_is_zero_when_confidence_matches_accuracy():
    conf = np.array([0.75] * 4 + [0.9] * 10)
    correct = np.array([1, 1, 1, 0] + [1] * 9 + [0], dtype=bool)
    assert expected_calibration_error(correct, conf)[0] == pytest.approx(0.0, abs=1e-12)


def test_confidence_is_that_of_the_predicted_class_at_the_threshold():
    """Guards against confidence taken at 0.5 instead of the stored threshold."""
    pred, conf = confidence_of_prediction(np.array([0.2, 0.65, 0.7, 0.9]), 0.7)
    assert pred.tolist() == [0, 0, 1, 1]
    assert conf == pytest.approx([0.8, 0.35, 0.7, 0.9])


# --- metrics at a threshold and their bootstrap intervals --------------------------------


def test_binary_metrics_at_a_threshold_by_hand():
    """Guards against '>' for '>=' at the threshold and swapped sensitivity/specificity.

    threshold 0.7: predictions 0 0 1 | 0 1 1 1 (0.7 itself is positive)
    NORMAL: 2 of 3 right (specificity 2/3); PNEUMONIA: 3 of 4 (sensitivity 3/4)."""
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.69, 0.7, 0.3, 0.7, 0.8, 0.95])
    m = binary_metrics(y, p, 0.7)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    # AUC: of the 12 (positive, negative) pairs 9 are ranked right, 1 is a tie (0.7, 0.7)
    # and 2 are wrong (0.3 below 0.69 and 0.7)
    assert m["auc"] == pytest.approx((9 + 0.5) / 12)


def test_weighted_metrics_equal_the_metrics_of_images_repeated_by_their_weight():
    """Importance-weighted validation: an integer weight k must count an image as k
    copies of it, in every measure (a weight dropped from one of them fails here)."""
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.69, 0.7, 0.3, 0.7, 0.8, 0.95])
    w = np.array([3, 1, 2, 4, 1, 1, 2])
    weighted = binary_metrics(y, p, 0.7, sample_weight=w)
    repeated = binary_metrics(np.repeat(y, w), np.repeat(p, w), 0.7)
    assert weighted == pytest.approx(repeated)
    assert weighted != pytest.approx(binary_metrics(y, p, 0.7))


def test_bootstrap_is_the_2_5_and_97_5_percentiles_of_resamples_with_replacement():
    """Guards against resampling without replacement (intervals collapse to a point),
    other percentiles, or a resample of the wrong size: the procedure, spelled out.

    40 images whose classes overlap: every measure takes many values over the resamples,
    so the 5th and the 2.5th percentile differ (on 10 images accuracy moves in tenths
    and both percentiles can land on the same tenth)."""
    y = np.r_[np.zeros(15, int), np.ones(25, int)]
    p = np.r_[np.linspace(0.05, 0.62, 15), np.linspace(0.31, 0.97, 25)]
    ci = bootstrap_ci(y, p, 0.5, 300, seed=3)
    rng = np.random.default_rng(3)
    draws = {k: [] for k in ("accuracy", "sensitivity", "specificity", "auc")}
    for _ in range(300):
        idx = rng.integers(0, 40, 40)
        m = binary_metrics(y[idx], p[idx], 0.5)
        for k in draws:
            if np.isfinite(m[k]):
                draws[k].append(m[k])
    assert set(ci) == set(draws)
    for k, v in draws.items():
        assert ci[k] == pytest.approx([np.percentile(v, 2.5), np.percentile(v, 97.5)]), k
        assert np.percentile(v, 5) != pytest.approx(np.percentile(v, 2.5)), k  # premise
        lo, hi = ci[k]
        assert lo < hi


def test_bootstrap_width_matches_the_binomial_standard_error():
    """200 images, 160 right: the 95% interval of the accuracy is about
    +- 1.96 * sqrt(0.8 * 0.2 / 200) = +- 0.055 around 0.8."""
    y = np.array([0, 1] * 100)
    p = np.where(np.arange(200) < 160, y * 0.8 + 0.1, 0.9 - y * 0.8)  # first 160 right
    lo, hi = bootstrap_ci(y, p, 0.5, 400)["accuracy"]
    assert lo < 0.8 < hi
    assert 0.09 < hi - lo < 0.13, (lo, hi)


def test_bootstrap_of_a_perfect_classifier_is_a_point():
    y = np.array([0, 1] * 10)
    ci = bootstrap_ci(y, y * 0.6 + 0.2, 0.5, 50)
    assert ci["accuracy"] == ci["sensitivity"] == ci["specificity"] == [1.0, 1.0]


# --- calibration fitting ----------------------------------------------------------------

# Five groups of 40 images whose logit margins are 2 * logit(q): at temperature 2 every
# group's probability equals its share of positives q, so the NLL is smallest at T = 2.
QS = [0.05, 0.2, 0.5, 0.8, 0.95]


def calibration_data():
    margins, labels = [], []
    for q in QS:
        m = 2 * math.log(q / (1 - q))
        pos = round(40 * q)
        margins += [m] * 40
        labels += [1] * pos + [0] * (40 - pos)
    logits = torch.tensor([[0.0, m] for m in margins])
    return logits, np.array(labels)


def test_fit_calibration_temperature_minimises_the_nll():
    """Guards against logits * T for logits / T, and argmax for argmin: the fitted
    temperature is the grid point (400 log-spaced in TEMPERATURE_RANGE) nearest the true
    2, and it is kept because it also lowers the NLL on rows it was not fitted on."""
    logits, y = calibration_data()
    cal = calib.fit_calibration(logits, y)
    grid = np.exp(np.linspace(*np.log(calib.TEMPERATURE_RANGE), 400))
    assert cal["temperature"] == pytest.approx(grid[np.argmin(abs(np.log(grid / 2)))], rel=1e-9)
    assert abs(math.log(cal["temperature"] / 2)) < 0.0036  # within half a grid step
    assert cal["temperature_kept"]
    nll = nn.functional.cross_entropy(logits / cal["temperature"], torch.as_tensor(y)).item()
    assert cal["nll_at_temperature"] == pytest.approx(nll, rel=1e-6)
    assert cal["nll_at_1"] == pytest.approx(
        nn.functional.cross_entropy(logits, torch.as_tensor(y)).item(), rel=1e-6)
    assert cal["nll_at_temperature"] < cal["nll_at_1"]


def test_a_temperature_that_does_not_help_out_of_sample_is_not_kept():
    """Five patients: four perfectly separated at margin 2, one entirely wrong. On all
    rows the best temperature is about 1.6, but fitted on any four patients it does worse
    on the fifth than T = 1 (cross-fitted), so T = 1 is used."""
    margins, labels, groups = [], [], []
    for g in range(5):
        for label in (0, 1):
            margin = 2.0 if label == 1 else -2.0
            margins += [-margin if g == 4 else margin] * 20
            labels += [label] * 20
            groups += [g] * 20
    logits = torch.tensor([[0.0, m] for m in margins])
    cal = calib.fit_calibration(logits, np.array(labels), np.array(groups))
    assert abs(math.log(cal["temperature_fitted"])) > 0.2
    assert not cal["temperature_kept"] and cal["temperature"] == 1.0
    assert cal["nll_cross_fitted"]["fitted"] > cal["nll_cross_fitted"]["T1"]


def test_fit_calibration_threshold_follows_its_rule():
    """Guards against a wrong quantile or the wrong class in the threshold.

    Positives: 2 at q=0.05, 8 at 0.2, 20 at 0.5, 32 at 0.8, 38 at 0.95 (100).
    Threshold: the highest with sensitivity >= 0.97 -> 0.2 (98 of 100 above; at 0.5
    only 90). The bootstrap medians land on the same level."""
    logits, y = calibration_data()
    cal = calib.fit_calibration(logits, y)
    p = (logits / cal["temperature"]).softmax(1)[:, 1].numpy()
    level = {q: float(p[40 * i]) for i, q in enumerate(QS)}  # the fitted probability per group
    assert level[0.2] == pytest.approx(0.2, abs=0.005)
    for threshold in (cal["threshold"], calib.sensitivity_cut(p, y)):
        assert threshold == pytest.approx(level[0.2], abs=1e-7)
    # and the rule itself, whatever the levels are
    sens = lambda t: np.mean(p[y == 1] >= t)  # noqa: E731
    assert sens(cal["threshold"]) >= 0.97 and sens(level[0.5]) < 0.97
    # the bootstrap interval of the cut contains its median
    assert cal["threshold_interval"][0] <= cal["threshold"] <= cal["threshold_interval"][1]

    # sensitivity_cut() on distinct scores, where every rank is its own value (in the five
    # groups above neighbouring ranks share one): 300 pneumonias at 0.300, 0.301, ..., 0.599
    # and 200 normals at 0.100, ..., 0.299, given shuffled. Threshold: rank
    # floor(0.03 * 301) - 1 = 8 -> 0.308 (target 0.95: 0.314; in-sample rule: 0.309).
    scores = np.r_[300 + np.arange(300), 100 + np.arange(200)] / 1000
    labels = np.r_[np.ones(300, int), np.zeros(200, int)]
    order = np.random.default_rng(0).permutation(500)
    assert calib.sensitivity_cut(scores[order], labels[order]) == pytest.approx(0.308, abs=1e-12)


def referral_films(n=1000, seed=0):
    """n films whose logit margins are uniform in [-10, 10] and whose labels are drawn
    with P(PNEUMONIA) = sigmoid(margin / 2): the most confident calls are mostly right,
    the least confident often wrong."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(-10, 10, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-m / 2))).astype(int)
    return torch.tensor(np.c_[np.zeros(n), m], dtype=torch.float32), y


def test_fit_calibration_fits_the_referral_rule_on_the_films_at_its_temperature_and_threshold():
    """Guards against a referral rule fitted on the wrong rows (the calibration rows
    instead of films), at temperature 1, or on P(PNEUMONIA) instead of the confidence of
    the call. The temperature and threshold come from the calibration rows whatever the
    films; the rule is fit_referral on the films' confidence at them, and it answers
    exactly the films at or above its cut, whose errors its bound certifies."""
    logits, y = calibration_data()
    film_logits, film_y = referral_films()
    own, cal = calib.fit_calibration(logits, y), calib.fit_calibration(logits, y, films=(film_logits, film_y))
    assert (cal["temperature"], cal["threshold"]) == (own["temperature"], own["threshold"])
    p = network.probabilities(film_logits, cal["temperature"])
    pred, conf = scoring.decide(p, cal["threshold"])
    rule = cal["referral"]
    assert rule == selective.fit_referral(conf, pred == film_y)
    assert rule["films"] == 1000 and rule != own["referral"] and own["referral"]["films"] == 200
    answered = conf >= rule["min_confidence"]
    assert 0.1 < answered.mean() < 0.9 and rule["answered"] == answered.sum()
    assert rule["errors"] == (pred != film_y)[answered].sum() > 0
    assert rule["bound"] == selective.risk_bound(rule["errors"], rule["answered"], 0.1 / 10)
    assert rule["bound"] < rule["target_risk"] == selective.REFERRAL_RISK
    # the wrong confidences certify other cuts
    p1 = network.probabilities(film_logits, 1.0)
    assert selective.fit_referral(scoring.decide(p1, cal["threshold"])[1], pred == film_y) != rule
    assert selective.fit_referral(p, pred == film_y) != rule


@pytest.mark.parametrize("n", [33, 62, 100, 390])
def test_the_threshold_keeps_its_sensitivity_promise_on_new_films(n):
    """Guards against the in-sample rule ("sensitivity >= 0.97 on the fitted films"),
    which lets floor(0.03 n) pneumonias fall below and misses more than 3% of new
    films (2/63 for n = 62; 12/391 for n = 390). Exchangeable scores: fit sensitivity_cut() on n
    pneumonia films and a few normals, then ask whether one more pneumonia film from
    the same source falls below the threshold. The rate must match the promise
    (j + 1) / (n + 1) and stay <= 0.03."""
    rng = np.random.default_rng(n)
    trials = 20000
    scores = rng.random((trials, n + 1))  # the last column is the new film
    labels = np.r_[np.ones(n, int), np.zeros(5, int)]
    normals = np.full(5, -1.0)
    missed = [scores[t, n] < calib.sensitivity_cut(np.r_[scores[t, :n], normals], labels)
              for t in range(trials)]
    j, promised = calib.threshold_rank(n)
    assert 1 - promised == pytest.approx((j + 1) / (n + 1)) and promised >= 0.97
    assert np.mean(missed) == pytest.approx(1 - promised, abs=4 * np.sqrt(0.03 / trials))


def test_too_few_pneumonias_cannot_promise_the_target():
    """Below 33 pneumonia films no rank keeps the 0.97 promise: the threshold is the
    lowest pneumonia score, and the promise says how far short it falls. The exact ranks
    also guard against a rule off by one in the safe direction, which gives away
    specificity for nothing."""
    assert [calib.threshold_rank(n)[0] for n in (65, 66, 98, 99, 390)] == [0, 1, 1, 2, 10]
    assert calib.threshold_rank(99)[1] == pytest.approx(0.97)
    assert calib.threshold_rank(15) == (0, pytest.approx(1 - 1 / 16))
    assert calib.threshold_rank(32)[1] < 0.97 <= calib.threshold_rank(33)[1]
    p = np.r_[np.linspace(0.3, 0.9, 15), [0.1, 0.2]]
    y = np.r_[np.ones(15, int), [0, 0]]
    assert calib.sensitivity_cut(p, y) == pytest.approx(0.3)


def test_too_few_films_to_certify_the_target_refer_every_film_and_say_so():
    """A separable set: the temperature stops at the bound instead of collapsing every
    probability to 0 or 1. Its 150 films are too few for the referral rule to certify
    4% error at the coverage the binary search tries: no cut (min_confidence above 1),
    and the calibration refers every film, in words that say why, not a cut above 100%."""
    y = np.array([0] * 50 + [1] * 100)
    margins = np.r_[np.linspace(-6, -1, 50), np.linspace(1, 6, 100)]
    fitted = calib.fit_calibration(torch.tensor([[0.0, m] for m in margins], dtype=torch.float32), y)
    assert fitted["temperature"] == pytest.approx(calib.TEMPERATURE_RANGE[0])
    assert 0 < fitted["threshold"] < 1
    rule = fitted["referral"]
    assert rule["min_confidence"] > 1 and rule["answered"] == 0 and rule["films"] == 150
    cal = calib.Calibration.from_dict(fitted)
    p = np.r_[0.0, 0.2, fitted["threshold"], 0.9, 1.0]
    assert cal.refers and cal.referred(p).all() and not cal.answered(p).any()
    assert "refers every film (no cut its search tried was certified at 4% on 150 films)" in cal.describe()
    assert "none of the cuts the rule's search tried on its 150 labelled films" in cal.why_referred(1.0)


# --- the learning-rate schedule ----------------------------------------------------------


def optimisation(recipe, y, steps_per_epoch, lr, epochs=3):
    return engine.make_optimisation(recipes.recipe_for(recipe), nn.Linear(2, 2), y,
                                    steps_per_epoch, lr, epochs)


def lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_improved_schedule_warms_up_for_one_epoch_then_cosine_to_zero():
    """Guards against a warm-up of the wrong length, a schedule stepped per epoch instead
    of per batch, or a cosine that does not end at 0.

    4 steps per epoch, 3 epochs, lr 0.1: warm-up 0.025, 0.05, 0.075, 0.1; then
    0.05 * (1 + cos(pi * k / 8)) for k = 0..7; 0 after the last step."""
    criterion, optimizer, scheduler = optimisation("improved", np.array([0, 1, 1, 1]), 4, 0.1)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    cosine = [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs(scheduler, optimizer, 12) == pytest.approx([0.025, 0.05, 0.075, 0.1] + cosine)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert cosine[4] == pytest.approx(0.05)  # halfway through the decay: half the peak
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    # class-balanced weights n / (2 * count): 4 / 2 = 2 for NORMAL, 4 / 6 for PNEUMONIA
    assert criterion.weight.tolist() == pytest.approx([2.0, 2 / 3])
    assert criterion.label_smoothing == 0.1
    # and training steps it once per batch: after one epoch of 4 batches the warm-up is
    # over (0.1), after two the cosine is halfway down (0.05)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    criterion, optimizer, scheduler = engine.make_optimisation(
        recipes.recipe_for("improved"), model, np.array([0, 1, 1, 1]), 4, 0.1, 3)
    batches = [(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))] * 4
    for epoch, lr in ((1, 0.1), (2, 0.05)):
        train_cxray.train_one_epoch(model, batches, criterion, optimizer, torch.device("cpu"),
                                    False, 0, epoch, 3, scheduler)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr), epoch


def test_reference_schedule_halves_on_a_val_f1_plateau():
    """The reference recipe: Adam, ReduceLROnPlateau on validation F1 (mode max,
    factor 0.5, patience 2): two epochs without improvement keep the rate, the third
    halves it."""
    criterion, optimizer, scheduler = optimisation("reference", np.array([0, 1]), 4, 1e-4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert isinstance(optimizer, torch.optim.Adam)
    assert criterion.weight is None
    seen = []
    for f1 in (0.8, 0.9, 0.9, 0.85, 0.9):  # best 0.9 at epoch 2; 3 epochs without gain
        scheduler.step(f1)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-4, 1e-4, 1e-4, 1e-4, 5e-5])


def test_classwise_ece_and_log_loss_by_hand():
    """Class-wise ECE averages the two classes' size-weighted reliability gaps; the NLL
    is the mean -log of the probability given to the true class.

    p = [0.9, 0.9, 0.9, 0.2], y = [1, 1, 0, 0]. P(PNEUMONIA): the bin of 0.9 holds 3
    images, 2 positive: gap |2/3 - 0.9|, weight 3/4; the bin of 0.2 holds 1, no
    positive: gap 0.2, weight 1/4; ECE = 0.75 * 0.2333 + 0.25 * 0.2 = 0.225 (unweighted
    0.2167). P(NORMAL) = [0.1, 0.1, 0.1, 0.8] against [0, 0, 1, 1]: the same 0.225.
    NLL = -(2 ln 0.9 + ln 0.1 + ln 0.8) / 4 (classes swapped: a different number)."""
    y, p = np.array([1, 1, 0, 0]), np.array([0.9, 0.9, 0.9, 0.2])
    assert scoring.classwise_ece(y, p) == pytest.approx(0.75 * (0.9 - 2 / 3) + 0.25 * 0.2)
    expected = -(2 * math.log(0.9) + math.log(0.1) + math.log(0.8)) / 4
    assert scoring.log_loss(y, p) == pytest.approx(expected)
