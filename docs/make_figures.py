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


def save(fig, path: Path, colors: int = 96, dither: bool = False):
    """A small PNG: rendered at DPI, reduced to an adaptive palette (dithered for smooth
    colour gradients, such as a heatmap over a film)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(
        colors=colors, dither=Image.Dither.FLOYDSTEINBERG if dither else Image.Dither.NONE)
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


def pixel_figure(width: float, height: float):
    """A figure of width x height pixels (at DPI) and axes_at(x, y, w, h): an axis placed
    in pixels from the top left."""
    fig = plt.figure(figsize=(width / DPI, height / DPI))

    def axes_at(x, y, w, h):
        return fig.add_axes((x / width, 1 - (y + h) / height, w / width, h / height))

    return fig, axes_at


def regions(n: int, m: int) -> dict:
    """The rectangles heat_shares measures on an n x m map, as (first row, end row, first
    column, end column): the top-left and top-right corners (top 20% of the rows, outer 25%
    of the columns, where the "R" marker and the date stamp sit) and the central lung box
    (rows 20-85%, columns 15-85%)."""
    top = int(0.2 * n)
    return {"top-left corner": (0, top, 0, int(0.25 * m)),
            "top-right corner": (0, top, int(0.75 * m), m),
            "lung box": (top, int(0.85 * n), int(0.15 * m), int(0.85 * m))}


def outline(ax, box, colour, ls="-", lw=1.5, label=None):
    """Draw a regions() rectangle (pixel edges) on an image axis."""
    r0, r1, c0, c1 = box
    ax.add_patch(plt.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                               edgecolor=colour, ls=ls, lw=lw, label=label))


CORNER_COLOURS = {"top-left corner": "gold", "top-right corner": "cyan"}


def fig_samples(args, out: Path):
    """Three random films of each split and class at the model's size, each beside its two
    top corners enlarged (the corners heat_shares measures), so markers can be counted."""
    data = Path(args.data)
    rng = np.random.default_rng(0)
    groups = [(s, c) for s in ("train", "test") for c in network.CLASS_NAMES]
    films, size = 3, network.IMAGE_SIZE
    box = regions(size, size)
    # layout in pixels (DPI px per inch): a label column, then per film the film and its
    # two corners stacked to its right
    left, film, gap, unit_gap, head, row_gap, top_h = 34, 182, 4, 14, 22, 10, 54
    crop_w = (film - gap) / 2 * (box["top-left corner"][3] / box["top-left corner"][1])
    unit = film + gap + crop_w
    width = left + films * unit + (films - 1) * unit_gap + 6
    height = top_h + len(groups) * (head + film + row_gap)
    fig, axes_at = pixel_figure(width, height)
    for g, (split, cls) in enumerate(groups):
        need_split(data, split)
        files = scan.list_images(data / split / cls)
        y = top_h + g * (head + film + row_gap) + head
        fig.text(4 / width, 1 - (y + film / 2) / height, f"{split} {cls}", fontsize=12,
                 va="center", ha="left", weight="bold", rotation=90)
        for k, i in enumerate(sorted(rng.choice(len(files), films, replace=False))):
            gray = dataset.load_image_array(files[i], size)
            x = left + k * (unit + unit_gap)
            ax = axes_at(x, y, film, film)
            show(ax, gray)
            ax.set_title(files[i].name, fontsize=11, pad=3)
            for name, colour in CORNER_COLOURS.items():
                outline(ax, box[name], colour, lw=1.2)
            for j, (name, colour) in enumerate(CORNER_COLOURS.items()):
                r0, r1, c0, c1 = box[name]
                cax = axes_at(x + film + gap, y + j * (film + gap) / 2, crop_w, (film - gap) / 2)
                show(cax, gray[r0:r1, c0:c1])
                for spine in cax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2.5)
    zoom = crop_w / (box["top-left corner"][3] - box["top-left corner"][2]) / (film / size)
    fig.text(0.5, 1 - 6 / height, f"Three random films (seed 0) of each split and class, "
             f"{size} x {size} as the model sees them", ha="center", va="top", fontsize=12)
    fig.text(0.5, 1 - 28 / height, f"right of each film: its top-left (gold, upper) and "
             f"top-right (cyan, lower) corners, {zoom:.1f}x larger", ha="center", va="top",
             fontsize=11)
    save(fig, out / "samples.png", colors=128)


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
    """Top block: the preprocessing steps of one film, a column each. Bottom block: four
    random training augmentations of that film per recipe, a row each titled on the left
    (and the shifted copies used only for calibration)."""
    from cxr import engine, recipes

    size = network.IMAGE_SIZE
    full = np.asarray(imagefiles.read_image_gray(EXAMPLE), dtype=np.uint8)
    gray = dataset.load_image_array(EXAMPLE, size)
    t = torch.from_numpy(gray)[None]  # (1, H, W) uint8, as the training loader holds it
    equalized = network.equalize(t)[0].numpy()
    net_in = network.model_input(t[None], "none")[0, 0].numpy()
    draws = 4
    rows = [
        ("reference recipe\naugmentation",
         engine.train_transform(recipes.recipe_for("reference"), size)),
        ("improved recipe\naugmentation\n(equalised first)",
         engine.train_transform(recipes.recipe_for("improved"), size)),
        ("shifted copies\n(calibration only,\nnever training)", calib.stress_transform(size)),
    ]
    steps = [(full, f"1. the file:\n{full.shape[1]} x {full.shape[0]}, grey 8-bit"),
             (gray, f"2. squashed to\n{size} x {size} (every recipe)"),
             (equalized, "3. equalised\n(improved recipe only)"),
             (net_in, "4. network input: 3\n"
                      f"channels, {net_in.min():.1f} to {net_in.max():.1f}")]
    left, cell, gap, title_h, head_h, block_gap = 150, 168, 8, 40, 44, 12
    width = left + draws * cell + (draws - 1) * gap + 6
    block1 = head_h + title_h + cell
    height = block1 + block_gap + 46 + len(rows) * (cell + gap)
    fig, axes_at = pixel_figure(width, height)
    fig.patches.append(plt.Rectangle((0, 1 - (block1 + 6) / height), 1, (block1 + 6) / height,
                                     transform=fig.transFigure, color="0.92", zorder=-1))
    fig.text(0.5, 1 - 6 / height, f"One test film ({EXAMPLE.name})\n"
             "Preprocessing, in order (every film, in training and prediction)", ha="center",
             va="top", fontsize=12, weight="bold")
    for c, (img, title) in enumerate(steps):
        ax = axes_at(left + c * (cell + gap), head_h + title_h, cell, cell)
        ax.imshow(img, cmap="gray", **({} if c == 3 else {"vmin": 0, "vmax": 255}))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=11, pad=3)
    y0 = block1 + block_gap
    fig.text(0.5, 1 - y0 / height, "Augmentation in training: 4 random draws of the "
             "squashed film (step 2) per row", ha="center", va="top", fontsize=12,
             weight="bold")
    fig.text(6 / width, 1 - (head_h + title_h + cell / 2) / height, "preprocessing\nsteps,\n"
             "left to right", fontsize=11, va="center", ha="left", weight="bold")
    for r, (label, transform) in enumerate(rows):
        torch.manual_seed(r + 1)
        y = y0 + 46 + r * (cell + gap)
        fig.text(6 / width, 1 - (y + cell / 2) / height, label, fontsize=11, va="center",
                 ha="left", weight="bold")
        for c in range(draws):
            ax = axes_at(left + c * (cell + gap), y, cell, cell)
            show(ax, transform(t.clone())[0].numpy(), f"draw {c + 1}" if r == 0 else None,
                 fontsize=11)
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
    """(share of the heat in the top-left and top-right corners, share inside the central
    lung box): the rectangles of regions()."""
    h = heat / heat.sum() if heat.sum() > 0 else heat
    box = regions(*h.shape)

    def inside(name):
        r0, r1, c0, c1 = box[name]
        return h[r0:r1, c0:c1].sum()

    return float(inside("top-left corner") + inside("top-right corner")), float(inside("lung box"))


def pneumonia_cam(model, meta, path):
    """(film, Grad-CAM of the PNEUMONIA class, P(PNEUMONIA) at the stored temperature)."""
    from gradcam import GradCAM

    gray = dataset.load_image_array(path, meta["preprocessing"]["image_size"])
    x = network.model_input(torch.from_numpy(gray)[None, None], network.intensity_of(meta))
    heat, _, probs = GradCAM(model)(x, class_idx=1)  # probs: softmax at T = 1
    logits = torch.log(torch.as_tensor(probs, dtype=torch.float64))[None]
    p = float(checkpoints.calibration_of(meta).probability([logits])[0])
    return gray, heat, p


def fig_gradcam(args, out: Path):
    """Two films the reference calls PNEUMONIA at P >= SURE, each beside its Grad-CAM, with
    the rectangles heat_shares measures drawn on both."""
    from gradcam import overlay

    data = Path(args.data)
    need_split(data, "test")
    model, meta = checkpoints.load_checkpoint(REFERENCE)
    fig, axes = plt.subplots(2, 2, figsize=(10.2, 11.6))
    styles = {"lung box": ("white", "--"), "top-left corner": ("magenta", "-"),
              "top-right corner": ("magenta", "-")}
    for k, (rel, what) in enumerate(((GRADCAM_LUNGS, "heat on the lungs"),
                                     (GRADCAM_MARKER, "heat on the corner marker"))):
        gray, heat, p = pneumonia_cam(model, meta, data / rel)
        corners, lungs = heat_shares(heat)
        box = regions(*heat.shape)
        show(axes[k, 0], gray, f"{Path(rel).name}\ntruth: {rel.split('/')[1]}", fontsize=12)
        show(axes[k, 1], overlay(gray, heat), f"P(PNEUMONIA) {p:.1%}; heat: lung box "
                                              f"{lungs:.0%},\ntop corners {corners:.0%}",
             fontsize=12)
        for ax in axes[k]:
            for name, (colour, ls) in styles.items():
                outline(ax, box[name], colour, ls=ls, lw=2.2,
                        label=None if name == "top-right corner" else
                        ("top corners" if name == "top-left corner" else name))
        axes[k, 0].set_ylabel(what, fontsize=13)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    legend = fig.legend(handles, ["lung box (rows 20-85%, columns 15-85%)",
                                  "top corners (top 20% of rows, outer 25% of columns)"],
                        loc="lower center", ncol=1, fontsize=12, facecolor="0.35",
                        labelcolor="white", framealpha=1, handlelength=3)
    legend.get_frame().set_edgecolor("k")
    fig.suptitle("Grad-CAM of the PNEUMONIA score, reference model\n(red: raised the score "
                 "most); the shares are of all the heat on the film", fontsize=12)
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.085, top=0.885, wspace=0.06,
                        hspace=0.17)
    save(fig, out / "gradcam_lungs_vs_marker.png", colors=256, dither=True)


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
    """Reliability diagrams of both shipped models on the test split, each over a panel of
    its films per confidence bin. The confidence is scoring.decide's: the probability of
    the class called at the model's stored threshold (P(PNEUMONIA) for a PNEUMONIA call,
    1 - P(PNEUMONIA) for a NORMAL one), so it lies below 0.5 only for PNEUMONIA calls with
    P(PNEUMONIA) between a threshold below 0.5 and 0.5."""
    data = Path(args.data)
    need_split(data, "test")
    paths, labels = dataset.list_labelled(data / "test")
    images, kept, _ = dataset.decode_all(paths, network.IMAGE_SIZE, None, "test")
    y = np.asarray(labels)[kept]
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.6), sharex="col",
                             gridspec_kw={"height_ratios": (2.4, 1)})
    width = 1 / scoring.ECE_BINS
    for col, (name, path) in enumerate((("reference, seed 1", REFERENCE),
                                        ("improved, seed 1 (shipped)", IMPROVED))):
        ax, cax = axes[:, col]
        model, meta = checkpoints.load_checkpoint(path)
        cal = checkpoints.calibration_of(meta)
        p = cal.probability([network.predict_logits(model, images, network.intensity_of(meta))])
        pred, conf = cal.decide(p)
        ece, bins = scoring.expected_calibration_error(pred == y, conf)
        for lo, _hi, acc, c, n in bins:
            ax.bar(lo, acc, width, align="edge", color="tab:blue", edgecolor="k", lw=0.5)
            ax.plot(lo + width / 2, c, "o", color="tab:orange", ms=6, zorder=3)
            ax.vlines(lo + width / 2, min(acc, c), max(acc, c), color="k", lw=2.5)
            cax.bar(lo, n, width, align="edge", color="0.6", edgecolor="k", lw=0.5)
            cax.text(lo + width / 2, n * 1.15, str(n), ha="center", va="bottom", fontsize=12)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.bar([], [], color="tab:blue", label="share right in the bin")
        ax.plot([], [], "o", color="tab:orange", ms=6, label="mean confidence in the bin")
        ax.plot([], [], color="k", lw=2.5, label="gap (ECE: its mean over the films)")
        below = int((conf < 0.5).sum())
        if below:
            ax.axvline(0.5, color="tab:red", lw=1.2, ls=":")
            ax.text(0.01, 0.98, f"left of the red line: {below} films called PNEUMONIA\n"
                    f"with P(PNEUMONIA) between the threshold\n{cal.threshold:.3f} and 0.5 "
                    "(confidence below 0.5)", fontsize=11, color="tab:red", va="top",
                    transform=ax.transAxes)
        ax.set_xlim(min([0.45] + [lo for lo, *_ in bins]), 1.0)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name}\nECE {ece:.3f}, temperature {cal.temperature_words('.2f')}, "
                     f"threshold {cal.threshold:.3f}", fontsize=12)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=11)
        cax.set_yscale("log")
        cax.set_ylim(0.7, len(y) * 6)
        cax.set_yticks([1, 10, 100])
        cax.set_yticklabels(["1", "10", "100"])
        cax.tick_params(labelsize=11)
        cax.grid(alpha=0.3)
        cax.set_xlabel("confidence = probability the model gives the class it calls\n"
                       "(P(PNEUMONIA) if it calls PNEUMONIA, else 1 - P(PNEUMONIA))", fontsize=11)
    axes[0, 0].set_ylabel("share of the bin's films\ncalled right", fontsize=12)
    axes[1, 0].set_ylabel("films in the bin\n(log scale)", fontsize=12)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=4,
               fontsize=11, bbox_to_anchor=(0.5, 0.955))
    fig.suptitle(f"Reliability on the test split ({len(y)} films; 15 equal-width confidence "
                 "bins, empty bins not drawn)", fontsize=13)
    fig.tight_layout(h_pad=0.6, rect=(0, 0, 1, 0.93))
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
