#!/usr/bin/env python3
"""Site shift and the out-of-distribution flag, measured (docs/results.md).

    python experiments/site_shift.py                                 # both shipped models
    python experiments/site_shift.py --model runs/<run>/mobilenet_cxr.pth --imagenet

For each checkpoint (which must hold typicality statistics: train_cxray.py adds them at
the end of a run, experiments/upgrade_checkpoint.py --typicality-for adds them to an old
checkpoint), prints the share of
images flagged "outside the training distribution":
  - validation (the model's own split, rebuilt from its seed): about 1% by construction;
  - test NORMAL and test PNEUMONIA (labels only to split the shares);
  - the full-resolution and DICOM samples (../shared/data/samples, when present);
  - inputs that are not chest X-rays, generated here: blank and noise images (which
    predict.py refuses before the model sees them), scikit-learn's two bundled sample
    photographs as random greyscale crops, upsampled handwritten digits, gradients and
    checkerboards. Shares are given for the flag alone and for the whole predict path
    (refused by the structure check, or flagged).
Then the domain classifier (5-fold logistic regression, ROC AUC) between the model's
validation images and the test images, overall and per class; with --imagenet also on
frozen ImageNet MobileNetV2 features between train and test images per class.

Nothing is fitted on test for any decision: the test images are only measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import checkpoints, dataset, imagefiles, network, runtime, scan, siteshift  # noqa: E402

SAMPLES = ROOT.parent / "shared" / "data" / "samples"


def non_radiographs(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Greyscale uint8 images that are not chest X-rays, by kind."""
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    kinds = {}
    kinds["blank"] = np.stack([np.full((size, size), v, np.uint8)
                               for v in np.linspace(0, 255, 20).astype(int)])
    white = rng.normal(128, 50, (30, size, size))
    kinds["noise"] = np.clip(white, 0, 255).astype(np.uint8)
    smooth = []
    for scale in rng.uniform(2, 16, 30):  # smoothed noise: blobs about `scale` px wide
        small = max(2, int(size / scale))
        im = Image.fromarray(np.clip(rng.normal(128, 60, (small, small)), 0, 255)
                             .astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        smooth.append(np.asarray(im))
    kinds["smoothed noise"] = np.stack(smooth)
    photos = []
    for photo in load_sample_images().images:
        grey = Image.fromarray(photo).convert("L")
        w, h = grey.size
        for _ in range(50):
            side = int(rng.uniform(0.3, 1.0) * min(w, h))
            x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            photos.append(np.asarray(grey.crop((x0, y0, x0 + side, y0 + side))
                                     .resize((size, size), Image.Resampling.BILINEAR)))
    kinds["photo crops (grey)"] = np.stack(photos)
    digits = load_digits().images[rng.permutation(1797)[:50]]
    kinds["digits"] = np.stack([np.asarray(Image.fromarray((d * 16).clip(0, 255).astype(np.uint8))
                                           .resize((size, size), Image.Resampling.BILINEAR))
                                for d in digits])
    ramp = np.linspace(0, 255, size)
    grads = [np.add.outer(ramp * np.cos(a), ramp * np.sin(a)) for a in np.linspace(0, 3, 10)]
    kinds["gradients"] = np.stack([((g - g.min()) / (np.ptp(g) + 1e-9) * 255).astype(np.uint8)
                                   for g in grads])
    boards = []
    for n in (2, 4, 7, 8, 14, 16, 28, 32, 56, 112):
        cell = np.indices((size, size)) // max(1, size // n)
        boards.append((((cell[0] + cell[1]) % 2) * 200 + 28).astype(np.uint8))
    kinds["checkerboards"] = np.stack(boards)
    return kinds


def refused(images: np.ndarray) -> np.ndarray:
    """Which images predict.py refuses before the model (blank, noise)."""
    out = []
    for im in images:
        try:
            imagefiles.check_structure(im)
            out.append(False)
        except imagefiles.ImageReadError:
            out.append(True)
    return np.array(out)


def features(model, meta, images):
    return network.predict_logits(model, images, network.intensity_of(meta), features=True)[1].numpy()


def share(flags) -> str:
    return f"{np.mean(flags):6.1%} of {len(flags):>4}"


def measure(path: Path, data: Path, kinds) -> dict:
    model, meta = checkpoints.load_checkpoint(path)
    stats = model.typicality
    if stats is None:
        raise SystemExit(f"error: {path} has no typicality statistics: run python "
                         f"experiments/upgrade_checkpoint.py --typicality-for {path}")
    size = meta["preprocessing"]["image_size"]
    print(f"\n{path} ({meta['recipe']}, seed {meta['seed']}), cut {stats['cut']:.2f}")
    splits, _, (tp, tl), _ = dataset.checkpoint_splits(meta, data)
    x_val, y_val = splits["val"]
    x_test, kept, _ = dataset.decode_all(tp, size, ".cache", "test")
    y_test = np.array(tl)[kept]

    def flags(images):
        return siteshift.typicality_score(features(model, meta, images), stats) > stats["cut"]

    out = {"validation": flags(x_val)}
    f_test = features(model, meta, x_test)
    t_flag = siteshift.typicality_score(f_test, stats) > stats["cut"]
    out["test NORMAL"], out["test PNEUMONIA"] = t_flag[y_test == 0], t_flag[y_test == 1]
    for sub in ("fullres", "dicom"):
        files = [f for f in scan.scan_folder(SAMPLES / sub)[0]] if (SAMPLES / sub).is_dir() else []
        arrays = [a for a, _ in (dataset.try_load_image_array(f, size) for f in files) if a is not None]
        if arrays:
            out[f"samples/{sub}"] = flags(np.stack(arrays))
    print("  flagged by the model (typicality > cut):")
    for k, v in out.items():
        print(f"    {k:<22} {share(v)}")
    print("  not chest X-rays: flagged by the model | stopped by predict.py (refused or flagged)")
    stopped_all, flagged_all = [], []
    for kind, images in kinds.items():
        f, r = flags(images), refused(images)
        flagged_all.append(f)
        stopped_all.append(f | r)
        print(f"    {kind:<22} {share(f)} | {share(f | r)}")
    print(f"    {'all':<22} {share(np.concatenate(flagged_all))} | "
          f"{share(np.concatenate(stopped_all))}")
    z_test = siteshift.project(f_test, stats)
    ref_z, ref_y = stats["reference_z"].numpy(), stats["reference_labels"].numpy()
    print("  domain classifier, validation vs test, on this model's features (AUC):")
    print(f"    all {siteshift.domain_auc(ref_z, z_test):.3f}, NORMAL "
          f"{siteshift.domain_auc(ref_z[ref_y == 0], z_test[y_test == 0]):.3f}, PNEUMONIA "
          f"{siteshift.domain_auc(ref_z[ref_y == 1], z_test[y_test == 1]):.3f}")
    return out


def imagenet_domain(data: Path, per_class: int, seed: int = 0):
    """The finding to reproduce: on frozen ImageNet features, is test told from train?"""
    model, _ = network.build_model(pretrained=True)
    model.eval()
    meta = {"preprocessing": {"intensity": "none"}}
    rng = np.random.default_rng(seed)
    tr_paths, tr_labels = dataset.list_labelled(data / "train")
    te_paths, te_labels = dataset.list_labelled(data / "test")
    print(f"\nFrozen ImageNet MobileNetV2 features (1280-d), train vs test, {per_class} train "
          "images per class, 5-fold logistic regression:")
    for k, name in enumerate(network.CLASS_NAMES):
        tr = [p for p, y in zip(tr_paths, tr_labels) if y == k]
        tr = [tr[i] for i in sorted(rng.permutation(len(tr))[:per_class])]
        te = [p for p, y in zip(te_paths, te_labels) if y == k]
        x_tr = dataset.decode_all(tr, network.IMAGE_SIZE, ".cache", f"train {name}")[0]
        x_te = dataset.decode_all(te, network.IMAGE_SIZE, ".cache", f"test {name}")[0]
        f_tr, f_te = features(model, meta, x_tr), features(model, meta, x_te)
        print(f"  {name:<10} AUC {siteshift.domain_auc(f_tr, f_te):.3f}  ({len(x_tr)} train vs "
              f"{len(x_te)} test)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", type=Path,
                   help="checkpoint (repeatable; default: the two shipped models)")
    p.add_argument("--data", type=Path, default=ROOT / "chest_xray")
    p.add_argument("--imagenet", action="store_true",
                   help="also the domain classifier on frozen ImageNet features")
    p.add_argument("--per-class", type=runtime.positive_int, default=600,
                   help="train images per class for --imagenet")
    args = p.parse_args()
    runtime.pick_device("cpu")
    models = args.model or [ROOT / "models" / "mobilenet_cxr.pth",
                            ROOT / "models" / "reference_seed1.pth"]
    kinds = non_radiographs(network.IMAGE_SIZE)
    for path in models:
        measure(path, args.data, kinds)
    if args.imagenet:
        imagenet_domain(args.data, args.per_class)


if __name__ == "__main__":
    main()
