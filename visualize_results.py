#!/usr/bin/env python3
"""Step 4 of 4: evaluate a checkpoint on the test split and draw what went wrong.

    python visualize_results.py                                # models/ + chest_xray/test
    python visualize_results.py --model runs/<run>/mobilenet_cxr.pth
    python visualize_results.py --model runs/<run>/mobilenet_cxr.pth --split val
    python visualize_results.py --split /hospital/xrays        # any {NORMAL,PNEUMONIA}/
    python visualize_results.py --model ensemble.pth           # experiments/build_ensemble.py

Prints accuracy and the error analysis of the reference (false positives / negatives,
confidence of the errors, share of errors made with confidence > 0.8) and writes to a
new folder <out>/eval_<timestamp>/ (default outputs/):
  confusion_matrix.png, roc_curve.png, prediction_confidence.png, pr_curve.png,
  reliability_diagram.png (ECE, 15 bins), accuracy_coverage.png (risk-coverage), predictions.csv,
  metrics.json and report.html (every figure, the metrics table with 95% bootstrap
  intervals, and a gallery of the most confident errors with Grad-CAM).
The decision threshold and temperature are the ones stored in the checkpoint (chosen on
validation data by training); nothing here is tuned on the data being evaluated.
"""

from __future__ import annotations

import argparse
import html
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    average_precision_score,
    confusion_matrix,
    roc_auc_score,
)

from cxr import (  # noqa: E402
    assess,
    calib,
    checkpoints,
    dataset,
    evalfiles,
    network,
    predtable,
    runtime,
    scoring,
    selective,
    siteprotocol,
    siteshift,
)
from gradcam import GradCAM, overlay  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a chest X-ray checkpoint and plot its errors.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=checkpoints.DEFAULT_MODEL, action=runtime.ModelOnce,
                   help="a checkpoint, or an ensemble file (experiments/build_ensemble.py)")
    p.add_argument("--data", default="chest_xray", help="the dataset root (train/, test/)")
    p.add_argument("--split", default="test",
                   help="test, train, val (the validation split of the model's run, from "
                        "val_split.csv beside it), or any folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", type=runtime.folder_or_new, default="outputs",
                   help="parent folder: each evaluation writes to a new OUT/eval_<timestamp>/")
    p.add_argument("--batch-size", type=runtime.positive_int, default=64)
    p.add_argument("--bootstrap", type=runtime.positive_int, default=2000,
                   help="resamples for the 95%% CIs")
    p.add_argument("--gallery", type=runtime.nonnegative_int, default=8,
                   help="confident errors shown in the report")
    p.add_argument("--device", default="auto", type=runtime.device_name, help="auto, cpu or cuda")
    site = p.add_argument_group(
        "site protocols (they use the images being evaluated: name them beside the numbers)")
    site.add_argument("--adapt", action="store_true",
                      help="label-free adaptation: re-estimate BatchNorm statistics on these "
                           "unlabeled images (AdaBN) before scoring them")
    site.add_argument("--recalibrate", type=runtime.positive_int, nargs="+", metavar="K",
                      help="local recalibration with K labelled images of this site (patient-"
                           "grouped), cross-fitted: every image is scored by a calibration "
                           "fitted on other patients; e.g. --recalibrate 25 50 100 200")
    site.add_argument("--draws", type=runtime.positive_int, default=20,
                      help="random patient partitions per K for --recalibrate")
    site.add_argument("--save-calibrated", metavar="PATH",
                      help="with --recalibrate K (the first K): write a copy of the model "
                           "with the calibration fitted on K images of this site (and the "
                           "adapted BatchNorm statistics with --adapt), for predict.py")
    args = p.parse_args(argv)
    if args.save_calibrated and not args.recalibrate:
        p.error("--save-calibrated needs --recalibrate K")
    if args.recalibrate:
        args.recalibrate = list(dict.fromkeys(args.recalibrate))  # each K once
    return args


# --- The images and their predictions; what can go wrong is checked before any work. ---


def checked_inputs(args, model_paths):
    """The labelled images (files, labels, files not read, where they came from), once the
    outputs can be written, --save-calibrated names no input and every K of --recalibrate
    can be cross-fitted on them."""
    problem = evalfiles.output_problem(args.out, args.save_calibrated)
    if problem:
        raise SystemExit(f"error: {problem}")
    with runtime.exit_on(dataset.DataError):
        files, labels, others, source = evalfiles.labelled_files(args.split, args.data, model_paths)
    inputs = [*model_paths, *files]
    if args.save_calibrated and (same := runtime.overwrites_an_input(args.save_calibrated, inputs)):
        raise SystemExit(f"error: --save-calibrated {runtime.display_name(args.save_calibrated)} is "
                         f"{same}, an input of this run: name a new file")
    if args.recalibrate and (problem := siteprotocol.recalibration_problem(
            args.recalibrate, labels, [dataset.patient_id(q) for q in files])):
        raise SystemExit(f"error: {problem}")
    return files, labels, others, source


def read_images(paths, labels, others, size: int):
    """Decode every image; unusable files are listed, never fatal."""
    images, kept, bad = dataset.decode_all(paths, size, desc="evaluation")
    skipped = [(runtime.display_name(p), r) for p, r in [*others, *bad]]
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    if not kept:
        raise SystemExit("error: no readable image to evaluate")
    return [paths[i] for i in kept], np.array([labels[i] for i in kept]), images, skipped


def fmt(value, spec=".4f", undefined="not defined with one class"):
    return format(value, spec) if np.isfinite(value) else undefined


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
                           display_labels=network.CLASS_NAMES).plot(ax=ax, cmap="Blues",
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
    ax.axvline(scoring.CONFIDENT, ls="--", color="k", lw=1, label=f"confidence {scoring.CONFIDENT}")
    ax.set(xlabel="confidence of the predicted class", ylabel="images",
           title="Prediction confidence: correct vs incorrect")
    ax.legend()
    savefig(fig, path)


def plot_reliability(rows, ece, path):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    centers = [(lo + hi) / 2 for lo, hi, *_ in rows]
    ax.bar(centers, [r[2] for r in rows], width=1 / scoring.ECE_BINS, edgecolor="k", alpha=0.7,
           label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([r[3] for r in rows], [r[2] for r in rows], "o", color="tab:red",
            label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"Reliability diagram (ECE = {ece:.4f}, {scoring.ECE_BINS} bins)")
    ax.legend(loc="upper left")
    savefig(fig, path)


def plot_risk_coverage(y, m, refers, path):
    fig, ax = plt.subplots(figsize=(6, 5.6))
    ok, conf, bl = m["correct"], m["conf"], (m["referral_vs_least_confident"] if refers else {})
    ax.plot(*assess.risk_coverage_curve(ok, conf), "k", lw=2,
            label=f"all films (AURC {m['aurc']:.3f}, oracle {m['aurc_oracle']:.3f})")
    for k, (name, colour) in enumerate(zip(network.CLASS_NAMES, ("tab:blue", "tab:orange"))):
        if (y == k).any():  # x: the share of this class answered; circle: the rule's point
            ax.plot(*assess.risk_coverage_curve(ok[y == k], conf[y == k]), c=colour, label=f"true {name}")
            for s in [bl["rule"]["per_class"][name]] if bl else []:
                ax.plot(s["coverage"], s["risk"], "o", color=colour, mfc="none", ms=8)
    for key, mark in (("rule", "o"), ("least_confident", "s")) if bl else ():  # red: the two rules
        ax.plot(bl[key]["coverage"], bl[key]["risk"], mark, color="tab:red", ms=8,
                label=f"{'referral rule' if key == 'rule' else 'refer the least confident'}: "
                      f"risk {bl[key]['risk']:.3f} at coverage {bl[key]['coverage']:.1%}")
    ax.set(xlabel="coverage (share of films answered)", ylabel="risk (error among the answered)",
           title="Risk-coverage: answer the most confident first")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8)  # below: no curve hidden
    savefig(fig, path)


def gallery(members, paths, images, y, p, pred, conf, out_dir, n, device):
    """Grad-CAM pictures of the n most confident errors (first ensemble member)."""
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    cam, items = GradCAM(members[0][0]), []
    (out_dir / "errors").mkdir(exist_ok=True)
    for rank, i in enumerate(wrong, 1):
        x = network.model_input(torch.from_numpy(images[i])[None, None].to(device),
                           network.intensity_of(members[0][1]))
        heat, _, _ = cam(x, class_idx=int(pred[i]))
        pair = np.concatenate([np.repeat(images[i][..., None], 3, 2), overlay(images[i], heat)], 1)
        name = f"errors/error_{rank:02d}.png"
        plt.imsave(out_dir / name, pair)
        items.append({"img": name, "file": runtime.display_name(paths[i]),
                      "truth": network.CLASS_NAMES[y[i]], "pred": network.CLASS_NAMES[pred[i]],
                      "conf": float(conf[i]), "p": float(p[i])})
    return items


def write_html(path, title, metrics_rows, analysis, figures, items, notes):
    e, read = html.escape, {"accuracy_coverage.png": "Read the figure: the error among the films answered "
        "when only the most confident are (right: all); the lower on the left, the better confidence ranks "
        "the errors last. Colours: per true class (its coverage; circle: the referral rule). Red: the rule "
        "and, at its coverage, referring the least confident."}
    rows = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{e(v)}</td>" for v in vals) + "</tr>"
                   for k, vals in metrics_rows)
    figs = "".join(f'<figure><img src="{e(f)}" alt="{e(f)}"><figcaption>{e(f)}'
                   f'{"<br>" + e(read[f]) if f in read else ""}</figcaption></figure>' for f in figures)
    cards = "".join(
        f'<figure class="err"><img src="{e(it["img"])}" alt="error"><figcaption>'
        f'{e(it["file"])}<br>truth <b>{e(it["truth"])}</b>, predicted <b>{e(it["pred"])}</b> '
        f'with confidence {it["conf"]:.1%}</figcaption></figure>' for it in items)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c060; padding: .6em 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td:first-child {{ text-align: left; }}
td, th {{ border: 1px solid #bbb; padding: .3em .8em; text-align: right; }}
.figs, .gallery {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} .figs img {{ width: 380px; }} .err img {{ width: 360px; }}
figcaption {{ font-size: .85em; max-width: 360px; overflow-wrap: anywhere; }}
</style></head><body>
<h1>{e(title)}</h1>
<p class="warn">{e(network.DISCLAIMER)}</p>
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
# Site shift (is this folder like the training data?) and local recalibration.
# ---------------------------------------------------------------------------------


def shift_text(s) -> str:
    if s is None:
        return ("Site shift: not measured (the model has no typicality statistics; add them "
                "with python experiments/upgrade_checkpoint.py --typicality-for MODEL)\n")
    by_class = ", ".join(f"{k} {fmt(v, '.1%')}" for k, v in s["flagged_by_class"].items())
    aucs = ", ".join(f"{k} {v:.3f}" for k, v in s["domain_auc_by_class"].items())
    return (f"Site shift (no labels used except to split by class):\n"
            f"  Outside the training distribution: {s['flagged_share']:.1%} of images "
            f"({by_class}); on validation {s['validation_flagged_share']:.0%} by design\n"
            f"  Error rate: flagged {fmt(s['error_rate_flagged'], '.1%', 'none flagged')}, "
            f"not flagged {fmt(s['error_rate_unflagged'], '.1%', 'all flagged')}\n"
            f"  Domain classifier (validation images vs these, 5-fold logistic regression): "
            f"AUC {s['domain_auc']:.3f}" + (f" (per class: {aucs})" if aucs else "") + "\n"
            f"  Verdict: {s['verdict']}\n")


def plot_typicality(stats, scores, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    top = max(float(np.percentile(scores, 99)), 2 * stats["cut"])
    bins = np.linspace(0, top, 50)
    for data, label, colour in ((stats["train_scores"].numpy(), "training", "tab:blue"),
                                (stats["val_scores"].numpy(), "validation", "tab:green"),
                                (np.minimum(scores, top), "this folder", "tab:red")):
        ax.hist(data, bins=bins, density=True, histtype="step", lw=2, label=label, color=colour)
    ax.axvline(stats["cut"], ls="--", color="k", lw=1, label="cut (1% of validation above)")
    ax.set(xlabel="typicality score (Mahalanobis distance in feature space)", ylabel="density",
           title="Is this folder like the training data?")
    ax.legend()
    savefig(fig, path)


def recalibration_text(rows, source, adapted: bool = False) -> str:
    after = " after AdaBN (BatchNorm statistics of these images)" if adapted else ""
    lines = [f"Local recalibration on {source}{after} (cross-fitted: each image scored by a "
             "calibration fitted on K images of other patients; mean +/- sd over draws):",
             "    K  draws  accuracy        sensitivity     specificity     ECE     "
             "referred N / P   answered, error among them"]
    for r in rows:
        m, s = r["mean"], r["sd"]
        lines.append(f"  {r['K']:>3}  {r['draws']:>5}  {m['accuracy']:.3f} +/- {s['accuracy']:.3f}"
                     f"  {m['sensitivity']:.3f} +/- {s['sensitivity']:.3f}  {m['specificity']:.3f}"
                     f" +/- {s['specificity']:.3f}  {m['ece']:.3f}   {m['referred_NORMAL']:.1%} / "
                     f"{m['referred_PNEUMONIA']:.1%}   {m['answered']:.1%}, "
                     + fmt(r["risk_answered"], ".1%", "none answered"))
    short = [r for r in rows if r["sensitivity_promised"] < calib.TARGET_SENSITIVITY]
    lines.append(f"  Threshold rule: sensitivity >= {calib.TARGET_SENSITIVITY} on new films of this "
                 "site on average over fits (split-conformal rank; one fit can fall short). Referral "
                 f"rule: refit on each K films (error among answered <= {selective.REFERRAL_RISK:.0%} "
                 f"with probability >= {1 - selective.REFERRAL_DELTA:.0%} over fits; where no cut is "
                 "certified, every film is referred).")
    for r in short:
        lines.append(f"  K = {r['K']}: too few pneumonia films per fit for that promise; the "
                     f"lowest pneumonia score promises only {r['sensitivity_promised']:.3f}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------


def analysis_text(m, cal, source, names) -> str:
    t, k = m["at_threshold"], m["calibration_check"]
    return (
        f"Images: {m['n']} ({m['counts']} NORMAL/PNEUMONIA) from {source}\n"
        f"Model: {names}\n"
        f"Temperature: {cal.temperature_words()}, threshold on P(PNEUMONIA): {cal.threshold:.4f}\n\n"
        f"Accuracy: {t['accuracy'] * 100:.2f}%\n"
        f"Sensitivity (PNEUMONIA recall): {fmt(t['sensitivity'])}\n"
        f"Specificity (NORMAL recall): {fmt(t['specificity'])}\n"
        f"ROC AUC: {fmt(t['auc'])}\n"
        f"ECE ({scoring.ECE_BINS} bins): {m['ece']:.4f}\n"
        f"Calibration: at the stored temperature / at T = 1 (the same decisions)\n"
        f"  ECE, {k['ece_variant']}: {k['ece']:.4f} / {k['ece_at_T1']:.4f}\n"
        f"  class-wise ECE (P(NORMAL) and P(PNEUMONIA), {scoring.ECE_BINS} bins): "
        f"{k['classwise_ece']:.4f} / {k['classwise_ece_at_T1']:.4f}\n"
        f"  NLL: {k['nll']:.4f} / {k['nll_at_T1']:.4f}\n"
        f"Confusion matrix (rows: true NORMAL, PNEUMONIA; columns: predicted):\n"
        f"{np.array(m['confusion'])}\n\n"
        f"Error analysis:\n"
        f"  Total errors: {m['errors']}\n"
        f"  False positives (NORMAL called PNEUMONIA): {m['false_positives']}\n"
        f"  False negatives (PNEUMONIA called NORMAL): {m['false_negatives']}\n"
        f"  Mean confidence of errors: {m['error_conf_mean']:.4f}\n"
        f"  Median confidence of errors: {m['error_conf_median']:.4f}\n"
        f"  Errors with confidence > {scoring.CONFIDENT}: {m['confident_error_share'] * 100:.1f}%\n"
        f"\nReferral rule: {cal.rule_words()}\n  {int((~m['answered']).sum())} images referred, "
        f"accuracy on the other {int(m['answered'].sum())} ({m['coverage']:.1%} coverage): "
        f"{fmt(m['accuracy_answered'], '.2%', 'none answered')}\n"
        f"Referred per class: " + ", ".join(f"{k} {fmt(v, '.1%')}"
                                            for k, v in m["referral_rate"].items()) + "\n"
        + "\n" + assess.risk_coverage_text(m)
    )


def metric_table(m, threshold) -> list:
    rows = []
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        cells = [f"{v[k]:.4f} [{c[k][0]:.4f}, {c[k][1]:.4f}]" if k in c else fmt(v[k])
                 for v, c in ((m["at_0.5"], m["ci95_at_0.5"]),
                              (m["at_threshold"], m["ci95_at_threshold"]))]
        rows.append((k, cells))
        print(f"  {k:<12} at 0.5: {cells[0]}   at {threshold:.3f}: {cells[1]}")
    rows.append((f"ECE ({scoring.ECE_BINS} bins)", [f"{m['ece_at_0.5']:.4f}", f"{m['ece']:.4f}"]))
    return rows


def draw_figures(y, p, m, cal, out_dir) -> list[str]:
    both = len(set(y.tolist())) == 2
    plot_confusion(y, m["pred"], out_dir / "confusion_matrix.png",
                   f"Confusion matrix (accuracy {m['at_threshold']['accuracy']:.1%})")
    if both:
        plot_roc(y, p, out_dir / "roc_curve.png")
        plot_pr(y, p, out_dir / "pr_curve.png")
    plot_confidence(m["conf"], m["correct"], out_dir / "prediction_confidence.png")
    ece, rel_rows = scoring.expected_calibration_error(m["correct"], m["conf"])
    plot_reliability(rel_rows, ece, out_dir / "reliability_diagram.png")
    plot_risk_coverage(y, m, cal.refers, out_dir / "accuracy_coverage.png")  # no rule: no points
    return ["confusion_matrix.png", *(["roc_curve.png", "pr_curve.png"] if both else []),
            "prediction_confidence.png", "reliability_diagram.png", "accuracy_coverage.png"]


def main(argv=None):
    runtime.printable_console()
    args = parse_args(argv)
    model_paths = [args.model]
    files, labels, others, source = checked_inputs(args, model_paths)
    device = runtime.pick_device(args.device)  # on the CPU, with its allocator tuned (~2x faster)
    with runtime.exit_on(checkpoints.CheckpointError):
        members, cal, size = checkpoints.load_model(args.model, device)
    if args.split == "val" and len(members) > 1:
        raise SystemExit("error: --split val needs one model: each ensemble member has its own split")

    # 1. the images and the model's probabilities
    paths, y, images, skipped = read_images(files, labels, others, size)
    logits, feats = network.member_logits(members, images, args.batch_size, desc="predicting",
                                     features=True)
    scorers = members
    if args.adapt:  # label-free, transductive: BatchNorm statistics of these images
        scorers, warning = siteshift.adapt_members(members, images, cal.positive(cal.probability(logits)),
                                                   args.batch_size)
        logits = network.member_logits(scorers, images, args.batch_size, desc="adapted")
        print(f"--adapt: BatchNorm statistics re-estimated on these {len(images)} images "
              "(label-free adaptation, transductive)")
        if warning:
            print(f"warning: --adapt: {warning}", file=sys.stderr)
    p = cal.probability(logits)
    p_t1 = network.mean_probability(logits, [1.0] * len(members))  # what the temperature changes
    finite = np.isfinite(p)
    for i in np.flatnonzero(~finite):
        reason = "the model's output is not a finite number (NaN or infinity): no verdict"
        print(f"skipped: {runtime.display_name(paths[i])}: {reason}", file=sys.stderr)
        skipped.append((runtime.display_name(paths[i]), reason))
    paths, y, images = [q for q, f in zip(paths, finite) if f], y[finite], images[finite]
    p, p_t1 = p[finite], p_t1[finite]
    feats = [f[torch.from_numpy(finite)] for f in feats]
    groups = np.array([dataset.patient_id(q) for q in paths])
    if not len(y):
        raise SystemExit("error: no image got a valid prediction")
    if args.recalibrate and (problem := siteprotocol.recalibration_problem(args.recalibrate, y, groups)):
        raise SystemExit(f"error: {problem} (after the {len(skipped)} skipped file(s))")
    if len(set(y.tolist())) < 2:
        present = network.CLASS_NAMES[int(y[0])]
        print(f"note: only {present} images in {source}: "
              + ("specificity" if present == "NORMAL" else "sensitivity")
              + ", accuracy, confidence and calibration are reported; ROC AUC, the ROC and "
              "precision-recall curves need both classes and are left out")

    # 2. the numbers, printed as the published run printed them
    names = ", ".join(str(m) for m in model_paths)
    print("Bootstrap intervals ...", flush=True)
    m = assess.evaluate(y, p, cal, args.bootstrap, p_t1, groups)
    analysis = analysis_text(m, cal, source, names)
    shift = siteprotocol.shift_report(members, feats, y, m["pred"])
    analysis += "\n" + shift_text(shift)
    recal = []
    if args.recalibrate:
        print("Local recalibration (cross-fitted) ...", flush=True)
        recal = siteprotocol.recalibrate(y, p, groups, args.recalibrate, args.draws)
        analysis += "\n" + recalibration_text(recal, source, args.adapt)
    print(analysis)
    table = metric_table(m, cal.threshold)

    # 3. figures, predictions.csv, metrics.json, report.html in a new folder
    out_dir = runtime.unique_dir(args.out, f"eval_{runtime.timestamp()}")
    figures = draw_figures(y, p, m, cal, out_dir)
    if shift is not None:
        plot_typicality(members[0][0].typicality, shift["scores"], out_dir / "typicality.png")
        figures.append("typicality.png")
    predtable.write_evaluation_table(out_dir / "predictions.csv", paths, y, p, m["pred"], m["conf"],
                                     ~m["answered"])
    (out_dir / "metrics.json").write_text(json.dumps(assess.record(
        m, cal, source, model_paths, skipped, args.adapt, shift, recal), indent=2))
    items = gallery(scorers, paths, images, y, p, m["pred"], m["conf"], out_dir, args.gallery,
                    device)
    notes = [f"Data: {source} ({len(y)} images)", f"Model(s): {names}",
             f"Threshold {cal.threshold:.4f} and temperature {cal.temperature_words()} come from "
             "the checkpoint (fitted on labelled films held out from training)."]
    if skipped:
        notes.append(f"Skipped {len(skipped)} unreadable file(s): "
                     + "; ".join(f"{n}: {r}" for n, r in skipped))
    write_html(out_dir / "report.html", "Chest X-ray classifier: evaluation report",
               table, analysis, figures, items, notes)
    if skipped:
        print(f"Skipped {len(skipped)} file(s):")
        for name, reason in skipped:
            print(f"  {name}: {reason}")
    print(f"Saved figures, predictions.csv, metrics.json and report.html to {runtime.display_name(out_dir)}/")
    if args.save_calibrated:  # after the report: a failure here loses no evaluation
        print(siteprotocol.save_site_model(args.save_calibrated, scorers, model_paths, cal, y, p,
                                           groups, args.recalibrate[0], source, args.adapt))
    print(network.DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
