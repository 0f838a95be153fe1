"""What a training run writes besides its state: the split file, the list of skipped
files, the test split's report, and at the end the checkpoint, history, plot and
results text.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from cxr import checkpoints, dataset, network, recipes, runstate, runtime


def report_skipped(run_dir: Path, skipped):
    """Name each unusable file on the console and in skipped_files.txt; training goes on."""
    if not skipped:
        return
    lines = [f"{runtime.display_name(p)}: {reason}" for p, reason in skipped]
    for line in lines:
        print(f"skipped: {line}", file=sys.stderr)
    with open(run_dir / "skipped_files.txt", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    listed = runtime.display_name(run_dir / "skipped_files.txt")
    print(f"Skipped {len(lines)} unusable file(s), listed in {listed}")


def write_split_csv(path, used: dict):
    """Which file went to which split (train, val, cal), with its label and patient; the
    file as an absolute path, so that the split is found from any working folder. Code
    reads the file back (visualize_results.py --split val), so the path is stored exactly,
    bytes that are not UTF-8 included (surrogateescape), and not escaped: being absolute, it
    never starts like a spreadsheet formula. The patient (a file stem) is written as
    display_name shows it, through csv_cell."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["split", "label", "patient", "file"])
        for split, (ps, ls) in used.items():
            for p, y in zip(ps, ls):
                patient = runtime.csv_cell(runtime.display_name(dataset.patient_id(p)))
                w.writerow([split, network.CLASS_NAMES[y], patient, os.path.abspath(p)])


def test_report(y_test, test: dict) -> tuple[dict, str]:
    """The test split's metrics for the checkpoint, and the published run's report:
    accuracy, classification report, confusion matrix and ROC AUC. test is what the
    training script's evaluate() returned on the test split (its decisions in "pred")."""
    # imported here: scikit-learn costs 1.5 s at start-up, which --help and errors never need
    from sklearn.metrics import classification_report, confusion_matrix

    cm = confusion_matrix(y_test, test["pred"], labels=[0, 1])
    recalls = cm.diagonal() / np.maximum(cm.sum(1), 1)
    report = classification_report(y_test, test["pred"], labels=[0, 1],
                                   target_names=network.CLASS_NAMES, digits=4, zero_division=0)
    text = (f"Test Accuracy: {test['accuracy'] * 100:.2f}%\n\n"
            f"Classification Report:\n{report}\n"
            f"Confusion Matrix (rows: true {network.CLASS_NAMES}, columns: predicted):\n{cm}\n"
            f"Test ROC AUC: {test['auc']:.4f}\n")
    return {"test_acc": test["accuracy"], "test_auc": test["auc"], "test_f1": test["f1"],
            "test_confusion": cm.tolist(), "test_recall_normal": float(recalls[0]),
            "test_recall_pneumonia": float(recalls[1])}, text


def run_meta(args, recipe: dict, metrics: dict, calibration, weights: str, validation: str,
             commands: list[str], hardware: str, processes: int, seconds: float) -> dict:
    """The checkpoint's metadata: preprocessing, the recipe (fields and words), the run's
    arguments, its metrics and calibration, and how it was run (commands, hardware)."""
    meta = checkpoints.base_meta(args.image_size, recipe["intensity"])
    meta.update(recipe=args.recipe, recipe_details=recipes.describe(recipe), recipe_fields=recipe,
                ablate=args.ablate, seed=args.seed, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, weights=weights,
                validation=validation, val_fraction=args.val_fraction,
                calib_fraction=args.calib_fraction if recipe["calibrate"] else None,
                metrics=metrics, command=commands[0],
                resumed_with=commands[1:], hardware=hardware, processes=processes,
                wall_seconds=round(seconds, 1),
                calibration=None if calibration is None else calibration.to_dict())
    return meta


def write_outputs(run_dir: Path, best, meta, history, test_text, typicality):
    """The checkpoint, the history, the plot and the results text, then the resumable
    state is no longer needed (until then a file that cannot be written stops the run
    with one line, and --resume writes them all again)."""
    ts = runtime.timestamp()
    best_h = history[best["epoch"] - 1]
    lines = [f"Command: {meta['command']}", *(f"Resumed with: {c}" for c in meta["resumed_with"]),
             f"Recipe: {meta['recipe']}, seed {meta['seed']}",
             f"Hardware: {meta['hardware']} x {meta['processes']}",
             f"Wall time: {meta['wall_seconds']:.0f} s", f"Validation: {meta['validation']}",
             f"Best epoch ({meta['recipe_details']['selection']}): {best['epoch']} "
             f"(F1 {best_h['val_f1']:.4f}, AUC {best_h['val_auc']:.4f})",
             f"Calibration: {json.dumps(meta['calibration'])}", ""]
    lines += [f"Epoch {h['epoch']}: train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f} | "
              f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f} F1 {h['val_f1']:.4f} "
              f"AUC {h['val_auc']:.4f} | lr {h['lr']:.2e} | {h['seconds']:.0f} s"
              for h in history]
    writes = {
        "mobilenet_cxr.pth": lambda p: checkpoints.save_checkpoint(p, best["state"], meta, typicality),
        f"training_history_{ts}.json": lambda p: p.write_text(
            json.dumps({"meta": meta, "history": history}, indent=2)),
        f"training_plot_{ts}.png": lambda p: save_plot(history, p),
        f"training_results_{ts}.txt": lambda p: p.write_text(
            "\n".join(lines) + "\n\n" + test_text),
    }
    for name, write in writes.items():
        with runstate.exit_if_unwritable(run_dir / name, run_dir), runstate.ctrl_c_held():
            write(run_dir / name)
    (run_dir / "last_state.pth").unlink(missing_ok=True)
    print(f"Saved {runtime.display_name(run_dir / 'mobilenet_cxr.pth')} and reports in "
          f"{runtime.display_name(run_dir)}/ ({meta['wall_seconds'] / 60:.1f} min)")


def save_plot(history, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    axes[0].set_title("Loss")
    axes[1].plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    axes[1].plot(epochs, [h["val_acc"] for h in history], "o-", label="validation")
    axes[1].set_title("Accuracy")
    axes[2].plot(epochs, [h["val_f1"] for h in history], "o-", label="val F1")
    axes[2].plot(epochs, [h["val_auc"] for h in history], "o-", label="val ROC AUC")
    axes[2].set_title("Validation F1 and AUC")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------
