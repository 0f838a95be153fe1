"""Guards for bugs that once went unnoticed: each test fails with one realistic bug
planted (named in its docstring) and holds on the real code.

The grouping-sensitive ones run on tests/data/patients64 (real Kermany films, 64 px, whole
patients with two to four films each beside patients with one); the site-shift ones
compare what the scripts write with the same computation done here, in-process."""

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import DATA, TINY, run_folder, run_script
from torch import nn

import visualize_results as vr
from cxr import (
    calib,
    checkpoints,
    dataset,
    engine,
    imagefiles,
    intake,
    network,
    predtable,
    recipes,
    runstate,
    runtime,
    scan,
    scoring,
    selective,
    siteprotocol,
    siteshift,
)

PATIENTS64 = DATA / "patients64"
TEST64 = PATIENTS64 / "test"


def several_films(paths) -> set:
    """The patients with more than one of these files."""
    ids = [dataset.patient_id(p) for p in paths]
    return {g for g in ids if ids.count(g) > 1}


def labelled_images(folder, size=64):
    """(paths, labels, images) of a class folder, in the order the scripts read it."""
    paths, labels = dataset.list_labelled(folder)
    return paths, np.array(labels), np.stack([dataset.load_image_array(p, size) for p in paths])


# --- calibration: the referral rule's confidence is the call's at the threshold -----------


def test_the_referral_rule_counts_the_calls_at_the_threshold_not_at_one_half():
    """Bug: the referral rule fitted on the confidence of the call at 0.5 (argmax) instead
    of at the stored threshold. On a separable set of 600 films (400 pneumonias) the
    threshold is the 12th lowest pneumonia score (rank 11), far above 0.5: the eleven
    pneumonias below it are called NORMAL, wrongly, and they are the least confident
    calls. The rule fitted at the threshold counts them as the errors it answers or
    refers; at 0.5 every call is right and confident."""
    y = np.array([0] * 200 + [1] * 400)
    margins = np.r_[np.linspace(-6, -1, 200), np.linspace(1, 6, 400)]
    logits = torch.tensor(np.c_[np.zeros(600), margins], dtype=torch.float32)
    cal = calib.fit_calibration(logits, y)
    assert calib.threshold_rank(400)[0] == 11 and cal["threshold"] > 0.9
    p = network.probabilities(logits, cal["temperature"])
    pred, conf = scoring.decide(p, cal["threshold"])
    assert (pred != y).sum() == 11 and np.sort(conf)[10] < np.sort(conf)[11]
    rule = cal["referral"]
    answered = conf >= rule["min_confidence"]
    assert rule["answered"] == answered.sum() and rule["errors"] == (pred != y)[answered].sum() > 0
    assert rule == selective.fit_referral(conf, pred == y)


# --- the training splits: no patient in two of train, val and cal -----------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fractions", [("0.1", "0.1"), ("0.2", "0.25")])
def test_the_calibration_split_shares_no_patient_with_train_or_validation(seed, fractions):
    """Bug: the calibration split overlapping the training and validation patients
    (train and val drawn from all files, not from those calibration left)."""
    # (0.2, 0.25): an older run's fractions, rebuilt from its checkpoint
    args = argparse.Namespace(data=str(PATIENTS64), seed=seed, val_fraction=float(fractions[0]),
                              calib_fraction=float(fractions[1]))
    splits, _ = dataset.split_files(args, recipes.recipe_for("improved"))
    assert set(splits) == {"train", "val", "cal"}
    files = {k: ps for k, (ps, _) in splits.items()}
    patients = {k: {dataset.patient_id(p) for p in ps} for k, ps in files.items()}
    for a, b in (("cal", "train"), ("cal", "val"), ("train", "val")):
        assert not patients[a] & patients[b], (a, b, patients[a] & patients[b])
    everything = dataset.list_labelled(PATIENTS64 / "train")[0]
    assert sorted(sum(files.values(), [])) == sorted(everything)  # each file exactly once
    for k, (_, labels) in splits.items():
        assert set(labels) == {0, 1}, k
    assert several_films(files["cal"]) and several_films(files["val"])  # grouping matters


@pytest.mark.slow
def test_the_run_records_a_calibration_split_apart_from_train_and_validation(ablation_run):
    rows = list(csv.DictReader(open(ablation_run[0] / "val_split.csv")))
    patients = {s: {r["patient"] for r in rows if r["split"] == s} for s in ("train", "val", "cal")}
    assert all(patients.values())
    assert not patients["cal"] & (patients["train"] | patients["val"])
    assert not patients["train"] & patients["val"]


def test_calibration_groups_are_the_patients_of_the_calibration_split(model_path, monkeypatch):
    """The calibration split read from disk hands fit_calibration one group per real
    patient (several films each), for every shifted copy, and the split's films as they
    are (not shifted copies) to fit the referral rule on."""
    args = argparse.Namespace(data=str(PATIENTS64), seed=0, image_size=64, cache_dir="",
                              val_fraction=dataset.VAL_FRACTION,
                              calib_fraction=0.3)  # more patients with several films
    recipe = recipes.recipe_for("improved")
    arrays, patients = engine.load_splits(args, recipe, None, rank=1)[:2]
    cal_files = dataset.split_files(args, recipe)[0]["cal"][0]
    assert patients["cal"] == [dataset.patient_id(p) for p in cal_files]
    assert len(several_films(cal_files)) >= 2
    seen, real = {}, calib.fit_calibration

    def spy(logits, labels, groups=None, seed=0, films=None):
        seen["groups"], seen["films"] = groups, films
        return real(logits, labels, groups, seed, films)

    monkeypatch.setattr(calib, "fit_calibration", spy)
    model, _ = checkpoints.load_checkpoint(model_path)
    calib.calibrate(model, *arrays["cal"], patients["cal"], recipe["intensity"], seed=0)
    groups = np.asarray(seen["groups"])
    assert groups.tolist() == patients["cal"] * calib.STRESS_COPIES
    film_logits, film_labels = seen["films"]
    assert np.asarray(film_labels).tolist() == np.asarray(arrays["cal"][1]).tolist()
    assert torch.allclose(film_logits, network.predict_logits(model, arrays["cal"][0], recipe["intensity"]),
                          atol=1e-5)
    # each resample draws a patient's rows (all films, all copies) together
    for idx in scoring.resample_indices(len(groups), 20, 0, groups):
        for g in set(groups[idx]):
            counts = np.bincount(idx[groups[idx] == g], minlength=len(groups))[groups == g]
            assert len(set(counts.tolist())) == 1, g


# --- typicality: Mahalanobis distance under the precision ---------------------------------


def gaussian_features(rng, n, cov, shift):
    """n features per class, class 1 shifted by `shift`, both with covariance cov."""
    d = len(cov)
    x = rng.multivariate_normal(np.zeros(d), cov, size=2 * n)
    y = np.repeat([0, 1], n)
    return x + np.outer(y, shift), y


@pytest.mark.parametrize("dims", [64, 3])
def test_typicality_is_the_mahalanobis_distance_under_the_shrunk_precision(dims):
    """Bug: the covariance used where the precision belongs. On features whose
    covariance is far from the identity (variances 0.1 to 10), the score must be, by
    hand: the features projected on the first `dims` principal axes of the training
    features, then sqrt(min over classes of (z - m_k)' P (z - m_k)), P the inverse of the
    Ledoit-Wolf covariance of the class-centred z; the cut is the 99th percentile of the
    validation scores."""
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    cov = q @ np.diag(np.logspace(-1, 1, d)) @ q.T
    shift = np.r_[3.0, np.zeros(d - 1)] @ q.T
    f, y = gaussian_features(rng, 300, cov, shift)
    fv, yv = gaussian_features(rng, 100, cov, shift)
    new = rng.multivariate_normal(np.zeros(d), 4 * cov, size=50)
    stats = siteshift.fit_typicality(f, y, fv, yv, dims=dims)

    k = min(dims, d)
    mean = f.mean(0)
    axes = np.linalg.svd(f - mean, full_matrices=False)[2][:k]  # principal axes (signs free)
    z = (f - mean) @ axes.T
    centres = np.stack([z[y == c].mean(0) for c in (0, 1)])
    shrunk = ledoit_wolf(z - centres[y])[0]

    def by_hand(x, matrix):
        zx = (x - mean) @ axes.T
        return np.sqrt(np.min([np.einsum("ij,jk,ik->i", zx - m, matrix, zx - m)
                               for m in centres], axis=0))

    expected = by_hand(new, np.linalg.inv(shrunk))
    assert not np.allclose(by_hand(new, shrunk), expected, rtol=0.1)  # the two differ
    assert siteshift.typicality_score(new, stats) == pytest.approx(expected, rel=1e-3)
    assert stats["cut"] == pytest.approx(np.quantile(by_hand(fv, np.linalg.inv(shrunk)), 0.99),
                                         rel=1e-3)


# --- site shift: --adapt scores with the adapted model, flags with the trained one --------


def adapted_and_trained(model_path, images, batch_size):
    """In-process: (P(PNEUMONIA) of the AdaBN-adapted model, typicality / cut of the
    trained model, the same ratio on the adapted model's features)."""
    members, cal, _ = checkpoints.load_model(model_path)
    (model, meta), = members
    adapted = siteshift.adapt_batchnorm(model, images, network.intensity_of(meta), batch_size)
    logits, adapted_feats = network.predict_logits(adapted, images, network.intensity_of(meta),
                                              batch_size, features=True)
    _, feats = network.predict_logits(model, images, network.intensity_of(meta), batch_size, features=True)
    stats = model.typicality
    ratio = siteshift.typicality_score(feats.numpy(), stats) / stats["cut"]
    adapted_ratio = siteshift.typicality_score(adapted_feats.numpy(), stats) / stats["cut"]
    return cal.probability([logits]), ratio, adapted_ratio, feats


@pytest.fixture(scope="module")
def adapt_run(model_path, tmp_path_factory):
    """predict.py --adapt --json on patients64/test (one batch: AdaBN sees all 40 images
    at once, as adapt_batchnorm here does); its output folder."""
    out = tmp_path_factory.mktemp("adapt")
    run_script("predict.py", "--model", model_path, "--dir", TEST64, "--adapt", "--quiet",
               "--json", "--batch-size", 64, "--out", out)
    return run_folder(out)


def test_predict_adapt_scores_with_the_adapted_model_and_flags_with_the_trained_one(
        model_path, adapt_run):
    """Bugs: predict --adapt scoring with the unadapted model; the out-of-distribution
    flag reading the adapted features (help: "the out-of-distribution flag still uses
    the model as trained"). Every row's probability must be the adapted model's, and its
    typicality the trained model's, computed here."""
    rows = list(csv.DictReader(open(adapt_run / "predictions.csv")))
    files = scan.scan_folder(TEST64)[0]
    assert [r["resolved_path"] for r in rows] == [intake.resolved(f) for f in files]
    images = np.stack([dataset.load_image_array(f, 64) for f in files])
    prob, ratio, adapted_ratio, _ = adapted_and_trained(model_path, images, 64)
    trained = checkpoints.load_checkpoint(model_path)[0]
    unadapted = network.probabilities(network.predict_logits(trained, images), 1.0)
    # the premises: adaptation moves both the probabilities and the typicality
    assert (np.abs(prob - unadapted) > 0.01).mean() > 0.5
    assert (np.abs(ratio - adapted_ratio) > 0.01).mean() > 0.5
    assert [float(r["prob_pneumonia"]) for r in rows] == pytest.approx(prob.tolist(), abs=2e-6)
    assert [float(r["typicality"]) for r in rows] == pytest.approx(ratio.tolist(), abs=2e-4)
    assert [r["atypical"] == "True" for r in rows] == (ratio > 1).tolist()
    unlike = np.array([imagefiles.unlike_a_film(a) is not None for a in images])
    assert [r["outside"] == "True" for r in rows] == ((ratio > 1) & unlike).tolist()


def test_visualize_adapt_scores_with_the_adapted_model_and_flags_with_the_trained_one(
        model_path, tmp_path, monkeypatch):
    """The same two bugs in visualize_results.py --adapt: predictions.csv holds the
    adapted model's probabilities, and the site-shift report (flag and domain classifier)
    is given the trained model's features."""
    seen, real = [], siteshift.outside_distribution

    def spy(members, feats):
        seen.append([f.clone() for f in feats])
        return real(members, feats)

    monkeypatch.setattr(siteshift, "outside_distribution", spy)
    assert vr.main(["--model", str(model_path), "--split", str(TEST64), "--out", str(tmp_path),
                    "--bootstrap", "20", "--gallery", "0", "--adapt"]) == 0
    paths, _, images = labelled_images(TEST64)
    prob, _, _, feats = adapted_and_trained(model_path, images, 64)
    (given,) = seen
    assert torch.allclose(given[0], feats, atol=1e-5), "the flag got other features than the trained model's"
    rows = list(csv.DictReader(open(run_folder(tmp_path) / "predictions.csv")))
    assert [r["file"] for r in rows] == [runtime.display_name(p) for p in paths]
    assert [float(r["prob_pneumonia"]) for r in rows] == pytest.approx(prob.tolist(), abs=2e-6)


# --- local recalibration and the bootstrap: whole patients --------------------------------


@pytest.fixture(scope="module")
def patient_evaluation(model_path, tmp_path_factory):
    """visualize --recalibrate 10 on patients64/test, and the same model's probabilities
    computed here."""
    out = tmp_path_factory.mktemp("patient_eval")
    run_script("visualize_results.py", "--model", model_path, "--split", TEST64, "--out", out,
               "--bootstrap", 100, "--recalibrate", 10, "--draws", 2, "--gallery", 0)
    metrics = json.loads((run_folder(out) / "metrics.json").read_text())
    paths, y, images = labelled_images(TEST64)
    members, cal, _ = checkpoints.load_model(model_path)
    p = cal.probability(network.member_logits(members, images))
    groups = np.array([dataset.patient_id(q) for q in paths])
    assert len(several_films(paths)) >= 8
    return metrics, y, p, groups, cal


def test_recalibrate_partitions_the_folder_by_patient(patient_evaluation):
    """Bug: --recalibrate partitioning by image, not by patient. The figures written
    must be those of the patient partitions, computed here (image partitions give
    others: the premise)."""
    metrics, y, p, groups, _ = patient_evaluation
    (row,) = metrics["recalibration"]
    by_patient = siteprotocol.recalibrate(y, p, groups, [10], draws=2)[0]
    by_image = siteprotocol.recalibrate(y, p, np.arange(len(y)), [10], draws=2)[0]
    assert by_image["mean"] != pytest.approx(by_patient["mean"], abs=1e-6)
    assert row["mean"] == pytest.approx(by_patient["mean"], abs=1e-9)
    assert row["sd"] == pytest.approx(by_patient["sd"], abs=1e-9)
    # and every part of every draw holds whole patients of both classes
    rng = np.random.default_rng(0)
    for _ in range(2):
        parts = siteprotocol.site_partitions(groups, y, 10, rng)
        for a in parts:
            assert set(y[a]) == {0, 1}
            assert all(not set(groups[a]) & set(groups[b]) for b in parts if b is not a)


def test_the_evaluation_bootstrap_resamples_patients(patient_evaluation):
    metrics, y, p, groups, cal = patient_evaluation
    assert metrics["bootstrap"] == "by patient"
    expected = scoring.bootstrap_ci(y, p, cal.threshold, 100, groups=groups)
    assert expected != scoring.bootstrap_ci(y, p, cal.threshold, 100)
    for k, interval in expected.items():
        assert metrics["ci95_at_threshold"][k] == pytest.approx(interval, abs=1e-9), k


def test_bootstrap_interval_is_the_2_5_and_97_5_percentiles_at_fine_resolution():
    """Bug: the 5th-95th percentiles reported as a 95% interval. 400 images give
    accuracies 0.0025 apart, where the two pairs of percentiles differ (with 10 images,
    on a grid of tenths, they coincide). By hand, with the same random draws; and the
    width is about 2 x 1.96 x sqrt(0.8 x 0.2 / 400) = 0.078 (a 90% interval: 0.066)."""
    n = 400
    y = np.array([0, 1] * (n // 2))
    p = np.where(np.arange(n) % 5 != 0, y * 0.8 + 0.1, 0.9 - y * 0.8)  # 80% right
    ci = scoring.bootstrap_ci(y, p, 0.5, 200, seed=3)
    rng = np.random.default_rng(3)
    acc = [np.mean((p[i] >= 0.5) == y[i]) for i in (rng.integers(0, n, n) for _ in range(200))]
    assert ci["accuracy"] == pytest.approx([np.percentile(acc, 2.5), np.percentile(acc, 97.5)])
    assert np.percentile(acc, 5) - np.percentile(acc, 2.5) > 0.002  # the premise
    lo, hi = ci["accuracy"]
    assert 0.072 < hi - lo < 0.09, (lo, hi)


def test_patient_bootstrap_draws_whole_patients_by_hand():
    """By hand: each resample draws as many patients as there are, with replacement, and
    takes all their images."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(100), rng.integers(1, 5, 100))
    y = (groups % 2).astype(int)
    p = np.clip(y * 0.3 + rng.uniform(0.2, 0.6, len(y)), 0, 1)
    ci = scoring.bootstrap_ci(y, p, 0.5, 100, seed=5, groups=groups)
    draw = np.random.default_rng(5)
    acc = []
    for _ in range(100):
        idx = np.concatenate([np.flatnonzero(groups == g) for g in draw.integers(0, 100, 100)])
        acc.append(np.mean((p[idx] >= 0.5) == y[idx]))
    assert ci["accuracy"] == pytest.approx([np.percentile(acc, 2.5), np.percentile(acc, 97.5)])


# --- training resume: the learning-rate schedule goes on where it stopped -----------------


@pytest.mark.parametrize("recipe_name", ["improved", "reference"])
def test_a_resumed_run_continues_the_learning_rate_schedule(recipe_name, tmp_path):
    """Bug: resume not restoring the scheduler. Six epochs of 4 steps, uninterrupted vs
    stopped after epoch 3 (save_state) and resumed into a fresh model, optimiser and
    scheduler (load_state, restore): the learning rates must be the same at every step.
    The warm-up + cosine schedule restarts its warm-up without its state; the plateau
    schedule (validation F1 0.8, then 0.9 five times) forgets the two epochs without
    gain it had counted and does not halve the rate at epoch 5."""
    recipe = recipes.recipe_for(recipe_name)
    f1 = [0.8, 0.9, 0.9, 0.9, 0.9, 0.9]

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        _, optimizer, scheduler = engine.make_optimisation(recipe, model, np.array([0, 1, 1]), 4,
                                                           0.1, 6)
        return model, optimizer, scheduler

    def epochs(model, optimizer, scheduler, which):
        lrs = []
        for epoch in which:
            for _ in range(4):
                lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.zero_grad()
                model(torch.ones(1, 2)).sum().backward()
                optimizer.step()
                if recipe["schedule"] == "warmup_cosine":
                    scheduler.step()
            if recipe["schedule"] == "plateau":
                scheduler.step(f1[epoch - 1])
        return lrs

    whole = epochs(*fresh(), range(1, 7))
    model, optimizer, scheduler = fresh()
    first = epochs(model, optimizer, scheduler, range(1, 4))
    args = argparse.Namespace(data=str(TINY), recipe=recipe_name)
    best = {"score": 0.9, "epoch": 2, "state": model.state_dict()}
    runstate.save_state(tmp_path, model, optimizer, scheduler, 3, [], best, torch.Generator(),
                        args, ["train_cxray.py"], {})
    model, optimizer, scheduler = fresh()
    _, _, first_epoch = runstate.restore(runstate.load_state(tmp_path), model, optimizer,
                                         scheduler, torch.Generator(), recipe, 0)
    assert first_epoch == 4
    rest = epochs(model, optimizer, scheduler, range(4, 7))
    assert whole[-1] != whole[11]  # the rate changes after the interruption
    assert first + rest == pytest.approx(whole, rel=1e-12)


# --- predict --resume: a record cut by any number of bytes is redone ----------------------


def test_resume_drops_a_record_cut_by_any_number_of_bytes(model_path, adapt_run, tmp_path):
    """Bug: --resume keeping a CSV record cut by a few bytes (the field count is still
    complete when only the last field, the typicality, is cut short). For every cut of
    the last record, the rows read back are exactly the complete ones; JSONL likewise
    keeps no cut record. Then a resume after a 3-byte cut redoes that one file."""
    out = tmp_path / "run"
    shutil.copytree(adapt_run, out)
    csv_path, jsonl_path = out / "predictions.csv", out / "predictions.jsonl"
    csv_bytes, jsonl_bytes = csv_path.read_bytes(), jsonl_path.read_bytes()
    whole = predtable.complete_csv_rows(csv_path)
    whole_json = predtable.complete_jsonl_rows(jsonl_path)
    assert len(whole) == len(whole_json) == 40 and whole[-1]["typicality"]
    last = len(csv_bytes) - csv_bytes[:-2].rfind(b"\r\n") - 2  # the last record, with \r\n
    for cut in range(1, last + 1):
        csv_path.write_bytes(csv_bytes[:-cut])
        assert predtable.complete_csv_rows(csv_path) == whole[:-1], cut
    last_line = len(jsonl_bytes) - jsonl_bytes[:-1].rfind(b"\n") - 1
    for cut in range(2, last_line + 1):  # cutting only the "\n" leaves a whole record
        jsonl_path.write_bytes(jsonl_bytes[:-cut])
        assert predtable.complete_jsonl_rows(jsonl_path) == whole_json[:-1], cut

    csv_path.write_bytes(csv_bytes[:-3])
    jsonl_path.write_bytes(jsonl_bytes)
    proc = run_script("predict.py", "--model", model_path, "--dir", TEST64, "--adapt", "--quiet",
                      "--json", "--batch-size", 64, "--resume", out)
    assert "Resuming: 39 of 40 files already done" in proc.stdout
    after = {r["resolved_path"]: r for r in predtable.complete_csv_rows(csv_path)}
    assert sorted(after) == sorted(r["resolved_path"] for r in whole)
    for r in whole:  # the redone row again whole (scored in another batch: last digits free)
        a = after[r["resolved_path"]]
        assert a["prediction"] == r["prediction"] and a["outside"] == r["outside"]
        assert a["atypical"] == r["atypical"]
        assert float(a["prob_pneumonia"]) == pytest.approx(float(r["prob_pneumonia"]), abs=1e-4)
        assert float(a["typicality"]) == pytest.approx(float(r["typicality"]), abs=1e-3)
