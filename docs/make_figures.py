#!/usr/bin/env python3
"""Make the walkthrough's figures (docs/figures/*.png) from the data, the shipped
checkpoints and a training run's history, with the repository's own functions.

    python docs/make_figures.py                        # every figure
    python docs/make_figures.py samples counts         # some of them
    python docs/make_figures.py --search               # rank Grad-CAMs: lungs or corners?

Figures and what each needs:

    samples         sample films per split and class         chest_xray/ (step 1)
    counts          images per split and class               chest_xray/
    preprocessing   one film through preprocessing and the   examples/ (nothing else)
                    augmentations of both recipes
    curve           the training curve of a reference run    a training_history_*.json
                                                             (--history; default: the
                                                             newest runs/*_reference_seed1/)
    gradcam         Grad-CAM on the lungs beside one on a    chest_xray/test, models/
                    text marker (reference model)
    reliability     reliability diagrams of both shipped     chest_xray/test, models/
                    models on the test split
    report          three panels of report.html (confusion,  an evaluation folder of the
                    reliability, risk vs coverage)           shipped model (--eval; default:
                                                             the newest outputs/**/eval_*
                                                             of a model with its SHA-256)

runs/ is not committed, so the curve's figure names the history file it was drawn from
(and the command and machine of that run) in its own caption. A figure whose input is
missing is skipped with one line; the others are still made.

--search computes the reference model's Grad-CAM of the healthy test films it calls
PNEUMONIA and of the pneumonias it calls with P >= 0.999, and ranks them by the share of
the heat in the top corners (where the "R" marker and the date stamp sit) and inside a
central lung box. The two films of the gradcam figure come from its output.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cxr import calib, checkpoints, dataset, imagefiles, network, runtime, scan, scoring  # noqa: E402

FIGURES = ["samples", "counts", "preprocessing", "curve", "gradcam", "reliability", "report"]
DPI = 80
EXAMPLE = ROOT / "examples" / "person10_virus_35.jpeg"  # a full-resolution test film
REFERENCE = ROOT / "models" / "reference_seed1.pth"
IMPROVED = ROOT / "models" / "mobilenet_cxr.pth"
# Chosen with --search (reference model), among the test films it calls PNEUMONIA with
# P >= SURE, so that both are equally sure: the pneumonia with the largest share of heat
# in the lung box, and the healthy film with the largest share in the top corners (its
# heat is on the side marker, a letter, top left).
SURE = 0.999
GRADCAM_LUNGS = "test/PNEUMONIA/person139_bacteria_666.jpeg"
GRADCAM_MARKER = "test/NORMAL/NORMAL2-IM-0219-0001.jpeg"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Make the README's figures in docs/figures/.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("figures", nargs="*", metavar="FIGURE",
                   help=f"which figures (default: all of {', '.join(FIGURES)})")
    p.add_argument("--data", default=str(ROOT / "chest_xray"), help="the dataset root")
    p.add_argument("--history", help="training_history_*.json of a reference run "
                                     "(default: the newest runs/*_reference_seed1/ one)")
    p.add_argument("--eval", help="a visualize_results.py evaluation folder of the shipped "
                                  "model, for the report figure")
    p.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    p.add_argument("--search", action="store_true",
                   help="rank the test films' Grad-CAMs instead of drawing figures")
    args = p.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        p.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    return args


def save(fig, path: Path, colors: int = 96):
    """A small PNG: rendered at DPI, reduced to an adaptive palette."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=colors, dither=Image.Dither.NONE)
    img.save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
          f"({path.stat().st_size // 1024} KB)")


def show(ax, gray, title=None, fontsize=8):
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def need_split(data: Path, split: str):
    if not (data / split).is_dir():
        raise FileNotFoundError(f"{data / split} not found (run download_dataset.py first)")


# ---------------------------------------------------------------------------------
# Step 1: the data.
# ---------------------------------------------------------------------------------


def fig_samples(args, out: Path):
    data = Path(args.data)
    rng = np.random.default_rng(0)
    rows = [(s, c) for s in ("train", "test") for c in network.CLASS_NAMES]
    ncol = 6
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * 1.25, len(rows) * 1.45))
    for r, (split, cls) in enumerate(rows):
        need_split(data, split)
        files = scan.list_images(data / split / cls)
        for c, i in enumerate(sorted(rng.choice(len(files), ncol, replace=False))):
            show(axes[r, c], dataset.load_image_array(files[i], 112), files[i].name, fontsize=5)
        axes[r, 0].set_ylabel(f"{split}\n{cls}", fontsize=8)
    fig.suptitle("Random films (seed 0) of each split and class, as the model sees them",
                 fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=0.6, w_pad=0.2, rect=(0, 0, 1, 0.97))
    save(fig, out / "samples.png", colors=64)


def fig_counts(args, out: Path):
    data = Path(args.data)
    splits = [s for s in ("train", "val", "test") if (data / s).is_dir()]
    need_split(data, "train")
    counts = {s: np.bincount(dataset.list_labelled(data / s)[1], minlength=2) for s in splits}
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    x = np.arange(len(splits))
    for k, (cls, colour) in enumerate(zip(network.CLASS_NAMES, ("tab:blue", "tab:orange"))):
        bars = ax.bar(x + (k - 0.5) * 0.38, [counts[s][k] for s in splits], 0.38,
                      label=cls, color=colour)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, [f"{s}\n({counts[s][1] / max(counts[s][0], 1):.1f} pneumonia per normal)"
                      for s in splits], fontsize=8)
    ax.set_ylabel("images")
    ax.set_ylim(0, max(c.max() for c in counts.values()) * 1.15)
    ax.legend(fontsize=8)
    ax.set_title(f"Images per split and class ({data.name}/)", fontsize=9)
    fig.tight_layout()
    save(fig, out / "class_counts.png", colors=32)


# ---------------------------------------------------------------------------------
# Step 2: training.
# ---------------------------------------------------------------------------------


def fig_preprocessing(args, out: Path):
    from cxr import engine, recipes

    size = network.IMAGE_SIZE
    full = np.asarray(imagefiles.read_image_gray(EXAMPLE), dtype=np.uint8)
    gray = dataset.load_image_array(EXAMPLE, size)
    t = torch.from_numpy(gray)[None]  # (1, H, W) uint8, as the training loader holds it
    equalized = network.equalize(t)[0].numpy()
    net_in = network.model_input(t[None], "none")[0, 0].numpy()
    draws = 4
    rows = [
        ("reference recipe:\ntraining augmentation",
         engine.train_transform(recipes.recipe_for("reference"), size)),
        ("improved recipe:\nequalise, then augment",
         engine.train_transform(recipes.recipe_for("improved"), size)),
        ("shifted validation\n(stress_transform)", calib.stress_transform(size)),
    ]
    fig, axes = plt.subplots(1 + len(rows), draws, figsize=(draws * 1.75, (1 + len(rows)) * 1.95))
    show(axes[0, 0], full, f"the file: {full.shape[1]} x {full.shape[0]},\ngrey 8-bit")
    show(axes[0, 1], gray, f"squashed to {size} x {size}\n(every recipe)")
    show(axes[0, 2], equalized, "histogram-equalised\n(improved recipe)")
    axes[0, 3].imshow(net_in, cmap="gray")
    axes[0, 3].set_xticks([])
    axes[0, 3].set_yticks([])
    axes[0, 3].set_title(f"network input (3 equal\nchannels, {net_in.min():.1f} to "
                         f"{net_in.max():.1f})", fontsize=8)
    for r, (label, transform) in enumerate(rows, start=1):
        torch.manual_seed(r)
        for c in range(draws):
            show(axes[r, c], transform(t.clone())[0].numpy())
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"One film ({EXAMPLE.name}) through preprocessing (top) and "
                 "augmentation (4 random draws a row)", fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97))
    save(fig, out / "preprocessing.png", colors=64)


def find_history(args) -> Path:
    if args.history:
        return Path(args.history)
    found = sorted((ROOT / "runs").glob("*_reference_seed1/training_history_*.json"))
    if not found:
        raise FileNotFoundError("no runs/*_reference_seed1/training_history_*.json "
                                "(train one, or pass --history)")
    return found[-1]


def fig_curve(args, out: Path):
    path = find_history(args)
    record = json.loads(path.read_text())
    meta, hist = record["meta"], record["history"]
    ep = [h["epoch"] for h in hist]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    ax.plot(ep, [h["train_loss"] for h in hist], "o-", label="train")
    ax.plot(ep, [h["val_loss"] for h in hist], "o-", label="validation")
    ax.set_title("loss (cross-entropy)", fontsize=9)
    ax.set_ylim(0, None)
    ax = axes[1]
    ax.plot(ep, [h["train_acc"] for h in hist], "o-", label="train accuracy")
    ax.plot(ep, [h["val_acc"] for h in hist], "o-", label="validation accuracy")
    ax.plot(ep, [h["val_auc"] for h in hist], "s--", ms=4, label="validation ROC AUC")
    test_acc = meta.get("metrics", {}).get("test_acc")
    if test_acc is not None:
        best = meta["metrics"].get("best_epoch", ep[-1])
        ax.axhline(test_acc, color="tab:red", ls=":", lw=2)
        ax.plot([best], [test_acc], "*", color="tab:red", ms=12,
                label=f"test accuracy of the kept epoch ({best})")
        ax.annotate(f"test: {test_acc:.1%}", (ep[0], test_acc), xytext=(0, 5),
                    textcoords="offset points", color="tab:red", fontsize=9)
    h1 = hist[0]
    ax.annotate(f"epoch 1: validation\naccuracy {h1['val_acc']:.1%},\nAUC {h1['val_auc']:.3f}",
                (1, h1["val_acc"]), xytext=(1.6, 0.88), fontsize=8,
                arrowprops=dict(arrowstyle="->", lw=0.8))
    ax.set_ylim(0.8, 1.005)
    ax.set_title("accuracy and AUC", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    fig.suptitle(f"Reference recipe, seed {meta.get('seed')}: validation saturates at epoch 1; "
                 "test stays far below", fontsize=10)
    fig.text(0.5, 0.01, f"Drawn from {where}\n({meta.get('command')}; {meta.get('hardware')}, "
                        f"{meta.get('wall_seconds', 0) / 60:.0f} min wall)",
             ha="center", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save(fig, out / "training_curve.png", colors=128)


# ---------------------------------------------------------------------------------
# Step 3: Grad-CAM.
# ---------------------------------------------------------------------------------


def heat_shares(heat: np.ndarray) -> tuple[float, float]:
    """(share of the heat in the top-left and top-right corners, share inside a central
    lung box): the corners are the top 20% of the rows and the outer 25% of the columns;
    the lung box rows 20-85%, columns 15-85%."""
    h = heat / heat.sum() if heat.sum() > 0 else heat
    n, m = h.shape
    top = h[: int(0.2 * n)]
    corners = top[:, : int(0.25 * m)].sum() + top[:, int(0.75 * m):].sum()
    lungs = h[int(0.2 * n): int(0.85 * n), int(0.15 * m): int(0.85 * m)].sum()
    return float(corners), float(lungs)


def pneumonia_cam(model, meta, path):
    """(film, Grad-CAM of the PNEUMONIA class, P(PNEUMONIA) at the stored temperature)."""
    from gradcam import GradCAM

    gray = dataset.load_image_array(path, meta["preprocessing"]["image_size"])
    x = network.model_input(torch.from_numpy(gray)[None, None], network.intensity_of(meta))
    heat, _, probs = GradCAM(model)(x, class_idx=1)  # probs: softmax at T = 1
    logits = torch.log(torch.as_tensor(probs, dtype=torch.float64))[None]
    p = float(network.probabilities(logits, checkpoints.calibration_of(meta)["temperature"])[0])
    return gray, heat, p


def fig_gradcam(args, out: Path):
    from gradcam import overlay

    data = Path(args.data)
    need_split(data, "test")
    model, meta = checkpoints.load_checkpoint(REFERENCE)
    fig, axes = plt.subplots(2, 2, figsize=(5.6, 6.0))
    for k, (rel, what) in enumerate(((GRADCAM_LUNGS, "on the lungs"),
                                     (GRADCAM_MARKER, "on the corner marker"))):
        gray, heat, p = pneumonia_cam(model, meta, data / rel)
        corners, lungs = heat_shares(heat)
        show(axes[k, 0], gray, f"{Path(rel).name}\ntruth: {rel.split('/')[1]}")
        show(axes[k, 1], overlay(gray, heat), f"P(PNEUMONIA) {p:.1%}\nheat: lung box "
                                              f"{lungs:.0%}, top corners {corners:.0%}")
        axes[k, 0].set_ylabel(f"heat {what}", fontsize=9)
    fig.suptitle("Grad-CAM of the PNEUMONIA score,\nreference model (models/reference_seed1.pth)",
                 fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=1.5, rect=(0, 0, 1, 0.95))
    save(fig, out / "gradcam_lungs_vs_marker.png", colors=192)


def search(args):
    """Where is the heat? The reference model's Grad-CAMs of the healthy test films it
    calls PNEUMONIA, ranked by the share in the top corners, and of the pneumonias it
    is sure of (P >= SURE), ranked by the share inside the lung box."""
    data = Path(args.data)
    need_split(data, "test")
    model, meta = checkpoints.load_checkpoint(REFERENCE)
    paths, labels = dataset.list_labelled(data / "test")
    images, kept, _ = dataset.decode_all(paths, meta["preprocessing"]["image_size"], None, "test")
    p = network.probabilities(network.predict_logits(model, images, network.intensity_of(meta)))
    normal, sure = [], []
    for j, i in enumerate(kept):
        if labels[i] == 0 and p[j] >= 0.5:
            normal.append((paths[i], float(p[j])))
        elif labels[i] == 1 and p[j] >= SURE:
            sure.append((paths[i], float(p[j])))
    print(f"{REFERENCE.relative_to(ROOT)}: {len(normal)} NORMAL test films called PNEUMONIA, "
          f"{len(sure)} PNEUMONIA films called with P >= {SURE}")

    def ranked(films, key):
        rows = []
        for path, prob in films:
            corners, lungs = heat_shares(pneumonia_cam(model, meta, path)[1])
            rows.append((path.relative_to(data), prob, corners, lungs))
        return sorted(rows, key=lambda r: -r[key])

    print("NORMAL films called PNEUMONIA, most heat in the top corners first:")
    for rel, prob, corners, lungs in ranked(normal, 2)[:10]:
        print(f"  {rel}  P {prob:.4f}  top corners {corners:.2f}  lung box {lungs:.2f}")
    print(f"PNEUMONIA films at P >= {SURE}, most heat in the lung box first:")
    for rel, prob, corners, lungs in ranked(sure, 3)[:5]:
        print(f"  {rel}  P {prob:.4f}  top corners {corners:.2f}  lung box {lungs:.2f}")


# ---------------------------------------------------------------------------------
# Step 4: evaluation.
# ---------------------------------------------------------------------------------


def fig_reliability(args, out: Path):
    data = Path(args.data)
    need_split(data, "test")
    paths, labels = dataset.list_labelled(data / "test")
    images, kept, _ = dataset.decode_all(paths, network.IMAGE_SIZE, None, "test")
    y = np.asarray(labels)[kept]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), sharey=True)
    for ax, (name, path) in zip(axes, (("reference, seed 1", REFERENCE),
                                       ("improved, seed 1 (shipped)", IMPROVED))):
        model, meta = checkpoints.load_checkpoint(path)
        cal = checkpoints.calibration_of(meta)
        p = network.probabilities(network.predict_logits(model, images, network.intensity_of(meta)),
                             cal["temperature"])
        pred, conf = scoring.decide(p, cal["threshold"])
        ece, bins = scoring.expected_calibration_error(pred == y, conf)
        width = 1 / scoring.ECE_BINS
        for lo, _hi, acc, c, n in bins:
            ax.bar(lo, acc, width, align="edge", color="tab:blue", edgecolor="k", lw=0.5)
            ax.plot(lo + width / 2, c, "o", color="tab:orange", ms=4)
            ax.vlines(lo + width / 2, min(acc, c), max(acc, c), color="k", lw=2)
            ax.text(lo + width / 2, 0.02, str(n), ha="center", fontsize=6, rotation=90,
                    color="white" if acc > 0.1 else "k")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.bar([], [], color="tab:blue", label="accuracy in the bin")
        ax.plot([], [], "o", color="tab:orange", label="mean confidence in the bin")
        ax.plot([], [], color="k", lw=2, label="gap (ECE: weighted mean)")
        ax.set_xlim(min([0.45] + [lo for lo, *_ in bins]), 1.0)  # a threshold < 0.5 gives decisions below 0.5
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence of the decision")
        ax.set_title(f"{name}: ECE {ece:.3f}, temperature {cal['temperature']:.2f}",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of decisions that were right")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability diagrams on the test split ({len(y)} images; 15 bins, the "
                 "number in each bar is its count of images)", fontsize=9)
    fig.tight_layout()
    save(fig, out / "reliability.png", colors=128)


def find_evaluation(args) -> Path:
    """--eval, or the newest zero-shot evaluation folder of a model file identical to
    IMPROVED (not one with --adapt: the report figure shows the model as shipped)."""
    if args.eval:
        return Path(args.eval)
    shipped = runtime.sha256_file(IMPROVED)
    for folder in sorted((ROOT / "outputs").glob("**/eval_*/"), key=lambda f: f.name,
                         reverse=True):
        m = json.loads((folder / "metrics.json").read_text())
        models = m["models"]
        if (m.get("protocol", "zero-shot").startswith("zero-shot") and len(models) == 1
                and (ROOT / models[0]).exists()
                and runtime.sha256_file(ROOT / models[0]) == shipped):
            return folder
    raise FileNotFoundError("no zero-shot outputs/**/eval_* of the shipped model (run python "
                            "visualize_results.py, or pass --eval)")


def fig_report(args, out: Path):
    folder = find_evaluation(args)
    m = json.loads((folder / "metrics.json").read_text())
    panels = ["confusion_matrix.png", "reliability_diagram.png", "accuracy_coverage.png"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.1))
    for ax, name in zip(axes, panels):
        ax.imshow(Image.open(folder / name))
        ax.set_axis_off()
    fig.suptitle(f"report.html of {m['models'][0]} on {m['data']} ({m['n']} images; "
                 f"{m.get('protocol', 'zero-shot')}): three of its figures\nfrom "
                 f"{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}",
                 fontsize=9)
    fig.tight_layout(pad=0.2)
    save(fig, out / "improved_report.png", colors=128)


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(True)
    if args.search:
        search(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"samples": fig_samples, "counts": fig_counts, "preprocessing": fig_preprocessing,
              "curve": fig_curve, "gradcam": fig_gradcam, "reliability": fig_reliability,
              "report": fig_report}
    for name in args.figures or FIGURES:
        try:
            makers[name](args, out)
        except FileNotFoundError as e:
            print(f"skipped {name}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
