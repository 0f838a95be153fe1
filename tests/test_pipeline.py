"""End to end: download (import) -> train -> predict with Grad-CAM -> visualize."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, ROOT, TINY, run_folder, run_script, train_args

from cxr import checkpoints, dataset, network


def test_download_imports_local_copy_and_reports(tmp_path):
    nested = tmp_path / "archive" / "chest_xray"  # the Kaggle archive nests chest_xray/
    (tmp_path / "archive" / "__MACOSX" / "chest_xray" / "train").mkdir(parents=True)
    import shutil

    shutil.copytree(TINY, nested / "chest_xray")
    dup = nested / "chest_xray" / "test" / "NORMAL" / "copy_of_train.jpeg"
    shutil.copy(next((TINY / "train" / "NORMAL").iterdir()), dup)
    (nested / "chest_xray" / "train" / "PNEUMONIA" / "broken.jpeg").write_bytes(b"not a jpeg")
    dest = tmp_path / "chest_xray"
    proc = run_script("download_dataset.py", "--source", tmp_path / "archive", "--data", dest,
                      "--mode", "copy")
    out = proc.stdout
    counts = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()
              if ln.split()[:1] in (["train"], ["test"])}
    assert counts["train"] == ["24", "25", "49"]  # 24 + 24 images + the broken file
    assert counts["test"] == ["9", "8", "17"]
    assert "Unreadable files: 1" in out and "broken.jpeg" in out
    assert "across splits: 1" in out and "copy_of_train.jpeg" in out
    assert not (dest / "__MACOSX").exists()
    assert list(dest.glob("dataset_report_*.txt"))


def test_download_fails_in_one_line(tmp_path):
    proc = run_script("download_dataset.py", "--source", tmp_path, "--data", tmp_path / "d",
                      check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "no train/ and test/" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_training_writes_all_artifacts(trained_run):
    run_dir, proc = trained_run
    out = proc.stdout
    for text in ("Epoch 3/3", "Train Loss:", "Val F1:", "New best model saved",
                 "Learning rate:", "Test Accuracy:", "Classification Report:",
                 "Confusion Matrix"):
        assert text in out, text
    names = {p.name.split("_2")[0] for p in run_dir.iterdir()}
    assert {"mobilenet_cxr.pth", "training_results", "training_history", "training_plot",
            "val_split.csv"} <= names
    assert not (run_dir / "last_state.pth").exists()
    history = json.loads(next(run_dir.glob("training_history_*.json")).read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3]


@pytest.mark.slow
def test_checkpoint_round_trip_is_the_best_epoch(trained_run, model_path):
    """weights_only load; the stored weights re-evaluate on the saved validation split to
    the stored val F1, and best_epoch is the history's epoch of highest val F1. (Whether
    they are that epoch's weights and not the last's cannot be seen where this machine's
    run finds its last epoch best; test_training_selection.py checks that on a run with
    injected validation scores.)"""
    payload = torch.load(model_path, weights_only=True)
    meta = payload["meta"]
    assert payload["format"] == checkpoints.CHECKPOINT_FORMAT
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert meta["recipe"] == "reference" and meta["seed"] == 0
    assert meta["preprocessing"]["image_size"] == 64
    assert meta["weights"].startswith(("offline", "torchvision"))
    # re-evaluate on the saved validation split: must give the stored val F1
    model, _ = checkpoints.load_checkpoint(model_path)
    rows = list(csv.DictReader(open(trained_run[0] / "val_split.csv")))
    val = [r for r in rows if r["split"] == "val"]
    x = np.stack([dataset.load_image_array(r["file"], 64) for r in val])
    y = np.array([network.CLASS_NAMES.index(r["label"]) for r in val])
    probs = network.ensemble_probability([(model, meta)], x, [1.0])
    from sklearn.metrics import f1_score

    assert abs(f1_score(y, probs >= 0.5) - meta["metrics"]["val_f1"]) < 1e-9
    history = json.loads(next(trained_run[0].glob("training_history_*.json")).read_text())
    f1s = [h["val_f1"] for h in history["history"]]
    assert meta["metrics"]["best_epoch"] == 1 + f1s.index(max(f1s))


def test_predict_single_image_with_gradcam_and_json(model_path, tmp_path):
    img = DATA / "fullres" / "person20_bacteria_69.jpeg"  # full resolution, 1118 x 740
    proc = run_script("predict.py", "--model", model_path, "--image", img, "--gradcam",
                      "--json", "--out", tmp_path / "out")
    # a reference-recipe model: never calibrated, and it says so
    assert "uncalibrated: PNEUMONIA when P(PNEUMONIA) >= 0.5, no referral rule" in proc.stdout
    assert "% (uncalibrated) - no referral rule (uncalibrated model)" in proc.stdout
    assert "not a diagnosis" in proc.stdout
    out = run_folder(tmp_path / "out")
    assert (out / "person20_bacteria_69_gradcam.png").stat().st_size > 10_000
    (row,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert row["prediction"] in network.CLASS_NAMES
    assert abs(row["prob_normal"] + row["prob_pneumonia"] - 1) < 1e-5


def test_predict_dir_matches_visualize(model_path, tmp_path):
    """predict.py and visualize_results.py share preprocessing: same probabilities."""
    run_script("predict.py", "--model", model_path, "--dir", TINY / "test", "--quiet",
               "--out", tmp_path / "p")
    rows = list(csv.DictReader(open(run_folder(tmp_path / "p") / "predictions.csv")))
    assert len(rows) == 16
    proc = run_script("visualize_results.py", "--model", model_path, "--split", TINY / "test",
                      "--out", tmp_path / "v", "--bootstrap", 100)
    for text in ("Accuracy:", "False positives", "False negatives",
                 "Mean confidence of errors", "Median confidence of errors",
                 "Errors with confidence > 0.8", "ROC AUC", "ECE"):
        assert text in proc.stdout, text
    for f in ("confusion_matrix.png", "roc_curve.png", "prediction_confidence.png",
              "reliability_diagram.png", "pr_curve.png", "accuracy_coverage.png",
              "report.html", "metrics.json", "predictions.csv"):
        assert (run_folder(tmp_path / "v") / f).stat().st_size > 0, f
    vis = {r["file"]: float(r["prob_pneumonia"])
           for r in csv.DictReader(open(run_folder(tmp_path / "v") / "predictions.csv"))}
    for r in rows:
        assert abs(vis[r["file"]] - float(r["prob_pneumonia"])) < 1e-4
    metrics = json.loads((run_folder(tmp_path / "v") / "metrics.json").read_text())
    labels = [0 if "/NORMAL/" in f else 1 for f in vis]
    preds = [int(p >= 0.5) for p in vis.values()]
    assert abs(metrics["at_threshold"]["accuracy"]
               - np.mean(np.array(labels) == np.array(preds))) < 1e-9


def test_ensemble_averages_members(model_path, tmp_path):
    img = TINY / "test" / "NORMAL" / sorted(p.name for p in (TINY / "test" / "NORMAL").iterdir())[0]
    one = run_script("predict.py", "--model", model_path, "--image", img, "--json",
                     "--out", tmp_path / "a")
    run_script("experiments/build_ensemble.py", "--model", model_path, "--model", model_path,
               "--out", tmp_path / "twice.pth")
    two = run_script("predict.py", "--model", tmp_path / "twice.pth", "--image",
                     img, "--json", "--out", tmp_path / "b")
    assert "ensemble of 2" in two.stdout and one.returncode == 0
    a = json.loads((run_folder(tmp_path / "a") / "predictions.jsonl").read_text())
    b = json.loads((run_folder(tmp_path / "b") / "predictions.jsonl").read_text())
    assert abs(a["prob_pneumonia"] - b["prob_pneumonia"]) < 1e-6


def test_missing_model_is_one_line(tmp_path):
    proc = run_script("predict.py", "--model", tmp_path / "nope.pth", "--image",
                      ROOT / "README.md", check=False)
    assert proc.returncode != 0 and "model file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_scripts_have_help(capsys):
    import importlib

    for script in ("download_dataset", "train_cxray", "predict", "visualize_results"):
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script).parse_args(["--help"])
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out, script


@pytest.mark.slow
def test_the_pretrained_ablation_trains_from_scratch(tmp_path):
    proc = run_script("train_cxray.py", *train_args(tmp_path, "--epochs", 1, "--recipe", "improved",
                                                    "--ablate", "pretrained"))
    assert "MobileNetV2 weights: random-init" in proc.stdout
    assert "Ablation (pretrained): initial_weights = random" in proc.stdout
    assert "Test split not read" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("improved-no-pretrained_seed42")


def test_shipped_model_on_bundled_examples(tmp_path):
    """The README's main job: the default (shipped) model on examples/, with Grad-CAM."""
    proc = run_script("predict.py", "--dir", ROOT / "examples", "--gradcam", "--out", tmp_path / "o")
    assert "Predicted 5 image(s)" in proc.stdout
    assert "Skipped 1 file(s)" in proc.stdout and "README.md: not an image" in proc.stdout
    assert "threshold P(PNEUMONIA) >=" in proc.stdout
    rows = {r["file"].split("/")[-1]: r
            for r in csv.DictReader(open(run_folder(tmp_path / "o") / "predictions.csv"))
            if not r["error"]}
    # the two bundled test-split pneumonia images are ones the shipped model gets right
    assert rows["person100_bacteria_475.jpeg"]["prediction"] == "PNEUMONIA"
    assert rows["person10_virus_35.jpeg"]["prediction"] == "PNEUMONIA"
    # one healthy test film lies just outside the training distribution, not far: its
    # verdict and heatmap with a warning, and the batch warning counts it
    atypical = rows["IM-0001-0001.jpeg"]
    assert atypical["prediction"] == "NORMAL" and atypical["atypical"] == "True"
    assert atypical["outside"] == "False"
    assert "1 of 5 image(s) (20%) are atypical for the training data" in proc.stdout
    gradcams = {p.name for p in run_folder(tmp_path / "o").glob("*_gradcam.png")}
    assert len(gradcams) == 5 and "IM-0001-0001_gradcam.png" in gradcams
    meta = torch.load(ROOT / "models" / "mobilenet_cxr.pth", weights_only=True)["meta"]
    assert meta["recipe"] == "improved" and meta["calibration"]["temperature"] > 0


@pytest.mark.slow
def test_ablation_run_changes_one_part_and_never_reads_test(ablation_run):
    run_dir, proc = ablation_run
    assert "Test split not read" in proc.stdout and "Test Accuracy" not in proc.stdout
    assert run_dir.name.endswith("improved-no-equalize_seed42")
    meta = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)["meta"]
    assert meta["ablate"] == ["equalize"] and network.intensity_of(meta) == "none"
    assert meta["recipe_details"]["loss"].startswith("CrossEntropyLoss(class-balanced")
    assert not any(k.startswith("test_") for k in meta["metrics"])
    # its warm-up + cosine schedule steps once per batch: after its one epoch the warm-up
    # is over and the rate is the full one (stepped once per epoch, or never, it would
    # be a fraction of it)
    history = json.loads(next(run_dir.glob("training_history_*.json")).read_text())["history"]
    assert history[0]["lr"] == pytest.approx(meta["lr"])
    bad = run_script("train_cxray.py", "--ablate", "loss", check=False)
    assert bad.returncode == 2 and "use them with --recipe improved" in bad.stderr


def test_validation_check_scores_held_out_shifts(selection_run):
    """Rows for every held-out family, and the kept epoch's validation loss, whichever
    epoch this machine's run keeps."""
    run_dir, _ = selection_run
    proc = run_script("experiments/validation_check.py", "--markdown", run_dir)
    for family in ("noise", "low-res", "jpeg-q15", "zoom-out", "off-centre", "edge-enhance"):
        assert f"held-out: {family}" in proc.stdout
    (row,) = [s for s in proc.stdout.splitlines() if s.startswith("| reference |")]
    kept_loss, auc = float(row.split("|")[3]), float(row.split("|")[4])
    assert 0.0 <= auc <= 1.0
    # the reference recipe keeps the epoch of highest validation F1 (the first, on a tie)
    (history_file,) = Path(run_dir).glob("training_history_*.json")
    history = json.loads(history_file.read_text())["history"]
    kept = max(history, key=lambda h: (h["val_f1"], -h["epoch"]))
    assert kept_loss == pytest.approx(kept["val_loss"], abs=5e-5)


@pytest.mark.parametrize("script", ["predict.py", "visualize_results.py"])
def test_model_is_given_once(script, capsys):
    """An ensemble is one file: a second --model is refused (it used to add a member),
    never silently dropped."""
    import importlib

    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--model", "a.pth", "--model", "b.pth", "--image", "x.png"])
    assert e.value.code == 2
    assert "--model is given once: build an ensemble file" in capsys.readouterr().err
