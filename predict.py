#!/usr/bin/env python3
"""Step 3 of 4: classify chest X-rays with a trained checkpoint, optionally with Grad-CAM.

    python predict.py --image examples/person1_virus_6.jpeg --gradcam
    python predict.py --dir scans/ --json                 # recursive, batched
    python predict.py --dir scans/ --model a.pth --model b.pth   # ensemble
    python predict.py --dir archive/ --resume outputs/predict_<ts>  # after a kill

Accepts JPEG, PNG (8/16-bit, RGBA, palette), BMP, TIFF and DICOM (.dcm, needs the
optional package pydicom). Each file goes through the same preprocessing as training
(cxr.dataset.load_image_array). Unreadable files are reported in one line and skipped;
the rest of the batch goes on.

Results are appended to <out>/predictions.csv (and predictions.jsonl with --json) as
they are computed, so a killed run loses nothing and --resume redoes nothing but the
files that failed. One run at a time may use a results folder. File names are printed
and stored escaped (cxr.runtime.display_name); CSV cells cannot act as spreadsheet formulas.
This is decision support, not a diagnosis.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no folder lock
    fcntl = None
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from cxr import checkpoints, dataset, imagefiles, network, runtime, scan, scoring, siteshift  # noqa: E402
from gradcam import GradCAM, overlay  # noqa: E402

CSV_FIELDS = ["file", "prediction", "confidence", "prob_normal", "prob_pneumonia",
              "uncertain", "threshold", "temperature", "error", "model", "resolved_path",
              "outside", "typicality"]
OUTSIDE = "OUTSIDE"  # the prediction column of an image unlike the training data: no verdict
MANY_OUTSIDE = 0.10  # above this share of a batch flagged, one warning line
MANIFEST = "run.json"  # what made this folder's rows: --resume must match it
MAX_MANIFEST_BYTES = 1 << 20
LOCK = ".lock"  # held by the run using the folder (hidden: folder scans skip it)
MAX_STEM_BYTES = 200  # of a Grad-CAM file name, leaving room for _gradcam_NN.png in 255


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Predict NORMAL / PNEUMONIA for chest X-rays (decision support only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--dir", action="append", default=[], help="a folder, searched recursively")
    p.add_argument("--model", action="append", default=[],
                   help=f"checkpoint; repeat to average an ensemble (default {checkpoints.DEFAULT_MODEL})")
    p.add_argument("--out", type=runtime.folder_or_new, default="outputs",
                   help="parent folder: each run writes to a new OUT/predict_<timestamp>/")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="continue an interrupted run in OUT_DIR, skipping files already done")
    p.add_argument("--calibration", metavar="FILE",
                   help="an ensemble's calibration fitted on a shared labelled set "
                        "(visualize_results.py --save-calibrated FILE.json)")
    p.add_argument("--json", action="store_true", help="also write predictions.jsonl")
    p.add_argument("--gradcam", action="store_true", help="write <name>_gradcam.png per image")
    p.add_argument("--batch-size", type=runtime.positive_int, default=32)
    p.add_argument("--workers", type=runtime.nonnegative_int, default=1,
                   help="decoding worker processes (0: decode in the main process)")
    p.add_argument("--device", default="auto", type=runtime.device_name,
                   help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="one line per image, not the block")
    p.add_argument("--adapt", action="store_true",
                   help="label-free adaptation (transductive): re-estimate the BatchNorm "
                        "statistics on all the images given (AdaBN) before predicting; the "
                        "out-of-distribution flag still uses the model as trained")
    args = p.parse_args(argv)
    return args


# ---------------------------------------------------------------------------------
# Inputs: decoded in worker processes, errors carried as values, never raised.
# ---------------------------------------------------------------------------------


def collect_inputs(args) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to predict (each once, by resolved path) and the ones not read, with why.
    The files of the results folder being resumed are never inputs."""
    files, not_read = [Path(f) for f in args.image], []
    results = Path(args.resume).resolve() if args.resume else None
    for d in args.dir:
        if not Path(d).is_dir():
            not_read.append((Path(d), "not a folder"))
            continue
        images, others = scan.scan_folder(d)
        files += [f for f in images if not inside(f, results)]
        not_read += [(f, r) for f, r in others if not inside(f, results)]
    unique, seen, merged = [], {}, []
    for f in files:
        key = resolved(f)
        if key not in seen:
            seen[key] = f
            unique.append(f)
        else:
            merged.append((f, seen[key]))
    if merged:
        f, first = merged[0]
        print(f"note: {len(merged)} path(s) lead to a file listed already (links, or given twice), "
              f"each file is predicted once: e.g. {runtime.display_name(f)} is "
              f"{runtime.display_name(first)}")
    return unique, not_read


def inside(path, folder) -> bool:
    """Whether path lies in folder (resolved; False when folder is None)."""
    try:
        return folder is not None and folder in Path(path).resolve().parents
    except (OSError, RuntimeError):  # a symlink loop
        return False


def resolved(path) -> str:
    """The key a file is known by across runs: its absolute, resolved path."""
    try:
        return runtime.display_name(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return runtime.display_name(Path(path).absolute())


class FileImages(Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        array, error = dataset.try_load_image_array(self.paths[i], self.size)
        return i, array, error


def collate(items):
    return items  # a list of (index, array or None, error)


def adapted_members(members, files, size, batch_size):
    """--adapt: each member with BatchNorm statistics re-estimated on all readable inputs."""
    arrays = [a for a, _ in (dataset.try_load_image_array(f, size) for f in files) if a is not None]
    if not arrays:
        return members
    x = np.stack(arrays)
    print(f"--adapt: BatchNorm statistics re-estimated on {len(x)} unlabeled image(s) "
          "(transductive; the flag uses the model as trained)")
    return [(siteshift.adapt_batchnorm(m, x, network.intensity_of(meta), batch_size), meta)
            for m, meta in members]


# ---------------------------------------------------------------------------------
# Output: the console block, the CSV / JSONL rows, the Grad-CAM figure.
# ---------------------------------------------------------------------------------


def result_row(path, p_pneu, cal, model_id, flag=None):
    """A verdict row; an image outside the training distribution (flag: (outside,
    typicality / cut) from siteshift.outside_distribution) gets no verdict and no confidence,
    only its probabilities for the record."""
    pred, conf = scoring.decide(p_pneu, cal["threshold"])
    lo, hi = cal["uncertain_band"]
    outside, typicality = (bool(flag[0]), flag[1]) if flag is not None else (False, None)
    return {
        "file": runtime.display_name(path),
        "prediction": OUTSIDE if outside else network.CLASS_NAMES[int(pred)],
        "confidence": "" if outside else round(float(conf), 6),
        "prob_normal": round(1.0 - p_pneu, 6),
        "prob_pneumonia": round(p_pneu, 6), "uncertain": bool(lo <= p_pneu < hi),
        "threshold": cal["threshold"],
        "temperature": cal["temperatures"],  # one per ensemble member
        "error": "", "model": model_id, "resolved_path": resolved(path),
        "outside": outside if typicality is not None else "",
        "typicality": "" if typicality is None else round(float(typicality), 4),
    }


def error_row(path, reason, model_id):
    return dict.fromkeys(CSV_FIELDS, "") | {
        "file": runtime.display_name(path), "error": reason, "model": model_id,
        "resolved_path": resolved(path)}


def referral(row, cal) -> str:
    """Whether the model's own rules send this image to a radiologist first, and why."""
    lo, hi = cal["uncertain_band"]
    if hi <= lo:
        return "no rule of this model's (it has no uncertain band)"
    if row["uncertain"]:
        return (f"YES - P(PNEUMONIA) is inside the uncertain band {lo:.1%} to {hi:.1%}, "
                "chosen on labelled films held out from training as where this model's calls are unreliable")
    return f"not by this model's rules (outside its uncertain band {lo:.1%} to {hi:.1%})"


def print_block(row, cal):
    print(f"\nImage: {row['file']}")
    if row["prediction"] == OUTSIDE:
        print(f"Outside what the model was trained on: refer. No verdict (typicality "
              f"{row['typicality']:.2f} x the cut that {1 - siteshift.TYPICALITY_LEVEL:.0%} of validation "
              "films exceed).")
        return
    print(f"P(PNEUMONIA), calibrated: {row['prob_pneumonia']:.1%}   (decision: PNEUMONIA at "
          f">= {row['threshold']:.1%})")
    print(f"Prediction: {row['prediction']}")
    print(f"Refer first: {referral(row, cal)}")


def print_line(row):
    if row["prediction"] == OUTSIDE:
        print(f"{row['file']}: REFER: outside what the model was trained on")
        return
    print(f"{row['file']}: {row['prediction']} (P(PNEUMONIA) {row['prob_pneumonia']:.1%})"
          + ("  REFER: uncertain" if row["uncertain"] else ""))


def save_gradcam(path_out, gray, heat, row, explained):
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"X-ray ({gray.shape[1]} px, as decoded)")
    axes[1].imshow(overlay(gray, heat))
    axes[1].set_title(f"Grad-CAM for {row['prediction']} ({row['confidence'] * 100:.1f}%)"
                      + (f"\n{explained}" if explained else ""), fontsize=10, parse_math=False)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{row['file']}\n{network.DISCLAIMER}", fontsize=8, parse_math=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path_out, dpi=100)
    plt.close(fig)


def gradcam_path(folder: Path, image) -> Path:
    """A new file folder/<image name>_gradcam.png: unprintable characters of the name
    become _, a long name is cut to fit the file-name limit, and _2, _3, ... is added
    when two inputs come to the same name."""
    stem = "".join(c if c.isprintable() else "_" for c in Path(image).stem)
    stem = stem.encode("utf-8")[:MAX_STEM_BYTES].decode("utf-8", "ignore")
    path, n = folder / f"{stem}_gradcam.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_gradcam_{n}.png"
    return path


# ---------------------------------------------------------------------------------
# The output folder: predictions.csv (and .jsonl), appended batch by batch, and a
# manifest of what made them, so that --resume continues only the same run.
# ---------------------------------------------------------------------------------


def run_manifest(model_paths, members, cal, json_lines, adapt=False) -> dict:
    hashes = [runtime.sha256_file(p) for p in model_paths]
    model_id = hashlib.sha256("".join(hashes).encode()).hexdigest()[:12]
    return {
        "model_id": model_id,
        "members": [{"path": str(p), "sha256": h,
                     "preprocessing": m["preprocessing"]} for p, h, (_, m)
                    in zip(model_paths, hashes, members)],
        "calibration": cal,
        "adapt": adapt,
        "json": json_lines,
    }


def check_resumable(out_dir: Path, manifest: dict) -> dict:
    """The manifest of the run in out_dir; exits if this invocation would mix results."""
    path, where = out_dir / MANIFEST, runtime.display_name(out_dir)
    if not path.is_file():
        raise SystemExit(f"error: --resume: {where} has no {MANIFEST}, so it cannot be "
                         "checked that the same model made its rows; start a new run")
    try:
        with imagefiles.open_regular(path, MAX_MANIFEST_BYTES, ValueError) as f:
            old = json.loads(f.read().decode("utf-8"))
        if not isinstance(old, dict) or not isinstance(old.get("members"), list) or not all(
                isinstance(m, dict) and {"sha256", "preprocessing"} <= m.keys()
                for m in old["members"]):
            raise ValueError("not the manifest this script writes")
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise SystemExit(f"error: --resume: {runtime.display_name(path)} is damaged ({e}); "
                         f"start a new run") from None
    for key, what in (("model_id", "model file(s)"), ("calibration", "calibration"),
                      ("adapt", "--adapt setting"),
                      ("members", "model files or preprocessing")):
        a, b = old.get(key, False if key == "adapt" else None), manifest[key]
        if key == "members":
            a = [(m["sha256"], m["preprocessing"]) for m in a or []]
            b = [(m["sha256"], m["preprocessing"]) for m in b]
        if a != b:
            raise SystemExit(f"error: --resume: the {what} differ from the run in {where} "
                             f"(see its {MANIFEST}); give the same --model, or start a new run")
    return old


def lock_folder(out_dir: Path) -> None:
    """Hold a lock on out_dir until this process ends; refuse (one line) when another
    run holds it, e.g. the same --resume started twice, which would write every row twice.
    (No lock where the platform has no fcntl.)"""
    if fcntl is None:
        return
    try:
        fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(out_dir / LOCK, e, "nothing was predicted") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"error: another run is using {runtime.display_name(out_dir)}; wait for it "
                         "to end (then --resume it), or start a new run") from None
    # the descriptor stays open (and the lock held) until the process exits


def write_error(path, e: OSError, saved: str) -> SystemExit:
    """The one-line exit for a failed write (disk full, folder gone, ...)."""
    return SystemExit(f"error: cannot write {runtime.display_name(path)} ({e.strerror or e}); {saved}")


class ResultWriter:
    """Appends rows to predictions.csv (and .jsonl): each batch is written with one
    write call per file, JSONL first, so a kill leaves at most one cut-off record; a
    failed write (disk full) is cut back off. CSV cells go through runtime.csv_cell; the
    JSONL keeps the values as they are."""

    def __init__(self, out_dir: Path, json_lines: bool):
        self.csv_path = out_dir / "predictions.csv"
        self.jsonl_path = out_dir / "predictions.jsonl" if json_lines else None
        self.saved = 0  # rows written by this run
        if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
            self._append(self.csv_path, self._csv_text([dict(zip(CSV_FIELDS, CSV_FIELDS))]))

    @staticmethod
    def _csv_text(rows) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\r\n")
        for row in rows:
            w.writerow({k: runtime.csv_cell(v) for k, v in row.items()})
        return buf.getvalue()

    @staticmethod
    def _append(path: Path, text: str):
        """Append text whole, or raise OSError (naming path) and leave the file as it was."""
        data = text.encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise OSError(e.errno, e.strerror, str(path)) from None
        finally:
            os.close(fd)

    def write(self, rows):
        if self.jsonl_path:
            self._append(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
        flat = [dict(r, temperature=json.dumps(r["temperature"]) if r["temperature"] != "" else "")
                for r in rows]
        self._append(self.csv_path, self._csv_text(flat))
        self.saved += len(rows)


def complete_csv_rows(path: Path) -> list[dict]:
    """The complete data rows of predictions.csv; a record cut off by a kill is dropped."""
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8", "replace")
    records = []
    try:
        for rec in csv.reader(io.StringIO(text, newline="")):
            records.append(rec)
    except csv.Error:  # a quoted field cut off at the end of the file
        pass
    else:
        if records and not text.endswith("\r\n"):
            records.pop()  # the last record has no line end: cut off
    if records and records[0] == CSV_FIELDS:
        records = records[1:]
    return [dict(zip(CSV_FIELDS, map(runtime.csv_value, r))) for r in records
            if len(r) == len(CSV_FIELDS)]


def complete_jsonl_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().decode("utf-8", "replace").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "resolved_path" in row:
            rows.append(row)
    return rows


def one_row_per_file(rows, retry: set[str]) -> dict[str, dict]:
    """Each file's first result row, else its first error row; the errors of files in
    retry (given again: a film still being copied may be readable now) are dropped."""
    kept = {}
    for r in rows:
        key = r["resolved_path"]
        if not r.get("error"):
            if key not in kept or kept[key].get("error"):
                kept[key] = r
        elif key not in retry and key not in kept:
            kept[key] = r
    return kept


def done_files(out_dir: Path, json_lines: bool, retry: set[str]) -> set[str]:
    """Resolved paths done: one row per file in the CSV (and the JSONL, when written),
    see one_row_per_file. Both files are rewritten to exactly those rows, so after any
    kill they agree and hold each file once; everything else is (re)done."""
    csv_rows = one_row_per_file(complete_csv_rows(out_dir / "predictions.csv"), retry)
    done = set(csv_rows)
    if json_lines:
        jsonl_rows = one_row_per_file(complete_jsonl_rows(out_dir / "predictions.jsonl"), retry)
        done &= set(jsonl_rows)
    texts = {"predictions.csv": ResultWriter._csv_text(
        [dict(zip(CSV_FIELDS, CSV_FIELDS)), *(r for k, r in csv_rows.items() if k in done)])}
    if json_lines:
        texts["predictions.jsonl"] = "".join(json.dumps(r) + "\n"
                                             for k, r in jsonl_rows.items() if k in done)
    for name, text in texts.items():
        try:
            runtime.write_atomic(out_dir / name, lambda f: f.write(text.encode("utf-8")))  # noqa: B023
        except OSError as e:
            raise write_error(out_dir / name, e, "its rows are kept as they were") from None
    return done


# ---------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------


def check_gradcam_folder(args) -> None:
    """--gradcam writes PNGs: refuse a results folder inside an input folder or a labelled
    data set, whose later scans would read them as films."""
    if not args.gradcam:
        return
    out = Path(args.resume or args.out).resolve()
    inputs = [d for d in map(Path, args.dir) if d.is_dir()]
    where = next((f"the input folder {runtime.display_name(d)}" for d in inputs
                  if out == d.resolve() or d.resolve() in out.parents), None)
    data = dataset.labelled_data_folder(out)
    if where is None and data is not None:
        where = f"the labelled data set folder {runtime.display_name(data)}"
    if where:
        raise SystemExit(f"error: --gradcam: the results folder {runtime.display_name(out)} is inside "
                         f"{where}, and its later scans would read the Grad-CAM PNGs as films; "
                         "give an --out outside it")


def open_output(args, manifest, retry: set[str]) -> tuple[Path, set[str], bool]:
    """The output folder (new, or the one resumed, locked), the files done (the errors of
    those in retry are redone), and whether JSONL is written."""
    if args.resume:
        out_dir = Path(args.resume)
        if not out_dir.is_dir():
            raise SystemExit(f"error: --resume: {runtime.display_name(out_dir)} is not a folder")
        lock_folder(out_dir)
        old = check_resumable(out_dir, manifest)
        json_lines = bool(old.get("json"))
        if args.json != json_lines:
            print(f"note: the run being resumed was started {'with' if json_lines else 'without'}"
                  " --json; continuing it that way")
        return out_dir, done_files(out_dir, json_lines, retry), json_lines
    try:
        out_dir = runtime.unique_dir(args.out, f"predict_{runtime.timestamp()}")
    except OSError as e:
        raise SystemExit(f"error: cannot make a results folder in {runtime.display_name(args.out)} "
                         f"({e.strerror or e})") from None
    lock_folder(out_dir)
    manifest = dict(manifest, json=args.json, command=" ".join(sys.argv))
    text = json.dumps(manifest, indent=2)
    try:
        runtime.write_atomic(out_dir / MANIFEST, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise write_error(out_dir / MANIFEST, e, "nothing was predicted") from None
    return out_dir, set(), args.json


def score_batch(items, todo, members, scorers, cal, model_id) -> dict[int, dict]:
    """The rows of one batch of (index, array or None, error), by index."""
    good = [(i, a) for i, a, _ in items if a is not None]
    rows = {i: error_row(todo[i], err, model_id) for i, a, err in items if a is None}
    if not good:
        return rows
    x = np.stack([a for _, a in good])
    logits, feats = network.member_logits(members, x, len(good), features=True)
    flags = siteshift.outside_distribution(members, feats)
    if scorers is not members:
        logits = network.member_logits(scorers, x, len(good))
    probs = network.mean_probability(logits, cal["temperatures"], cal.get("ensemble_temperature", 1))
    for k, ((i, _), p) in enumerate(zip(good, probs)):
        if not np.isfinite(p):
            rows[i] = error_row(todo[i], "the model's output is not a finite number "
                                "(NaN or infinity): no verdict", model_id)
        else:
            rows[i] = result_row(todo[i], float(p), cal, model_id,
                                 None if flags is None else (flags[0][k], flags[1][k]))
    return rows


def main(argv=None):
    runtime.printable_console()
    args = parse_args(argv)
    if not args.image and not args.dir:
        raise SystemExit("error: give --image FILE and/or --dir FOLDER (see --help)")
    check_gradcam_folder(args)
    device = runtime.pick_device(args.device)  # on the CPU, with its allocator tuned (~2x faster)
    with runtime.exit_on(checkpoints.CheckpointError):
        members, cal, size = checkpoints.load_ensemble(args.model, device, args.calibration)
    model_paths = args.model or [checkpoints.DEFAULT_MODEL]
    temperatures = cal["temperatures"]
    manifest = run_manifest(model_paths, members, cal, args.json, args.adapt)
    model_id = manifest["model_id"]

    files, not_read = collect_inputs(args)
    given = {resolved(p) for p in [*files, *(p for p, _ in not_read)]}
    out_dir, done, json_lines = open_output(args, manifest, retry=given)
    todo = [p for p in files if resolved(p) not in done]
    not_read = [(p, r) for p, r in not_read if resolved(p) not in done]
    names = ("ensemble of " + str(len(members)) if len(members) > 1
             else runtime.display_name(model_paths[0]))
    print(f"Model: {names} (id {model_id}) | temperature "
          f"{', '.join(f'{t:.4f}' for t in temperatures)}"
          f" | threshold P(PNEUMONIA) >= {cal['threshold']:.3f} | uncertain band "
          f"[{cal['uncertain_band'][0]:.3f}, {cal['uncertain_band'][1]:.3f})")
    if done:
        print(f"Resuming: {len(files) - len(todo)} of {len(files)} files already done")
    if cal.get("shared") is False:
        print("note: the ensemble's threshold and band are the means of its members' own, each "
              "fitted on a different split; fit one on a shared labelled set with "
              "visualize_results.py --recalibrate K --save-calibrated FILE.json")
    if any(getattr(m, "typicality", None) is None for m, _ in members):
        print("note: this model has no typicality statistics, so images unlike its training "
              "data are not flagged (add them: python train_cxray.py --typicality-for MODEL)")
    print(network.DISCLAIMER)
    scorers = members
    if args.adapt:  # transductive: every image given, also those done before a --resume
        scorers = adapted_members(members, files, size, args.batch_size)

    writer = None

    def save(rows):  # rows reach the disk before anything about them is printed
        nonlocal writer
        try:
            writer = writer or ResultWriter(out_dir, json_lines)
            writer.write(rows)
        except OSError as e:
            saved = writer.saved if writer else 0
            raise write_error(e.filename or out_dir, e, (
                f"{saved} row(s) of this run were saved before it and are kept; free some "
                f"space and continue with --resume {runtime.display_name(out_dir)}")) from None

    save([error_row(p, r, model_id) for p, r in not_read])
    skipped = [(runtime.display_name(p), reason) for p, reason in not_read]
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    loader = DataLoader(FileImages(todo, size), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate,
                        worker_init_fn=runtime.die_with_parent)
    cam = GradCAM(members[0][0]) if args.gradcam else None
    explained = (f"map of member 1 of {len(members)} "
                 f"({runtime.display_name(Path(model_paths[0]).name)})" if len(members) > 1 else "")
    n_ok = n_outside = 0
    for items in loader:
        rows = score_batch(items, todo, members, scorers, cal, model_id)
        save([rows[i] for i in sorted(rows)])
        arrays = {i: a for i, a, _ in items}
        for i in sorted(rows):
            row = rows[i]
            if row["error"]:
                print(f"skipped: {row['file']}: {row['error']}", file=sys.stderr)
                skipped.append((row["file"], row["error"]))
                continue
            n_ok += 1
            n_outside += row["outside"] is True
            print_line(row) if args.quiet else print_block(row, cal)
            if cam is not None and row["prediction"] != OUTSIDE:
                x1 = torch.from_numpy(arrays[i])[None, None].to(device)
                reported = network.CLASS_NAMES.index(row["prediction"])
                heat, _, _ = cam(network.model_input(x1, network.intensity_of(members[0][1])),
                                 class_idx=reported)
                try:
                    png = gradcam_path(out_dir, todo[i])
                    save_gradcam(png, arrays[i], heat, row, explained)
                    print(f"Grad-CAM: {runtime.display_name(png)}")
                except OSError as e:  # the row is saved; only its picture is missing
                    print(f"warning: the Grad-CAM of {row['file']} was not saved "
                          f"({e.strerror or e})", file=sys.stderr)

    where = runtime.display_name(out_dir / "predictions.csv")
    print(f"\nPredicted {n_ok} image(s); results in {where}")
    if n_outside:
        share = n_outside / n_ok
        print(f"{'warning: ' if share > MANY_OUTSIDE else ''}{n_outside} of {n_ok} image(s) "
              f"({share:.0%}) are outside what the model was trained on (on validation: "
              f"{1 - siteshift.TYPICALITY_LEVEL:.0%})"
              + ("; are these films from another hospital or not chest X-rays? Its figures do "
                 "not apply to them: see visualize_results.py --recalibrate"
                 if share > MANY_OUTSIDE else ""))
    if skipped:
        print(f"Skipped {len(skipped)} file(s):")
        for name, err in skipped:
            print(f"  {name}: {err}")
    print(network.DISCLAIMER)
    if n_ok == 0 and not done:
        print("error: no image could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
