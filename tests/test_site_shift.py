"""Site shift: the out-of-distribution flag, label-free adaptation (AdaBN) and local
recalibration, on real images and real checkpoints."""

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAL_TEMPERATURE, DATA, ROOT, TINY, run_folder, run_script, tiny_test_files
from PIL import Image

from cxr import calib, checkpoints, dataset, imagefiles, network, runtime, scan, siteshift

SHIPPED = ROOT / "models" / "mobilenet_cxr.pth"


def grey_photo(path):
    """A real photograph (scikit-learn's bundled sample), in grey: not a chest X-ray."""
    from sklearn.datasets import load_sample_images

    Image.fromarray(load_sample_images().images[0]).convert("L").save(path)
    return path


def test_the_shipped_model_flags_a_photo_and_not_its_own_kind_of_film(tmp_path):
    """A grey photograph passes the structure checks (it is neither blank nor noise): it is
    atypical, and not laid out like a chest film, so it gets no verdict."""
    photo = grey_photo(tmp_path / "photo.png")
    film = ROOT / "examples" / "NORMAL2-IM-0337-0001.jpeg"
    proc = run_script("predict.py", "--image", photo, "--image", film, "--out", tmp_path)
    assert "photo.png" in proc.stdout
    block = proc.stdout.split("Image: ")
    photo_block = next(b for b in block if b.startswith(str(photo)))
    film_block = next(b for b in block if b.startswith(str(film)))
    assert ("no verdict - refer, because it is not like a chest X-ray (atypical for the "
            "training data") in photo_block
    assert "P(PNEUMONIA)" not in photo_block  # no verdict, no probability shown
    assert "NORMAL, P(PNEUMONIA) " in film_block
    rows = {r.split(",")[0]: r for r in
            (run_folder(tmp_path) / "predictions.csv").read_text().splitlines()[1:]}
    assert ",OUTSIDE,," in rows[str(photo)]  # no verdict, no confidence
    assert "No verdict for 1 of 2 image(s)" in proc.stdout
    assert "unlike those the model learnt from" not in film_block  # the film is not atypical
    assert "refer, because" not in film_block and "are atypical" not in proc.stdout
    # visualize counts the same flag, per class, and its error rates
    for label, src in (("NORMAL", photo), ("NORMAL", film),
                       ("PNEUMONIA", ROOT / "examples" / "person10_virus_35.jpeg")):
        (tmp_path / "site" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / label / src.name).write_bytes(src.read_bytes())
    run_script("visualize_results.py", "--split", tmp_path / "site", "--out", tmp_path / "ev",
               "--bootstrap", 20, "--gallery", 0)
    shift = json.loads((run_folder(tmp_path / "ev") / "metrics.json").read_text())["site_shift"]
    assert shift["flagged_share"] == pytest.approx(1 / 3)
    assert shift["flagged_by_class"] == {"NORMAL": 0.5, "PNEUMONIA": 0.0}


# --- atypical is a warning, not a silence: injected ratios, so they hold on any machine ---


MID, FAR = 1.05, 5.0  # atypical; far beyond the cut (the largest ratio of a test film: 1.42)


def inject_ratios(monkeypatch, ratios):
    """siteshift.outside_distribution answering these typicality / cut ratios, by the
    images' position in the batch (one batch)."""
    def ratios_of(members, feats):
        r = np.asarray(ratios[:len(feats[0])], dtype=float)
        return r > 1, r
    monkeypatch.setattr(siteshift, "outside_distribution", ratios_of)


def read_rows(parent):
    with open(run_folder(parent) / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def unlike(path):
    return imagefiles.unlike_a_film(dataset.load_image_array(path)) is not None


def pictures(folder):
    """16 grey pictures that are not chest films: the two sample photographs, turned and
    mirrored."""
    from sklearn.datasets import load_sample_images

    folder.mkdir()
    for i, photo in enumerate(load_sample_images().images):
        grey = Image.fromarray(photo).convert("L")
        for turn in range(4):
            for flip in (False, True):
                im = grey.rotate(90 * turn, expand=True)
                (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im).save(
                    folder / f"photo{i}_{turn}{int(flip)}.png")
    return folder


def test_chest_films_look_like_films_and_pictures_do_not():
    """The look that, with typicality, withholds a verdict: the full-resolution films
    (another hospital's adult DICOMs aside) pass it; photographs, upsampled digits, a
    gradient and a checkerboard fail it, each with a one-line reason."""
    from sklearn.datasets import load_digits, load_sample_images

    films = [*sorted((ROOT / "examples").glob("*.jpeg")), *scan.list_images(DATA / "fullres")]
    assert len(films) == 6
    for f in films:
        assert imagefiles.unlike_a_film(dataset.load_image_array(f)) is None, f.name
    ramp = np.linspace(0, 255, 224)
    cells = (np.indices((224, 224)) // 32).sum(0) % 2 * 200 + 28
    others = [np.asarray(Image.fromarray(p).convert("L").resize((224, 224))) for p in
              load_sample_images().images]
    others += [np.asarray(Image.fromarray((d * 16).astype(np.uint8)).resize((224, 224),
                                                                        Image.Resampling.BILINEAR))
               for d in load_digits().images[:5]]
    others += [np.add.outer(ramp, ramp).astype(np.uint8) // 2, cells.astype(np.uint8)]
    for a in others:
        reason = imagefiles.unlike_a_film(a)
        assert reason and "\n" not in reason and ("laid out" in reason or "fine detail" in reason)


def test_the_look_is_judged_at_film_size_whatever_the_model_input(tmp_path):
    """A model of 48 px input (the shipped weights, relabelled): most films are atypical to
    it, and the photograph check still reads each film at imagefiles.FILM_SIZE, so chest
    films keep their verdicts and a photograph gets none (read at 48 px, every film's
    fine detail would be 0 and every atypical film silenced)."""
    payload = torch.load(SHIPPED, weights_only=True)
    meta = copy.deepcopy(payload["meta"])
    meta["preprocessing"]["image_size"] = 48
    small = tmp_path / "small.pth"
    checkpoints.save_checkpoint(small, payload["state_dict"], meta, payload["typicality"])
    films = [*sorted((ROOT / "examples").glob("*.jpeg")), *scan.list_images(DATA / "fullres")]
    photo = grey_photo(tmp_path / "photo.png")
    run_script("predict.py", "--model", small, "--image", photo,
               *[a for f in films for a in ("--image", f)], "--out", tmp_path / "p")
    rows = {Path(r["file"]).name: r for r in read_rows(tmp_path / "p")}
    assert sum(rows[f.name]["atypical"] == "True" for f in films) >= 2  # the premise
    assert [f.name for f in films if rows[f.name]["prediction"] == "OUTSIDE"] == []
    assert rows["photo.png"]["prediction"] == "OUTSIDE"


def test_an_atypical_film_gets_its_verdict_and_a_warning_a_picture_none(tmp_path, monkeypatch,
                                                                        capsys):
    """A chest film with ratio above 1, however far: a verdict (prediction, confidence,
    Grad-CAM), marked atypical in the row, referred with the reason in its line. An atypical
    picture that is not laid out like a chest film: no verdict, and one line naming it.
    At or below 1: no mark, no warning."""
    import predict

    typical_f, far_f = (ROOT / "examples" / n for n in ("NORMAL2-IM-0337-0001.jpeg",
                                                         "person10_virus_35.jpeg"))
    photo_f = grey_photo(tmp_path / "photo.png")
    assert not unlike(far_f) and unlike(photo_f)  # the premises
    inject_ratios(monkeypatch, [0.5, FAR, MID])
    argv = [a for f in (typical_f, far_f, photo_f) for a in ("--image", str(f))]
    assert predict.main([*argv, "--gradcam", "--workers", "0", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    rows = {Path(r["file"]).name: r for r in read_rows(tmp_path / "o")}
    typical, far, photo = (rows[f.name] for f in (typical_f, far_f, photo_f))
    assert [float(r["typicality"]) for r in (typical, far, photo)] == pytest.approx([0.5, FAR, MID])
    for r in (typical, far):
        assert r["prediction"] in network.CLASS_NAMES and float(r["confidence"]) >= 0.5
    assert (typical["atypical"], typical["outside"]) == ("False", "False")
    assert (far["atypical"], far["outside"]) == ("True", "False")
    assert (photo["prediction"], photo["confidence"]) == ("OUTSIDE", "")
    assert (photo["atypical"], photo["outside"]) == ("True", "True")
    atypical_words = f"the film is unlike those the model learnt from (typicality {FAR:.2f} x the cut"
    assert (far["refer"], typical["refer"], photo["refer"]) == ("True", "False", "True")
    assert far["reason"].startswith(atypical_words) and typical["reason"] == ""
    assert photo["reason"].startswith("not like a chest X-ray (atypical for the training data")
    blocks = {b.split("\n")[0]: b for b in out.split("Image: ")[1:]}
    assert (f"{far['prediction']}, P(PNEUMONIA) {float(far['prob_pneumonia']):.1%} (calibrated) - "
            f"refer, because {atypical_words}") in blocks[far["file"]]
    assert "unlike those the model learnt from" not in blocks[typical["file"]]
    assert f"{typical['prediction']}, P(PNEUMONIA) " in blocks[typical["file"]]
    assert "no verdict - refer, because it is not like a chest X-ray" in blocks[photo["file"]]
    assert "P(PNEUMONIA)" not in blocks[photo["file"]]
    gradcams = {p.name for p in run_folder(tmp_path / "o").glob("*_gradcam.png")}
    assert gradcams == {f"{Path(r['file']).stem}_gradcam.png" for r in (typical, far)}
    assert "No verdict for 1 of 3 image(s)" in out
    predict.main([*argv, "--quiet", "--workers", "0", "--out", str(tmp_path / "q")])
    lines = {ln.split(": ")[0]: ln for ln in capsys.readouterr().out.splitlines()}
    for r in (typical, far, photo):  # --quiet: "<file>: " and the block's verdict line
        verdict = blocks[r["file"]].splitlines()[1]  # the line under "Image: <file>"
        assert " - answer" in verdict or " - refer, because " in verdict or " - no referral rule" in verdict
        assert lines[r["file"]] == f"{r['file']}: {verdict}"


@pytest.mark.parametrize("folder, ratios, site_warning", [
    ("tiny", [MID] + [0.5] * 15, False),  # 1 of 16 (6%) atypical: counted, no warning
    ("tiny", [MID, MID] + [0.5] * 14, True),  # 2 of 16 (12.5%): above MANY_ATYPICAL, warned once
    ("tiny", [FAR] * 16, True),  # all far beyond the cut: the films get verdicts and the warning
    ("pictures", [FAR] * 16, False),  # all pictures: no verdict, not another site's films
])
def test_a_batch_with_many_atypical_films_is_warned_once_of_another_site(
        folder, ratios, site_warning, tmp_path, monkeypatch, capsys):
    import predict

    folder = TINY / "test" if folder == "tiny" else pictures(tmp_path / "pictures")
    files = scan.list_images(folder)
    looks = [unlike(f) for f in files]
    n_atypical = sum(r > 1 and not u for r, u in zip(ratios, looks))
    n_far = sum(r > 1 and u for r, u in zip(ratios, looks))
    assert (n_atypical, n_far) != (0, 0) and (n_far == 16) == (folder.name == "pictures")
    inject_ratios(monkeypatch, ratios)
    predict.main(["--dir", str(folder), "--quiet", "--workers", "0", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert out.count("looks like another site") == int(site_warning)
    if site_warning:
        line = next(ln for ln in out.splitlines() if "looks like another site" in ln)
        assert line.startswith(f"warning: {n_atypical} of 16 image(s)")
        assert "visualize_results.py --recalibrate" in line and "--adapt" in line
    if n_atypical:
        assert f"{n_atypical} of 16 image(s) ({n_atypical / 16:.0%}) are atypical" in out
    assert (f"No verdict for {n_far} of 16 image(s)" in out) == bool(n_far)
    rows = read_rows(tmp_path / "o")
    assert sum(r["atypical"] == "True" for r in rows) == n_atypical + n_far
    assert sum(r["prediction"] == "OUTSIDE" for r in rows) == n_far


def test_typicality_for_rebuilds_the_statistics_the_run_stored(trained_run, tmp_path):
    """upgrade_checkpoint.py --typicality-for rebuilds the run's own train/validation split
    from the seed in the checkpoint; on the same weights it must give the statistics the
    run stored at its end (a wrong split or seed gives another cut)."""
    original = trained_run[0] / "mobilenet_cxr.pth"
    payload = torch.load(original, weights_only=True)
    stored = payload["typicality"]
    bare = tmp_path / "bare.pth"
    checkpoints.save_checkpoint(bare, payload["state_dict"], payload["meta"])
    assert checkpoints.load_checkpoint(bare)[0].typicality is None
    run_script("experiments/upgrade_checkpoint.py", "--typicality-for", bare, "--data", TINY,
               "--cache-dir", "")
    rebuilt = checkpoints.load_checkpoint(bare)[0].typicality
    assert rebuilt["cut"] == pytest.approx(stored["cut"], rel=1e-4)
    assert torch.allclose(rebuilt["class_means"], stored["class_means"], atol=1e-3)
    # every tensor loads with weights_only=True (no pickled objects)
    assert all(isinstance(v, (torch.Tensor, float)) for v in rebuilt.values())


@pytest.mark.slow
def test_calibrate_for_refits_the_calibration_the_run_stored(ablation_run, model_path,
                                                             tmp_path):
    """upgrade_checkpoint.py --calibrate-for rebuilds the run's calibration split from its
    seed and re-fits on the same weights: it must give back the calibration the run fitted
    at its end, and keep the one it replaces. A wrong split, seed or patient grouping gives
    other cuts."""
    payload = torch.load(ablation_run[0] / "mobilenet_cxr.pth", weights_only=True)
    stored = payload["meta"]["calibration"]
    meta = json.loads(json.dumps(payload["meta"]))
    meta["calibration"] = dict(stored, temperature=3.0, threshold=0.01)
    meta["metrics"]["test_acc"] = 0.5  # a test figure measured with the old calibration
    copy = tmp_path / "old.pth"
    checkpoints.save_checkpoint(copy, payload["state_dict"], meta, payload.get("typicality"))
    run_script("experiments/upgrade_checkpoint.py", "--calibrate-for", copy, "--data", TINY,
               "--cache-dir", "")
    refit = torch.load(copy, weights_only=True)
    calibration = refit["meta"]["calibration"]
    assert calibration["temperature"] == pytest.approx(stored["temperature"], rel=1e-4)
    assert calibration["threshold"] == pytest.approx(stored["threshold"], abs=1e-5)
    rule, stored_rule = calibration["referral"], stored["referral"]
    assert rule["min_confidence"] == pytest.approx(stored_rule["min_confidence"], abs=1e-5)
    assert (rule["films"], rule["answered"], rule["errors"]) == (
        stored_rule["films"], stored_rule["answered"], stored_rule["errors"])
    assert calibration["threshold_interval"] == pytest.approx(stored["threshold_interval"],
                                                             abs=1e-5)
    history = refit["meta"]["recalibrated"]
    assert history["previous_calibration"]["temperature"] == 3.0
    assert history["test_metrics_with_previous"] == {"test_acc": 0.5}
    assert "test_acc" not in refit["meta"]["metrics"]
    assert all(torch.equal(refit["state_dict"][k], v) for k, v in payload["state_dict"].items())
    # a reference-recipe checkpoint has no calibration split: one line, no traceback
    bad = run_script("experiments/upgrade_checkpoint.py", "--calibrate-for", model_path,
                     "--data", TINY, "--cache-dir", "", check=False)
    assert bad.returncode == 1 and "trained without a calibration split" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_adabn_changes_only_batchnorm_statistics_to_those_of_the_images(model_path):
    model, meta = checkpoints.load_checkpoint(model_path)
    size = meta["preprocessing"]["image_size"]
    x = np.stack([dataset.load_image_array(f, size) for f in tiny_test_files()])
    adapted = siteshift.adapt_batchnorm(model, x, network.intensity_of(meta), batch_size=5)
    before, after = model.state_dict(), adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("running_" in k or "num_batches" in k for k in changed)
    # the first BatchNorm's running mean is the mean of its input over all the images
    seen = []
    hook = model.features[0][0].register_forward_hook(lambda m, i, o: seen.append(o))
    network.predict_logits(model, x, network.intensity_of(meta))
    hook.remove()
    mean = torch.cat(seen).mean((0, 2, 3))
    assert torch.allclose(after["features.0.1.running_mean"], mean, atol=1e-4)
    assert not torch.allclose(before["features.0.1.running_mean"], mean, atol=1e-2)


def test_recalibration_partitions_are_whole_patients_with_both_classes():
    from cxr.siteprotocol import site_partitions

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)  # 60 patients, 3 images each
    y = (np.arange(60) % 3 == 0).repeat(3).astype(int)  # a third of patients positive
    parts = site_partitions(groups, y, 20, rng)
    assert len(parts) == len(y) // 20
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(y)))  # every image exactly once
    for part in parts:
        assert set(y[part]) == {0, 1}
        for other in parts:
            if other is not part:
                assert not set(groups[part]) & set(groups[other])  # no patient in two


def test_recalibrate_and_save_a_site_model(calibrated, tmp_path):
    """visualize --recalibrate scores every image with a calibration fitted on other
    patients, reports it beside the zero-shot figures, and --save-calibrated writes a
    model predict.py uses with the new threshold."""
    site = tmp_path / "site.pth"
    proc = run_script("visualize_results.py", "--model", calibrated.path, "--split",
                      TINY / "test", "--out", tmp_path, "--bootstrap", 20,
                      "--recalibrate", 4, "--draws", 3, "--save-calibrated", site)
    assert "Local recalibration on" in proc.stdout and "after AdaBN" not in proc.stdout
    evaluation = run_folder(tmp_path)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["protocol"].startswith("zero-shot")
    (row,) = metrics["recalibration"]
    assert row["K"] == 4 and row["draws"] == 3
    # a fit on 4 images holds 1-3 pneumonias: no rank can promise sensitivity 0.97
    assert row["sensitivity_promised"] in (0.5, pytest.approx(2 / 3), 0.75)
    assert "K = 4: too few pneumonia films per fit" in proc.stdout
    _, meta = checkpoints.load_checkpoint(site)
    cal = checkpoints.calibration_of(meta).to_dict()
    assert "labelled images of" in meta["calibration"]["fitted_on"]
    assert meta["recalibrated_from"]["threshold"] == pytest.approx(calibrated.threshold)
    # the site's temperature acts on top of the stored one (it was fitted on probabilities
    # already scaled by 1 / 0.4)
    site_t = meta["calibration"]["temperature_fitted"] if meta["calibration"]["temperature_kept"] \
        else 1.0
    assert cal["temperature"] == pytest.approx(CAL_TEMPERATURE * site_t)
    out = tmp_path / "pred"
    proc = run_script("predict.py", "--model", site, "--dir", TINY / "test", "--out", out,
                      "--quiet")
    assert f"threshold P(PNEUMONIA) >= {cal['threshold']:.3f}" in proc.stdout
    # the site's referral rule replaces the stored one: fitted on the K = 4 films of the
    # fit, too few to certify 4% error (4 films without an error bound it at
    # 1 - 0.05^(1/4) = 0.53), so it refers every film, and says why
    rule = cal["referral"]
    assert rule["films"] == 4 and rule["min_confidence"] > 1 and rule["answered"] == 0
    assert f"Referral rule: {checkpoints.calibration_of(meta).rule_words()}" in proc.stdout
    rows = read_rows(out)
    assert len(rows) == 16 and all(r["refer"] == "True" for r in rows)
    assert all("none of the cuts the rule's search tried" in r["reason"] for r in rows)
    table = run_script("experiments/protocol_table.py", "--seeds", evaluation).stdout
    assert "| local recalibration, K = 4, cross-fitted | 1 |" in table


def test_recalibration_after_adabn_is_its_own_protocol(model_path, tmp_path):
    """--adapt --recalibrate K fits the site calibration on the adapted model's scores:
    the console, metrics.json and the protocol table name it apart from recalibrating
    the model as shipped (a seed table must not average the two protocols together)."""
    proc = run_script("visualize_results.py", "--model", model_path, "--split", TINY / "test",
                      "--out", tmp_path, "--bootstrap", 20, "--adapt", "--recalibrate", 4,
                      "--draws", 2)
    assert "after AdaBN" in proc.stdout
    folder = run_folder(tmp_path)
    assert json.loads((folder / "metrics.json").read_text())["protocol"].startswith("label-free")
    table = run_script("experiments/protocol_table.py", "--seeds", folder).stdout
    assert "| AdaBN + local recalibration, K = 4, cross-fitted | 1 |" in table
    rows = run_script("experiments/protocol_table.py", folder).stdout
    assert "| AdaBN + local recalibration, K = 4 labelled images of test" in rows


def test_the_ceiling_is_the_highest_threshold_keeping_the_target_sensitivity(tmp_path):
    """protocol_table --ceiling reads the threshold off the folder's own labels: with 100
    pneumonias at 0.10..0.99 and 10 normals at 0.05 the highest threshold keeping
    sensitivity >= 0.97 is the 4th lowest pneumonia score (97 of 100 at or above it).
    Guards against scikit-learn's default ROC, which drops the points in between and
    would return the lowest pneumonia score (sensitivity 1.0), and against the wrong
    class or a strict inequality."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "protocol_table", ROOT / "experiments" / "protocol_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    scores = np.linspace(0.10, 0.99, 100)
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "prediction", "prob_pneumonia"])
        w.writerows([f"p{i}.png", "PNEUMONIA", "", f"{q:.6f}"] for i, q in enumerate(scores))
        w.writerows([f"n{i}.png", "NORMAL", "", "0.050000"] for i in range(10))
    c = table.ceiling(tmp_path)
    assert c["threshold"] == pytest.approx(scores[3], abs=1e-6)
    assert c["sensitivity"] == pytest.approx(0.97) and c["specificity"] == 1.0
    assert c["accuracy"] == pytest.approx(107 / 110)


def test_predict_adapt_is_recorded_and_resume_must_match(model_path, tmp_path):
    proc = run_script("predict.py", "--model", model_path, "--dir", TINY / "test", "--out",
                      tmp_path, "--adapt", "--quiet")
    assert "--adapt: BatchNorm statistics re-estimated on 16 unlabeled image(s)" in proc.stdout
    assert "warning: --adapt: only 16 image(s) to adapt to" in proc.stderr
    out = run_folder(tmp_path)
    assert json.loads((out / "run.json").read_text())["adapt"] is True
    proc = run_script("predict.py", "--model", model_path, "--dir", TINY / "test",
                      "--resume", out, check=False)
    assert proc.returncode != 0 and "--adapt setting" in proc.stderr


def test_an_ensemble_is_calibrated_on_one_shared_set(ensemble, tmp_path):
    """Without a shared calibration an ensemble averages its members' thresholds (each
    fitted on its own split) and says so; --save-calibrated ENSEMBLE.pth fits one
    calibration for the ensemble's probability, inside a copy of the ensemble file that
    predict uses, and refuses to load with its members' temperatures changed."""
    paths, built = ensemble
    proc = run_script("predict.py", "--model", built.path, "--dir", TINY / "test", "--out",
                      tmp_path / "a", "--quiet")
    note = "threshold is the mean of its members' own and its referral rule the strictest of theirs"
    assert note in proc.stdout
    # built without a shared set: the members' mean threshold and strictest rule, marked
    built_cal = torch.load(built.path, weights_only=True)["calibration"]
    assert built_cal["threshold"] == pytest.approx(built.threshold, abs=1e-12)
    assert built_cal["referral"]["min_confidence"] == pytest.approx(built.min_confidence, abs=1e-12)
    assert built_cal["referral"]["approximate"] is True and built_cal["shared"] is False
    assert "nothing certified for this ensemble" in proc.stdout  # the borrowed rule promises nothing
    # each member has its own validation split: --split val is refused, in one line
    beside = tmp_path / "run" / "ensemble.pth"  # as if saved into a run folder with its split
    beside.parent.mkdir()
    shutil.copy(built.path, beside)
    film = sorted((TINY / "test" / "NORMAL").iterdir())[0]
    (beside.parent / "val_split.csv").write_text(f"file,label,split\n{film},NORMAL,val\n")
    proc = run_script("visualize_results.py", "--model", beside, "--split", "val", "--out",
                      tmp_path / "v", check=False)
    assert proc.returncode != 0 and "--split val needs one model" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    saved = tmp_path / "ensemble_site.pth"
    run_script("visualize_results.py", "--model", built.path, "--split", TINY / "test", "--out",
               tmp_path, "--bootstrap", 20, "--recalibrate", 4, "--draws", 2, "--save-calibrated", saved)
    payload = torch.load(saved, weights_only=True)
    cal = payload["calibration"]
    assert [m["sha256"] for m in payload["meta"]["built_from"]] == [cc_sha(built.path)]
    assert cal["shared"] is True and "labelled images of" in cal["fitted_on"]
    # one rule, fitted on the K = 4 films of the fit, replaces the strictest member's
    assert cal["referral"]["films"] == 4 and "approximate" not in cal["referral"]
    # on 16 images the fitted temperature may not be kept (T = 1): set one far from 1, so
    # that predict must apply it
    cal["ensemble_temperature"] = 2.5
    torch.save(payload, saved)
    proc = run_script("predict.py", "--model", saved, "--dir", TINY / "test",
                      "--out", tmp_path / "b", "--quiet")
    assert f"threshold P(PNEUMONIA) >= {cal['threshold']:.3f}" in proc.stdout
    assert note not in proc.stdout
    # and the probabilities are the shared calibration's: the mean, its logit / T
    rows = list(csv.DictReader(open(run_folder(tmp_path / "b") / "predictions.csv")))
    members = [checkpoints.load_checkpoint(p) for p in paths]
    size = members[0][1]["preprocessing"]["image_size"]
    x = np.stack([dataset.load_image_array(r["resolved_path"], size) for r in rows])
    p = network.mean_probability(network.member_logits(members, x), cal["temperatures"])
    expect = network.probabilities(torch.from_numpy(np.c_[np.zeros(len(p)), network.logit(p)]), 2.5)
    assert np.allclose([float(r["prob_pneumonia"]) for r in rows], expect, atol=2e-6)
    cal["temperatures"] = cal["temperatures"][::-1]  # not the members' own any more
    torch.save(payload, saved)
    proc = run_script("predict.py", "--model", saved, "--image", x_file(), "--out",
                      tmp_path / "c", check=False)
    assert proc.returncode != 0 and "members' own stored temperatures" in proc.stderr


def cc_sha(path):
    return runtime.sha256_file(path)


def x_file():
    return tiny_test_files()[0]


def test_no_image_is_scored_by_a_calibration_fitted_on_its_patient(monkeypatch):
    """The cross-fitting promise of --recalibrate: in every fit, the images scored and
    the images fitted on share no patient, and every image is scored once per draw."""
    from cxr import siteprotocol

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(80), 2)
    y = (np.arange(80) % 3 == 0).repeat(2).astype(int)
    p = np.clip(y * 0.6 + rng.uniform(0, 0.4, len(y)), 0.01, 0.99)
    calls, real = [], siteprotocol.recalibrated_scores

    def spy(y_, logit, fit_rows, score_rows, groups_, seed):
        calls.append((fit_rows, score_rows))
        return real(y_, logit, fit_rows, score_rows, groups_, seed)

    monkeypatch.setattr(siteprotocol, "recalibrated_scores", spy)
    (row,) = siteprotocol.recalibrate(y, p, groups, [40], draws=2)
    assert row["draws"] == 2 and len(calls) == 2 * (len(y) // 40)
    for fit_rows, score_rows in calls:
        assert not set(groups[fit_rows]) & set(groups[score_rows])
    for d in range(2):
        scored = np.concatenate([s for _, s in calls[d * 4:(d + 1) * 4]])
        assert sorted(scored.tolist()) == list(range(len(y)))


def test_calibration_resamples_whole_patients_with_their_shifted_copies(model_path, monkeypatch):
    """calibrate() hands fit_calibration one group per patient: a patient's images and
    all their shifted copies are drawn (and cross-fitted) together."""
    from cxr import recipes

    model, meta = checkpoints.load_checkpoint(model_path)
    files = tiny_test_files()
    x = np.stack([dataset.load_image_array(f, 64) for f in files])
    y = np.array([int("PNEUMONIA" in str(f)) for f in files])
    patients = [f"patient{i // 2}" for i in range(len(files))]  # two images per patient
    seen = {}
    real = calib.fit_calibration

    def spy(logits, labels, groups=None, seed=0, films=None):
        seen["groups"], seen["labels"], seen["films"] = groups, labels, films
        return real(logits, labels, groups, seed, films)

    monkeypatch.setattr(calib, "fit_calibration", spy)
    cal = calib.calibrate(model, x, y, patients, recipes.recipe_for("improved")["intensity"], seed=0)
    groups = np.asarray(seen["groups"])
    assert list(groups) == patients * calib.STRESS_COPIES
    # the referral rule is fitted on the 16 films themselves, one row each
    assert len(seen["labels"]) == 16 * calib.STRESS_COPIES and list(seen["films"][1]) == list(y)
    assert cal.referral["films"] == 16


def test_adabn_does_not_depend_on_the_order_or_batching_of_the_images():
    """AdaBN statistics are moments over all the images: the same images in another
    order give the same probabilities, and in other batches the same to 1e-5. Statistics
    taken per batch did not: with files read NORMAL first, each batch was nearly one
    class."""
    model, meta = checkpoints.load_checkpoint(SHIPPED)
    size, intensity = meta["preprocessing"]["image_size"], network.intensity_of(meta)
    x = np.stack([dataset.load_image_array(f, size) for f in tiny_test_files()])  # NORMAL first
    order = np.random.default_rng(0).permutation(len(x))
    probs = []
    for idx, batch in ((np.arange(len(x)), 5), (order, 5), (order, 16)):
        adapted = siteshift.adapt_batchnorm(model, x[idx], intensity, batch_size=batch)
        p = np.empty(len(x))
        p[idx] = network.probabilities(network.predict_logits(adapted, x[idx], intensity))
        probs.append(p)
    assert np.abs(probs[0] - probs[1]).max() < 1e-6
    assert np.abs(probs[0] - probs[2]).max() < 1e-5
    # the premise: adaptation changes the answers (else the comparison proves little)
    p0 = network.probabilities(network.predict_logits(model, x, intensity))
    assert np.abs(probs[0] - p0).max() > 0.01


def test_adabn_warns_for_a_small_or_one_sided_set():
    assert "only 6 image(s)" in siteshift.adaptation_warning(6, [0, 0, 0, 0, 1, 1])
    one_sided = siteshift.adaptation_warning(200, np.r_[np.ones(190), np.zeros(10)])
    assert "95% of these images PNEUMONIA" in one_sided
    assert "NORMAL" in siteshift.adaptation_warning(200, np.r_[np.zeros(185), np.ones(15)])
    assert siteshift.adaptation_warning(200, np.r_[np.ones(120), np.zeros(80)]) is None


def test_adabn_statistics_are_those_of_all_the_images_in_one_batch():
    """The exact population moments: what a training-mode pass over all the images as a
    single batch gives (each layer normalised by the adapted layers before it), here
    computed by torch's own BatchNorm, against the block-wise computation in batches."""
    model, meta = checkpoints.load_checkpoint(SHIPPED)
    size, intensity = meta["preprocessing"]["image_size"], network.intensity_of(meta)
    x = np.stack([dataset.load_image_array(f, size) for f in tiny_test_files()])
    adapted = siteshift.adapt_batchnorm(model, x, intensity, batch_size=5)
    reference = copy.deepcopy(model).train()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics = this one batch's
    with torch.no_grad():
        reference(network.model_input(torch.as_tensor(x).unsqueeze(1), intensity))
    ours, theirs = adapted.state_dict(), reference.state_dict()
    for k in ours:
        if "running_" in k:  # float32 sums in another order: close, not equal
            assert torch.allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-3), k
    # the answers agree to what separates normalising by the biased variance (training
    # mode) from the unbiased one (evaluation): statistics per batch moved them by 0.16
    p = network.probabilities(network.predict_logits(adapted, x, intensity))
    p_ref = network.probabilities(network.predict_logits(reference.eval(), x, intensity))
    assert np.abs(p - p_ref).max() < 0.01
