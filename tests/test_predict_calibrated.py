"""predict.py and visualize_results.py reproduce probabilities, decisions and referrals
computed here by hand, for checkpoints whose calibration is far from the defaults.

With temperature 1 and threshold 0.5, argmax agrees with the stored threshold and
logits * T with logits / T. The `calibrated` fixture (conftest) is the shipped model's
weights with temperature 2.5, a threshold far from 0.5 that falls between two test
images' probabilities (both within 0.02 of it) and a referral rule whose cut refers some
of them and answers the others; the `ensemble` fixture adds the shipped reference
model, differently trained and calibrated.
Expected values: softmax(logits / T)[:, 1] of network.model_input(dataset.load_image_array(f)).
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CAL_TEMPERATURE,
    ROOT,
    SECOND_TEMPERATURE,
    SHIPPED,
    TINY,
    logits_of,
    run_folder,
    run_script,
    scaled_probability,
    tiny_test_files,
    with_calibration,
)
from PIL import Image

from cxr import checkpoints, dataset, network, scoring
from gradcam import GradCAM, overlay

TOL = 1e-4  # the CSVs hold 6 decimals; in-process and script forward passes agree to ~1e-6


def truthy(text):
    return str(text).strip().lower() in ("true", "1", "yes")


def by_name(csv_path):
    return {Path(r["file"]).name: r for r in csv.DictReader(open(csv_path, encoding="utf-8"))}


LOW_CONFIDENCE = "the model is not sure enough"  # the reason the referral rule gives


def check_rows(rows, expected):
    """Every test image: probability within TOL, decision and referral exact. predict's
    table: the rule's referral is its reason, and refer is it or an atypical film;
    the evaluation table (visualize's): referred is the rule's referral."""
    assert sorted(rows) == sorted(f.name for f in expected.files)
    for i, f in enumerate(expected.files):
        row, p = rows[f.name], expected.prob[i]
        pred, referred = expected.expected(f.name)
        assert abs(float(row["prob_pneumonia"]) - p) < TOL, (f.name, row["prob_pneumonia"], p)
        assert row["prediction"] == pred, (f.name, p, expected.threshold)
        if "referred" in row:
            assert truthy(row["referred"]) == referred, (f.name, p, expected.min_confidence)
            continue
        assert (LOW_CONFIDENCE in row["reason"]) == referred, (f.name, p, expected.min_confidence)
        assert truthy(row["refer"]) == (referred or truthy(row["atypical"])), (f.name, row)


def test_fixture_has_images_near_the_threshold(calibrated):
    """The premise of the tests below: images within 0.02 on both sides of the threshold,
    images between 0.5 and the threshold (on whichever side of 0.5 this machine's model
    puts it), images the referral rule refers and images it answers, on both sides of
    the threshold."""
    p, t, c = calibrated.prob, calibrated.threshold, calibrated.min_confidence
    assert ((p >= t) & (p < t + 0.02)).any() and ((p < t) & (p > t - 0.02)).any()
    assert ((p >= 0.5) != (p >= t)).sum() >= 2
    assert 1 - c < t < c
    referred = calibrated.referred()
    assert 2 <= referred.sum() < len(p) - 2
    assert ((p < t) & ~referred).any() and ((p >= t) & ~referred).any()


def test_predict_applies_the_stored_temperature_threshold_and_referral_rule(calibrated, tmp_path):
    """Guards against predict.py deciding by argmax (0.5) instead of the stored threshold,
    multiplying the logits by the temperature instead of dividing, and a wrong referral
    (a wrong cut, or P(PNEUMONIA) compared with it instead of the call's confidence)."""
    proc = run_script("predict.py", "--model", calibrated.path, "--dir", TINY / "test",
                      "--quiet", "--batch-size", 5, "--out", tmp_path / "p")
    rows = by_name(run_folder(tmp_path / "p") / "predictions.csv")
    check_rows(rows, calibrated)
    for row in rows.values():
        assert float(row["threshold"]) == pytest.approx(calibrated.threshold, abs=1e-9)
    # one line per film: "refer, because" the rule's reason exactly for the films it refers
    for f in calibrated.files:
        (line,) = [v for v in proc.stdout.splitlines() if f"{f.name}: " in v]
        assert (f"refer, because {LOW_CONFIDENCE}" in line) == calibrated.expected(f.name)[1], line
    assert proc.stdout.count(LOW_CONFIDENCE) == calibrated.referred().sum()


def test_a_calibration_fitted_before_the_referral_rule_refers_nothing_and_says_how_to_fit_one(
        calibrated, tmp_path):
    """A checkpoint whose calibration has the old uncertain band and no referral rule:
    predict applies its temperature and threshold, refers no film for low confidence
    (the band is not read as a rule), and prints the note telling how to fit the rule."""
    old = with_calibration(SHIPPED, tmp_path / "old.pth", CAL_TEMPERATURE, calibrated.threshold,
                           {"uncertain_band": [0.0, 1.0]})  # a band that holds every film
    proc = run_script("predict.py", "--model", old, "--dir", TINY / "test", "--quiet",
                      "--out", tmp_path / "p")
    assert "has no referral rule (fitted before it existed)" in proc.stdout
    assert "python experiments/upgrade_checkpoint.py --calibrate-for MODEL" in proc.stdout
    assert "| no referral rule" in proc.stdout and "Referral rule:" not in proc.stdout
    rows = by_name(run_folder(tmp_path / "p") / "predictions.csv")
    for i, f in enumerate(calibrated.files):
        row = rows[f.name]
        assert row["prediction"] == calibrated.expected(f.name)[0]
        assert abs(float(row["prob_pneumonia"]) - calibrated.prob[i]) < TOL
        assert LOW_CONFIDENCE not in row["reason"]
        assert truthy(row["refer"]) == truthy(row["atypical"])
    assert proc.stdout.count("(calibrated) - no referral rule\n") == sum(
        not truthy(r["atypical"]) for r in rows.values())


def test_visualize_applies_the_stored_calibration(calibrated, tmp_path):
    """Guards against evaluation with the wrong threshold or temperature: per-image
    probabilities, decisions, confidences and referrals, and the metrics derived from
    them, all computed here from the expected probabilities."""
    out = tmp_path / "v_parent"
    run_script("visualize_results.py", "--model", calibrated.path, "--split", TINY / "test",
               "--out", out, "--bootstrap", 20, "--gallery", 2)
    out = run_folder(out)
    rows = by_name(out / "predictions.csv")
    check_rows(rows, calibrated)
    y = np.array([0 if "/NORMAL/" in str(f) else 1 for f in calibrated.files])
    p, t = calibrated.prob, calibrated.threshold
    pred = (p >= t).astype(int)
    for i, f in enumerate(calibrated.files):
        row = rows[f.name]
        assert row["label"] == network.CLASS_NAMES[y[i]]
        assert abs(float(row["confidence"]) - (p[i] if pred[i] else 1 - p[i])) < TOL
        assert int(row["correct"]) == int(pred[i] == y[i])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(t, abs=1e-9)
    assert metrics["referral"]["min_confidence"] == pytest.approx(calibrated.min_confidence, abs=1e-12)
    assert metrics["temperatures"] == pytest.approx([CAL_TEMPERATURE])
    at_t = metrics["at_threshold"]
    assert at_t["accuracy"] == pytest.approx(np.mean(pred == y))
    assert at_t["sensitivity"] == pytest.approx(np.mean(pred[y == 1] == 1))
    assert at_t["specificity"] == pytest.approx(np.mean(pred[y == 0] == 0))
    assert metrics["at_0.5"]["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    # the bootstrap intervals at the stored threshold (20 resamples; these test films are
    # one per patient, so by patient and by image agree here); the decisions have a
    # margin from the threshold, so the intervals do not hinge on float rounding
    groups = np.array([dataset.patient_id(f) for f in calibrated.files])
    ci = scoring.bootstrap_ci(y, p, t, 20, groups=groups)
    for k in ("accuracy", "sensitivity", "specificity"):
        assert metrics["ci95_at_threshold"][k] == pytest.approx(ci[k], abs=1e-9), k
    answered = ~calibrated.referred()
    assert metrics["coverage"] == pytest.approx(answered.mean())
    assert metrics["accuracy_answered"] == pytest.approx(np.mean((pred == y)[answered]))
    # the calibration check: the same logits at the stored temperature and at T = 1
    p1 = scaled_probability(logits_of(calibrated.path, calibrated.files), 1.0)
    nll = lambda q: -np.mean(np.where(y == 1, np.log(q), np.log(1 - q)))  # noqa: E731
    check = metrics["calibration_check"]
    assert check["nll"] == pytest.approx(nll(p), abs=1e-5)
    assert check["nll_at_T1"] == pytest.approx(nll(p1), abs=1e-5)
    assert abs(check["nll"] - check["nll_at_T1"]) > 1e-3  # T = 2.5 really changes them
    assert "top-label, 15 equal-width bins" in check["ece_variant"]


def test_ensemble_of_two_different_checkpoints_averages_them(ensemble, tmp_path):
    """Guards against an ensemble that silently uses only its first member (or one
    temperature for both): the mean of the members' own temperature-scaled
    probabilities, decided at the mean of their thresholds and referred by the strictest
    of their rules (the second member's; the first's refers fewer films)."""
    _, expected = ensemble
    proc = run_script("predict.py", "--model", expected.path, "--dir",
                      TINY / "test", "--quiet", "--out", tmp_path / "p")
    assert "ensemble of 2" in proc.stdout
    rows = by_name(run_folder(tmp_path / "p") / "predictions.csv")
    check_rows(rows, expected)
    for row in rows.values():
        assert float(row["threshold"]) == pytest.approx(expected.threshold, abs=1e-9)


def test_visualize_ensemble_averages_them(ensemble, tmp_path):
    _, expected = ensemble
    out = tmp_path / "v_parent"
    run_script("visualize_results.py", "--model", expected.path, "--split",
               TINY / "test", "--out", out, "--bootstrap", 20, "--gallery", 0)
    out = run_folder(out)
    check_rows(by_name(out / "predictions.csv"), expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(expected.threshold, abs=1e-9)
    assert metrics["temperatures"] == pytest.approx([CAL_TEMPERATURE, SECOND_TEMPERATURE])


# --- the Grad-CAM figure ------------------------------------------------------------------


def overlay_panel(png, size):
    """The Grad-CAM panel of predict.py's figure, sampled back to size x size.

    The figure's only coloured pixels are the overlay's (the X-ray, the titles and the
    background are grey): their bounding box is the panel, drawn with nearest-neighbour
    upsampling, so sampling each cell's centre gives the overlay's pixels back."""
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colour = (np.abs(a[..., 0] - a[..., 1]) > 2) | (np.abs(a[..., 1] - a[..., 2]) > 2)
    ys, xs = np.nonzero(colour)
    crop = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    rows = ((np.arange(size) + 0.5) * crop.shape[0] / size).astype(int)
    cols = ((np.arange(size) + 0.5) * crop.shape[1] / size).astype(int)
    return crop[rows][:, cols]


def expected_overlay(checkpoint, image, class_idx):
    model, meta = checkpoints.load_checkpoint(checkpoint)
    gray = dataset.load_image_array(image, meta["preprocessing"]["image_size"])
    x = network.model_input(torch.from_numpy(gray)[None, None], network.intensity_of(meta))
    heat, _, _ = GradCAM(model)(x, class_idx=class_idx)
    assert heat.std() > 0.05  # a map with structure, or the comparison proves little
    return overlay(gray, heat).astype(int), gray


@pytest.fixture(scope="module")
def gradcam_run(calibrated, tmp_path_factory):
    """predict.py --gradcam on two images: the one of highest P(PNEUMONIA), reported
    PNEUMONIA, and one between 0.5 and the threshold, whose calibrated decision is not
    the argmax class."""
    p, t = calibrated.prob, calibrated.threshold
    agree = calibrated.files[int(np.argmax(p))]  # above the threshold: PNEUMONIA
    disagree = calibrated.files[int(np.flatnonzero((p >= 0.5) != (p >= t))[0])]
    out = tmp_path_factory.mktemp("gradcam") / "p"
    run_script("predict.py", "--model", calibrated.path, "--image", agree, "--image", disagree,
               "--gradcam", "--quiet", "--out", out)
    return run_folder(out), agree, disagree


def test_gradcam_figure_shows_the_models_map(calibrated, gradcam_run):
    """Guards against a Grad-CAM figure whose map is constant, another class's, or
    not the model's: the saved panel must be the overlay of the map computed here.
    (The old test only checked the PNG's file size.)"""
    out, agree, _ = gradcam_run
    exp, gray = expected_overlay(calibrated.path, agree, class_idx=1)
    panel = overlay_panel(out / f"{agree.stem}_gradcam.png", gray.shape[0])
    assert np.abs(panel - exp).mean() < 2.0, np.abs(panel - exp).mean()
    # and not a uniform tint of the X-ray: the heat map must vary across the panel
    tint = panel - 0.6 * gray[..., None]
    assert tint.std(axis=(0, 1)).max() > 10


def test_gradcam_figure_explains_the_thresholded_prediction(calibrated, gradcam_run):
    """The figure's title names the calibrated prediction (e.g. 'Grad-CAM for NORMAL'), so
    the map must be that class's, as in visualize_results.py's gallery, not the argmax
    class's, which differs for images between 0.5 and the threshold."""
    out, _, disagree = gradcam_run
    rows = by_name(out / "predictions.csv")
    reported = calibrated.expected(disagree.name)[0]
    assert rows[disagree.name]["prediction"] == reported
    exp, gray = expected_overlay(calibrated.path, disagree,
                                 class_idx=network.CLASS_NAMES.index(reported))
    panel = overlay_panel(out / f"{disagree.stem}_gradcam.png", gray.shape[0])
    assert np.abs(panel - exp).mean() < 2.0, np.abs(panel - exp).mean()


def test_a_model_never_calibrated_says_so(tmp_path):
    """The reference recipe stores no calibration: its probability is not called
    calibrated, no film is said to be answered or referred by a rule it does not have, and
    no referral rule is shown as if it had one."""
    image = tiny_test_files()[0]
    proc = run_script("predict.py", "--model", ROOT / "models" / "reference_seed1.pth", "--image",
                      image, "--out", tmp_path)
    assert "uncalibrated: PNEUMONIA when P(PNEUMONIA) >= 0.5, no referral rule" in proc.stdout
    assert "(uncalibrated) - no referral rule (uncalibrated model)" in proc.stdout
    assert "Referral rule:" not in proc.stdout and " - answer" not in proc.stdout
    assert "calibrated" not in proc.stdout.replace(tmp_path.name, "").replace("uncalibrated", "")
    shipped = ROOT / "examples" / "person100_bacteria_475.jpeg"  # a film it does not flag
    proc = run_script("predict.py", "--image", shipped, "--out", tmp_path)
    assert "P(PNEUMONIA)" in proc.stdout and "(calibrated) - " in proc.stdout
    assert "uncalibrated" not in proc.stdout
    if checkpoints.calibration_of(torch.load(SHIPPED, weights_only=True)["meta"]).refers:
        assert "Referral rule: answer when the confidence of the call is >= " in proc.stdout
    else:  # a calibration fitted before the rule existed: says so, and how to fit one
        assert "(calibrated) - no referral rule\n" in proc.stdout
        assert "--calibrate-for MODEL" in proc.stdout and "Referral rule:" not in proc.stdout
