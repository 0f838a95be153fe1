#!/usr/bin/env python3
"""Site shift and the atypical flag, measured (docs/results.md).

    python experiments/site_shift.py --data DATA                     # both shipped models
    python experiments/site_shift.py --data DATA --save-ratios outputs/ratios
    python experiments/site_shift.py --load-ratios outputs/ratios    # the report again, no inference
    python experiments/site_shift.py --model runs/<run>/mobilenet_cxr.pth --imagenet

For each checkpoint (which must hold typicality statistics: train_cxray.py adds them at
the end of a run, experiments/upgrade_checkpoint.py --typicality-for adds them to an old
checkpoint), takes every image's typicality ratio (typicality / the model's cut) and
prints the share *atypical* (ratio above 1: predict.py gives the verdict with a warning)
for the sets below (which of them get no verdict: experiments/radiograph_checks.py, from
the ratios saved here):
  - validation (the model's own split, rebuilt from its seed): about 1% atypical by
    construction;
  - test NORMAL and test PNEUMONIA (labels only to split the shares), and how many
    correct NORMAL calls are atypical;
  - the full-resolution and DICOM samples (../shared/data/samples, when present);
  - inputs that are not chest X-rays, generated here: blank and noise images (which
    predict.py refuses before the model sees them), scikit-learn's two bundled sample
    photographs as random greyscale crops, upsampled handwritten digits, gradients and
    checkerboards.
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


def measure(path: Path, data: Path, kinds) -> dict[str, np.ndarray]:
    """The typicality ratio (score / cut) of every image, by set (validation, test by
    class, samples, each kind of non-radiograph), and the arrays the report needs
    (refused by the structure checks; the test films' labels and decisions); prints the
    domain classifier between validation and test."""
    model, meta = checkpoints.load_checkpoint(path)
    stats = model.typicality
    if stats is None:
        raise SystemExit(f"error: {path} has no typicality statistics: run python "
                         f"experiments/upgrade_checkpoint.py --typicality-for {path}")
    size, intensity = meta["preprocessing"]["image_size"], network.intensity_of(meta)
    cal = checkpoints.calibration_of(meta)
    splits, _, (tp, tl), _ = dataset.checkpoint_splits(meta, data)
    x_test, kept, _ = dataset.decode_all(tp, size, ".cache", "test")

    def run(images):
        logits, f = network.predict_logits(model, images, intensity, features=True)
        return logits, f.numpy(), siteshift.typicality_score(f.numpy(), stats) / stats["cut"]

    out = {"validation": run(splits["val"][0])[2]}
    logits, f_test, r_test = run(x_test)
    y_test = np.array(tl)[kept]
    p = cal.probability([logits])
    out |= {"test NORMAL": r_test[y_test == 0], "test PNEUMONIA": r_test[y_test == 1],
            "test:label": y_test, "test:ratio": r_test,
            "test:decision": cal.decide(p)[0], "test:confident": cal.answered(p)}
    for sub in ("fullres", "dicom"):
        files = scan.scan_folder(SAMPLES / sub)[0] if (SAMPLES / sub).is_dir() else []
        arrays = [a for a, _ in (dataset.try_load_image_array(f, size) for f in files) if a is not None]
        if arrays:
            out[f"samples/{sub}"] = run(np.stack(arrays))[2]
    for kind, images in kinds.items():
        out[f"non-radiograph:{kind}"] = run(images)[2]
        out[f"refused:{kind}"] = refused(images)
    z_test = siteshift.project(f_test, stats)
    ref_z, ref_y = stats["reference_z"].numpy(), stats["reference_labels"].numpy()
    print(f"\n{path}: domain classifier, validation vs test, on this model's features (AUC):")
    print(f"    all {siteshift.domain_auc(ref_z, z_test):.3f}, NORMAL "
          f"{siteshift.domain_auc(ref_z[ref_y == 0], z_test[y_test == 0]):.3f}, PNEUMONIA "
          f"{siteshift.domain_auc(ref_z[ref_y == 1], z_test[y_test == 1]):.3f}")
    return out


def report(path, out: dict) -> None:
    """Shares atypical (ratio > 1) per set, and of the non-radiographs those refused by
    the structure checks. Which images get no verdict: experiments/radiograph_checks.py."""
    kinds = [k.split(":", 1)[1] for k in out if k.startswith("non-radiograph:")]
    nonrad = np.concatenate([out[f"non-radiograph:{k}"] for k in kinds])
    gone = np.concatenate([out[f"refused:{k}"] for k in kinds])
    print(f"\n{path}")
    print(f"  {'images':<26} {'atypical (ratio > 1)':>20} | refused by the structure checks")
    for name in ["validation", "test NORMAL", "test PNEUMONIA", "samples/fullres", "samples/dicom"]:
        if name in out:
            print(f"    {name:<24} {share(out[name] > 1):>20} |")
    for k in kinds:
        print(f"    {k:<24} {share(out[f'non-radiograph:{k}'] > 1):>20} | {share(out[f'refused:{k}'])}")
    print(f"    {'all non-radiographs':<24} {share(nonrad > 1):>20} | {share(gone)}")
    y, d, r = out["test:label"], out["test:decision"], out["test:ratio"]
    correct = (y == 0) & (d == 0)
    confident = correct & out["test:confident"]
    print(f"  test: {correct.sum()} correct NORMAL calls ({confident.sum()} confident, answered by the "
          f"referral rule): atypical {(correct & (r > 1)).sum()} ({(confident & (r > 1)).sum()} "
          f"confident); largest ratio of a test film {r.max():.3f}")


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
    p.add_argument("--save-ratios", type=Path, metavar="NPZ",
                   help="also write every image's ratio (one file per model: NPZ.<model>.npz)")
    p.add_argument("--load-ratios", type=Path, metavar="NPZ",
                   help="report from ratios saved by --save-ratios NPZ, without inference")
    p.add_argument("--imagenet", action="store_true",
                   help="also the domain classifier on frozen ImageNet features")
    p.add_argument("--per-class", type=runtime.positive_int, default=600,
                   help="train images per class for --imagenet")
    args = p.parse_args()
    runtime.pick_device("cpu")
    models = args.model or [ROOT / "models" / "mobilenet_cxr.pth",
                            ROOT / "models" / "reference_seed1.pth"]
    kinds = None if args.load_ratios else non_radiographs(network.IMAGE_SIZE)
    for path in models:
        if args.load_ratios:
            with np.load(f"{args.load_ratios}.{path.stem}.npz") as z:
                out = dict(z)
        else:
            out = measure(path, args.data, kinds)
            if args.save_ratios:
                np.savez(f"{args.save_ratios}.{path.stem}.npz", **out)
        report(runtime.display_name(path), out)
    if args.imagenet:
        imagenet_domain(args.data, args.per_class)


if __name__ == "__main__":
    main()
