#!/usr/bin/env python3
"""Step 4 of 4: evaluate a checkpoint on the test split and draw what went wrong.

    python visualize_results.py                                # models/ + chest_xray/test
    python visualize_results.py --model runs/<run>/mobilenet_cxr.pth
    python visualize_results.py --data /hospital/xrays         # any {NORMAL,PNEUMONIA}/
    python visualize_results.py --model a.pth --model b.pth    # ensemble

Prints accuracy and the error analysis of the reference (false positives / negatives,
confidence of the errors, share of errors made with confidence > 0.8) and writes to a
new folder outputs/eval_<timestamp>/:
  confusion_matrix.png, roc_curve.png, prediction_confidence.png, pr_curve.png,
  reliability_diagram.png (ECE, 15 bins), accuracy_coverage.png, predictions.csv,
  metrics.json and report.html (every figure, the metrics table with 95% bootstrap
  intervals, and a gallery of the most confident errors with Grad-CAM).
The decision threshold and temperature are the ones stored in the checkpoint (chosen on
validation data by training); nothing here is tuned on the data being evaluated.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    roc_auc_score,
)
from tqdm import tqdm  # noqa: E402

import cxr_common as cc  # noqa: E402
from gradcam import GradCAM, overlay  # noqa: E402

CONFIDENT = 0.8
ECE_BINS = 15


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate a chest X-ray checkpoint and plot its errors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", action="append", default=[],
                   help=f"checkpoint; repeat for an ensemble (default {cc.DEFAULT_MODEL})")
    p.add_argument("--data", default="chest_xray/test",
                   help="folder with NORMAL/ and PNEUMONIA/ subfolders")
    p.add_argument("--out", type=cc.folder_or_new,
                   help="a NEW output folder (default outputs/eval_<timestamp>)")
    p.add_argument("--batch-size", type=cc.positive_int, default=64)
    p.add_argument("--bootstrap", type=cc.positive_int, default=2000,
                   help="resamples for the 95%% CIs")
    p.add_argument("--gallery", type=cc.nonnegative_int, default=8,
                   help="confident errors shown in the report")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.out and Path(args.out).exists():
        p.error(f"--out {args.out} already exists: each evaluation writes to a new folder")
    return args


# ---------------------------------------------------------------------------------
# Predictions for every image of the folder.
# ---------------------------------------------------------------------------------


def read_folder(folder: Path, size: int):
    """Decode every labelled image; unusable files are listed, never fatal."""
    paths, labels, others = cc.scan_labelled(folder)
    if not paths:
        raise SystemExit(f"error: no images in {folder}/NORMAL or {folder}/PNEUMONIA "
                         "(class folders may be in any letter case)")
    skipped = [(cc.display_name(p), r) for p, r in others]
    images, keep = [], []
    for i, p in enumerate(tqdm(paths, desc="reading", unit="img", leave=False)):
        array, reason = cc.try_load_image_array(p, size)
        if array is None:
            skipped.append((cc.display_name(p), reason))
        else:
            images.append(array)
            keep.append(i)
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    if not keep:
        raise SystemExit(f"error: no readable image in {folder}")
    return [paths[i] for i in keep], np.array([labels[i] for i in keep]), np.stack(images), skipped


def predict_all(members, images, temperatures, device, batch_size):
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="predicting", unit="batch",
                  leave=False):
        x = torch.from_numpy(images[s:s + batch_size]).unsqueeze(1).to(device)
        out.append(cc.pneumonia_probability(members, x, temperatures))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------


def binary_metrics(y, p, threshold):
    """Accuracy, sensitivity, specificity, AUC; NaN where a class is missing, so the
    measure is not defined (sensitivity needs PNEUMONIA images, AUC needs both)."""
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "accuracy": accuracy_score(y, pred),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "auc": roc_auc_score(y, p) if len(set(y)) == 2 else float("nan"),
    }


def bootstrap_ci(y, p, threshold, n, seed=0):
    """95% percentile intervals over n resamples of the images (measures that are not
    defined in a resample, e.g. AUC with one class drawn, skip it)."""
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in ("accuracy", "sensitivity", "specificity", "auc")}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        for k, v in binary_metrics(y[idx], p[idx], threshold).items():
            if np.isfinite(v):
                draws[k].append(v)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            for k, v in draws.items() if v}


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


def fmt(value, spec=".4f", undefined="not defined with one class"):
    return format(value, spec) if np.isfinite(value) else undefined


def confidence_of_prediction(p, threshold):
    pred = (p >= threshold).astype(int)
    return pred, np.where(pred == 1, p, 1 - p)


def expected_calibration_error(correct, conf, bins=ECE_BINS):
    """Top-label ECE: weighted mean |accuracy - confidence| over equal-width bins."""
    edges = np.linspace(0, 1, bins + 1)
    ece, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            acc, c = correct[m].mean(), conf[m].mean()
            ece += m.mean() * abs(acc - c)
            rows.append((lo, hi, acc, c, int(m.sum())))
    return float(ece), rows


def error_analysis(y, pred, conf):
    wrong = pred != y
    cw = conf[wrong]
    return {
        "errors": int(wrong.sum()),
        "false_positives": int(((pred == 1) & (y == 0)).sum()),
        "false_negatives": int(((pred == 0) & (y == 1)).sum()),
        "error_conf_mean": float(cw.mean()) if len(cw) else float("nan"),
        "error_conf_median": float(np.median(cw)) if len(cw) else float("nan"),
        "confident_error_share": float((cw > CONFIDENT).mean()) if len(cw) else 0.0,
    }


def coverage_curve(correct, conf):
    """Accuracy when only the most confident fraction of images is answered."""
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(correct[order])
    n = np.arange(1, len(conf) + 1)
    return n / len(conf), hits / n


# ---------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------


def savefig(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(y, pred, path, title):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay(confusion_matrix(y, pred, labels=[0, 1]),
                           display_labels=cc.CLASS_NAMES).plot(ax=ax, cmap="Blues",
                                                               colorbar=False)
    ax.set_title(title)
    savefig(fig, path)


def plot_roc(y, p, path):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    RocCurveDisplay.from_predictions(y, p, ax=ax, name="model", plot_chance_level=True)
    ax.set_title(f"ROC curve (AUC = {roc_auc_score(y, p):.4f})")
    savefig(fig, path)


def plot_pr(y, p, path):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    PrecisionRecallDisplay.from_predictions(y, p, ax=ax, name="model",
                                            plot_chance_level=True)
    ax.set_title(f"Precision-recall, PNEUMONIA positive (AP = {average_precision_score(y, p):.4f})")
    savefig(fig, path)


def plot_confidence(conf, correct, path):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    bins = np.linspace(0.5, 1.0, 26)
    ax.hist(conf[correct], bins=bins, alpha=0.6, label=f"correct ({correct.sum()})",
            color="tab:green")
    ax.hist(conf[~correct], bins=bins, alpha=0.7, label=f"incorrect ({(~correct).sum()})",
            color="tab:red")
    ax.axvline(CONFIDENT, ls="--", color="k", lw=1, label=f"confidence {CONFIDENT}")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("images")
    ax.set_title("Prediction confidence: correct vs incorrect")
    ax.legend()
    savefig(fig, path)


def plot_reliability(rows, ece, path):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    centers = [(lo + hi) / 2 for lo, hi, *_ in rows]
    ax.bar(centers, [r[2] for r in rows], width=1 / ECE_BINS, edgecolor="k", alpha=0.7,
           label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([r[3] for r in rows], [r[2] for r in rows], "o", color="tab:red",
            label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE = {ece:.4f}, {ECE_BINS} bins)")
    ax.legend(loc="upper left")
    savefig(fig, path)


def plot_coverage(cov, acc, band_point, path):
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(cov, acc, lw=2, label="answer the most confident first")
    if band_point is not None:
        ax.plot(*band_point, "o", color="tab:red", ms=8,
                label=f"stored uncertain band: coverage {band_point[0]:.1%}")
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy on the answered images")
    ax.set_title("Selective prediction: accuracy vs coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    savefig(fig, path)


def gallery(members, paths, images, y, p, pred, conf, out_dir, n, device):
    """Grad-CAM pictures of the n most confident errors (first ensemble member)."""
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    cam, items = GradCAM(members[0][0]), []
    (out_dir / "errors").mkdir(exist_ok=True)
    for rank, i in enumerate(wrong, 1):
        x = cc.model_input(torch.from_numpy(images[i])[None, None].to(device),
                           cc.intensity_of(members[0][1]))
        heat, _, _ = cam(x, class_idx=int(pred[i]))
        pair = np.concatenate([np.repeat(images[i][..., None], 3, 2), overlay(images[i], heat)], 1)
        name = f"errors/error_{rank:02d}.png"
        plt.imsave(out_dir / name, pair)
        items.append({"img": name, "file": cc.display_name(paths[i]),
                      "truth": cc.CLASS_NAMES[y[i]], "pred": cc.CLASS_NAMES[pred[i]],
                      "conf": float(conf[i]), "p": float(p[i])})
    return items


def write_html(path, title, metrics_rows, analysis, figures, items, notes):
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{e(v)}</td>" for v in vals) + "</tr>"
                   for k, vals in metrics_rows)
    figs = "".join(f'<figure><img src="{e(f)}" alt="{e(f)}"><figcaption>{e(f)}</figcaption>'
                   f"</figure>" for f in figures)
    cards = "".join(
        f'<figure class="err"><img src="{e(it["img"])}" alt="error"><figcaption>'
        f'{e(it["file"])}<br>truth <b>{e(it["truth"])}</b>, predicted <b>{e(it["pred"])}</b> '
        f'with confidence {it["conf"]:.1%}</figcaption></figure>' for it in items)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #bbb; padding: .3em .8em; text-align: right; }}
td:first-child {{ text-align: left; }}
.figs, .gallery {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} .figs img {{ width: 380px; }} .err img {{ width: 360px; }}
figcaption {{ font-size: .85em; max-width: 360px; overflow-wrap: anywhere; }}
</style></head><body>
<h1>{e(title)}</h1>
<p class="warn">{e(cc.DISCLAIMER)}</p>
<p>{"<br>".join(e(n) for n in notes)}</p>
<h2>Metrics (95% bootstrap intervals)</h2>
<table><tr><th>metric</th><th>at threshold 0.5</th><th>at the stored threshold</th></tr>
{rows}</table>
<h2>Errors</h2><pre>{e(analysis)}</pre>
<h2>Figures</h2><div class="figs">{figs}</div>
<h2>Most confident errors (left: input, right: Grad-CAM of the predicted class)</h2>
<div class="gallery">{cards or "<p>No errors.</p>"}</div>
</body></html>
"""
    path.write_text(page, encoding="utf-8")


# ---------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    cc.tune_cpu_allocator()  # ~2x faster CPU inference, see cxr_common
    device = cc.pick_device(args.device)
    model_paths = args.model or [cc.DEFAULT_MODEL]
    members, cal, size = cc.load_ensemble(model_paths, device)
    temps, thr = cal["temperature"], cal["threshold"]
    data = Path(args.data)
    paths, y, images, skipped = read_folder(data, size)
    p = predict_all(members, images, temps, device, args.batch_size)
    finite = np.isfinite(p)
    for i in np.flatnonzero(~finite):
        reason = "the model's output is not a finite number (NaN or infinity): no verdict"
        print(f"skipped: {cc.display_name(paths[i])}: {reason}", file=sys.stderr)
        skipped.append((cc.display_name(paths[i]), reason))
    if not finite.all():
        paths, y, images, p = [q for q, f in zip(paths, finite) if f], y[finite], images[finite], p[finite]
    if not len(y):
        raise SystemExit("error: no image got a valid prediction")
    both = len(set(y.tolist())) == 2
    if not both:
        present = cc.CLASS_NAMES[int(y[0])]
        print(f"note: only {present} images in {data}: "
              + ("specificity" if present == "NORMAL" else "sensitivity")
              + ", accuracy, confidence and calibration are reported; ROC AUC, the ROC and "
              "precision-recall curves need both classes and are left out")
    out_dir = cc.new_output_dir(args.out) if args.out else \
        cc.unique_dir("outputs", f"eval_{cc.timestamp()}")
    pred, conf = confidence_of_prediction(p, thr)
    correct = pred == y
    at_half = binary_metrics(y, p, 0.5)
    at_thr = binary_metrics(y, p, thr)
    ece, rel_rows = expected_calibration_error(correct, conf)
    errs = error_analysis(y, pred, conf)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    lo, hi = cal["band"]
    answered = ~((p >= lo) & (p < hi))
    band_acc = float(correct[answered].mean()) if answered.any() else float("nan")

    names = ", ".join(str(m) for m in model_paths)
    analysis = (
        f"Images: {len(y)} ({np.bincount(y, minlength=2).tolist()} NORMAL/PNEUMONIA) from {data}\n"
        f"Model: {names}\n"
        f"Temperature: {', '.join(f'{t:.4f}' for t in temps)}, threshold on "
        f"P(PNEUMONIA): {thr:.4f}\n\n"
        f"Accuracy: {at_thr['accuracy'] * 100:.2f}%\n"
        f"Sensitivity (PNEUMONIA recall): {fmt(at_thr['sensitivity'])}\n"
        f"Specificity (NORMAL recall): {fmt(at_thr['specificity'])}\n"
        f"ROC AUC: {fmt(at_thr['auc'])}\n"
        f"ECE ({ECE_BINS} bins): {ece:.4f}\n"
        f"Confusion matrix (rows: true NORMAL, PNEUMONIA; columns: predicted):\n{cm}\n\n"
        f"Error analysis:\n"
        f"  Total errors: {errs['errors']}\n"
        f"  False positives (NORMAL called PNEUMONIA): {errs['false_positives']}\n"
        f"  False negatives (PNEUMONIA called NORMAL): {errs['false_negatives']}\n"
        f"  Mean confidence of errors: {errs['error_conf_mean']:.4f}\n"
        f"  Median confidence of errors: {errs['error_conf_median']:.4f}\n"
        f"  Errors with confidence > {CONFIDENT}: {errs['confident_error_share'] * 100:.1f}%\n"
        f"\nUncertain band [{lo:.3f}, {hi:.3f}): {int((~answered).sum())} images referred, "
        f"accuracy on the other {int(answered.sum())} ({answered.mean():.1%} coverage): "
        f"{band_acc * 100:.2f}%\n"
    )
    print(analysis)

    print("Bootstrap intervals ...", flush=True)
    ci_half = bootstrap_ci(y, p, 0.5, args.bootstrap)
    ci_thr = bootstrap_ci(y, p, thr, args.bootstrap)
    metric_rows = []
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        cells = [f"{m[k]:.4f} [{c[k][0]:.4f}, {c[k][1]:.4f}]" if k in c else fmt(m[k])
                 for m, c in ((at_half, ci_half), (at_thr, ci_thr))]
        metric_rows.append((k, cells))
        print(f"  {k:<12} at 0.5: {cells[0]}   at {thr:.3f}: {cells[1]}")
    pred_half, conf_half = confidence_of_prediction(p, 0.5)
    ece_half, _ = expected_calibration_error(pred_half == y, conf_half)
    metric_rows.append(("ECE (15 bins)", [f"{ece_half:.4f}", f"{ece:.4f}"]))

    plot_confusion(y, pred, out_dir / "confusion_matrix.png",
                   f"Confusion matrix (accuracy {at_thr['accuracy']:.1%})")
    if both:
        plot_roc(y, p, out_dir / "roc_curve.png")
        plot_pr(y, p, out_dir / "pr_curve.png")
    plot_confidence(conf, correct, out_dir / "prediction_confidence.png")
    plot_reliability(rel_rows, ece, out_dir / "reliability_diagram.png")
    cov, acc = coverage_curve(correct, conf)
    plot_coverage(cov, acc, (answered.mean(), band_acc) if hi > lo else None,
                  out_dir / "accuracy_coverage.png")
    with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "prediction", "prob_pneumonia", "confidence", "correct",
                    "uncertain"])
        for i in range(len(y)):
            w.writerow([cc.display_name(paths[i]), cc.CLASS_NAMES[y[i]],
                        cc.CLASS_NAMES[pred[i]], f"{p[i]:.6f}", f"{conf[i]:.6f}",
                        int(correct[i]), int(not answered[i])])
    metrics = {"data": str(data), "models": [str(m) for m in model_paths], "n": int(len(y)),
               "temperature": temps, "threshold": thr, "uncertain_band": [lo, hi],
               "at_0.5": at_half, "at_threshold": at_thr, "ci95_at_0.5": ci_half,
               "ci95_at_threshold": ci_thr, "ece": ece, "confusion": cm.tolist(), **errs,
               "coverage": float(answered.mean()), "accuracy_answered": band_acc,
               "skipped": skipped}
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    items = gallery(members, paths, images, y, p, pred, conf, out_dir, args.gallery, device)
    figures = ["confusion_matrix.png", *(["roc_curve.png", "pr_curve.png"] if both else []),
               "prediction_confidence.png", "reliability_diagram.png", "accuracy_coverage.png"]
    notes = [f"Data: {data} ({len(y)} images)", f"Model(s): {names}",
             f"Threshold {thr:.4f} and temperature {', '.join(f'{t:.4f}' for t in temps)} come "
             "from the checkpoint "
             "(chosen on validation data)."]
    if skipped:
        notes.append(f"Skipped {len(skipped)} unreadable file(s): "
                     + "; ".join(f"{n}: {r}" for n, r in skipped))
    write_html(out_dir / "report.html", "Chest X-ray classifier: evaluation report",
               metric_rows, analysis, figures, items, notes)
    if skipped:
        print(f"Skipped {len(skipped)} file(s):")
        for name, reason in skipped:
            print(f"  {name}: {reason}")
    print(f"Saved figures, predictions.csv, metrics.json and report.html to {out_dir}/")
    print(cc.DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
