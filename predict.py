#!/usr/bin/env python3
"""Step 3 of 4: classify chest X-rays with a trained checkpoint, optionally with Grad-CAM.

    python predict.py --image examples/person1_virus_6.jpeg --gradcam
    python predict.py --dir scans/ --json                 # recursive, batched
    python predict.py --dir scans/ --model a.pth --model b.pth   # ensemble
    python predict.py --dir archive/ --resume outputs/predict_<ts>  # after a kill

Accepts JPEG, PNG (8/16-bit, RGBA, palette), BMP, TIFF and DICOM (.dcm, needs the
optional package pydicom). Each file goes through the same preprocessing as training
(cxr_common.load_image_array). Unreadable files are reported in one line and skipped;
the rest of the batch goes on.

Results are appended to <out>/predictions.csv (and predictions.jsonl with --json) as
they are computed, so a killed run loses nothing and --resume redoes nothing.
This is decision support, not a diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import cxr_common as cc  # noqa: E402
from gradcam import GradCAM, overlay  # noqa: E402

CSV_FIELDS = ["file", "prediction", "confidence", "prob_normal", "prob_pneumonia",
              "uncertain", "threshold", "temperature", "error"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Predict NORMAL / PNEUMONIA for chest X-rays (decision support only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--dir", action="append", default=[], help="a folder, searched recursively")
    p.add_argument("--model", action="append", default=[],
                   help=f"checkpoint; repeat to average an ensemble (default {cc.DEFAULT_MODEL})")
    p.add_argument("--out", help="output folder (default outputs/predict_<timestamp>)")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="continue an interrupted run in OUT_DIR, skipping files already done")
    p.add_argument("--json", action="store_true", help="also write predictions.jsonl")
    p.add_argument("--gradcam", action="store_true", help="write <name>_gradcam.png per image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="one line per image, not the block")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------
# Inputs: decoded in worker processes, errors carried as values, never raised.
# ---------------------------------------------------------------------------------


def collect_inputs(args) -> list[Path]:
    files = [Path(f) for f in args.image]
    for d in args.dir:
        if not Path(d).is_dir():
            print(f"skipped: {cc.display_name(d)}: not a folder", file=sys.stderr)
            continue
        files += cc.list_images(d)
    return files


class FileImages(Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, cc.load_image_array(self.paths[i], self.size), ""
        except cc.ImageReadError as e:
            return i, None, str(e)


def collate(items):
    return items  # a list of (index, array or None, error)


# ---------------------------------------------------------------------------------
# Output: the console block, the CSV / JSONL rows, the Grad-CAM figure.
# ---------------------------------------------------------------------------------


def result_row(name, p_pneu, cal, temperatures):
    pred = 1 if p_pneu >= cal["threshold"] else 0
    conf = p_pneu if pred == 1 else 1.0 - p_pneu
    uncertain = cal["band"][0] <= p_pneu < cal["band"][1]
    return {
        "file": name, "prediction": cc.CLASS_NAMES[pred], "confidence": round(conf, 6),
        "prob_normal": round(1.0 - p_pneu, 6), "prob_pneumonia": round(p_pneu, 6),
        "uncertain": uncertain, "threshold": cal["threshold"],
        "temperature": temperatures[0] if len(temperatures) == 1 else temperatures,
        "error": "",
    }


def print_block(row):
    verdict = row["prediction"]
    if row["uncertain"]:
        verdict += "  (UNCERTAIN - refer to a radiologist)"
    print(f"\nImage: {row['file']}")
    print(f"Prediction: {verdict}")
    print(f"Confidence: {row['confidence'] * 100:.2f}%")
    print("Class probabilities:")
    print(f"  NORMAL: {row['prob_normal'] * 100:.2f}%")
    print(f"  PNEUMONIA: {row['prob_pneumonia'] * 100:.2f}%")


def save_gradcam(path_out, gray, heat, row):
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"X-ray ({gray.shape[1]} px, as decoded)")
    axes[1].imshow(overlay(gray, heat))
    axes[1].set_title(f"Grad-CAM for {row['prediction']} ({row['confidence'] * 100:.1f}%)")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{row['file']}\n{cc.DISCLAIMER}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path_out, dpi=100)
    plt.close(fig)


def unused_name(folder: Path, stem: str, suffix: str) -> Path:
    """folder/stem.suffix, or stem_2.suffix, ... when two inputs share a name."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}{suffix}"
    return path


class ResultWriter:
    """Appends rows to predictions.csv (and .jsonl), flushing after every batch."""

    def __init__(self, out_dir: Path, json_lines: bool):
        self.csv_path = out_dir / "predictions.csv"
        new = not self.csv_path.exists()
        self.csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS)
        if new:
            self.csv.writeheader()
        self.jsonl = open(out_dir / "predictions.jsonl", "a", encoding="utf-8") \
            if json_lines else None

    def write(self, rows):
        for row in rows:
            flat = dict(row, temperature=json.dumps(row["temperature"]))
            self.csv.writerow(flat)
            if self.jsonl:
                self.jsonl.write(json.dumps(row) + "\n")
        self.csv_file.flush()
        if self.jsonl:
            self.jsonl.flush()

    def close(self):
        self.csv_file.close()
        if self.jsonl:
            self.jsonl.close()


def done_files(out_dir: Path) -> set[str]:
    """Files already in predictions.csv: the part of the run that --resume keeps.

    A row cut off by a kill is dropped, together with everything after it."""
    path = out_dir / "predictions.csv"
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    good = [ln for ln in lines if ln.endswith("\n")]
    path.write_text("".join(good), encoding="utf-8")  # drop a half-written last line
    with open(path, newline="", encoding="utf-8") as f:
        done = {row["file"] for row in csv.DictReader(f)}
    jsonl = out_dir / "predictions.jsonl"
    if jsonl.exists():  # keep the JSONL consistent with the CSV
        keep = []
        for ln in jsonl.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(ln)["file"] in done:
                    keep.append(ln + "\n")
            except (json.JSONDecodeError, KeyError):
                pass
        jsonl.write_text("".join(keep), encoding="utf-8")
    return done


# ---------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if not args.image and not args.dir:
        raise SystemExit("error: give --image FILE and/or --dir FOLDER (see --help)")
    cc.tune_cpu_allocator()  # ~2x faster CPU inference, see cxr_common
    device = cc.pick_device(args.device)
    model_paths = args.model or [cc.DEFAULT_MODEL]
    models, cal, size = cc.load_ensemble(model_paths, device)
    temperatures = cal["temperature"]

    if args.resume:
        out_dir = Path(args.resume)
        if not out_dir.is_dir():
            raise SystemExit(f"error: --resume: {out_dir} is not a folder")
    else:
        out_dir = Path(args.out) if args.out else Path("outputs") / f"predict_{cc.timestamp()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    done = done_files(out_dir)

    files = collect_inputs(args)
    todo = [p for p in files if cc.display_name(p) not in done]
    names = "ensemble of " + str(len(models)) if len(models) > 1 else str(model_paths[0])
    print(f"Model: {names} | temperature {', '.join(f'{t:.4f}' for t in temperatures)}"
          f" | threshold P(PNEUMONIA) >= {cal['threshold']:.3f} | uncertain band "
          f"[{cal['band'][0]:.3f}, {cal['band'][1]:.3f})")
    if done:
        print(f"Resuming: {len(files) - len(todo)} of {len(files)} files already done")
    print(cc.DISCLAIMER)

    writer = ResultWriter(out_dir, args.json)
    loader = DataLoader(FileImages(todo, size), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate)
    cam = GradCAM(models[0][0]) if args.gradcam else None
    n_ok, skipped = 0, []
    for items in loader:
        good = [(i, a) for i, a, _ in items if a is not None]
        rows = {}
        for i, _, err in items:
            if err:
                name = cc.display_name(todo[i])
                print(f"skipped: {name}: {err}", file=sys.stderr)
                skipped.append((name, err))
                rows[i] = dict.fromkeys(CSV_FIELDS, "") | {"file": name, "error": err,
                                                            "temperature": ""}
        if good:
            gray = np.stack([a for _, a in good])
            x = torch.from_numpy(gray).unsqueeze(1).to(device)
            probs = cc.pneumonia_probability(models, x, temperatures)
            for (i, g), p in zip(good, probs):
                row = result_row(cc.display_name(todo[i]), float(p), cal, temperatures)
                rows[i] = row
                if args.quiet:
                    print(f"{row['file']}: {row['prediction']} ({row['confidence']:.1%})"
                          + ("  UNCERTAIN" if row["uncertain"] else ""))
                else:
                    print_block(row)
                if cam is not None:
                    x1 = torch.from_numpy(g)[None, None].to(device)
                    heat, _, _ = cam(cc.model_input(x1, cc.intensity_of(models[0][1])))
                    png = unused_name(out_dir, f"{Path(todo[i]).stem}_gradcam", ".png")
                    save_gradcam(png, g, heat, row)
                    print(f"Grad-CAM: {cc.display_name(png)}")
                n_ok += 1
        writer.write([rows[i] for i in sorted(rows)])
    writer.close()

    print(f"\nPredicted {n_ok} image(s); results in {out_dir / 'predictions.csv'}")
    if skipped:
        print(f"Skipped {len(skipped)} file(s):")
        for name, err in skipped:
            print(f"  {name}: {err}")
    print(cc.DISCLAIMER)
    if n_ok == 0 and not done:
        print("error: no image could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
