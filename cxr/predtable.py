"""The prediction tables: what predict.py writes to its results folder and how --resume
reads it back, and the evaluation table of visualize_results.py.

A predict results folder holds predictions.csv (and predictions.jsonl with --json), one
row per file with the columns COLUMNS, appended batch by batch as rows are computed; a
manifest, run.json, of what made them (model files, preprocessing, calibration, --adapt,
--json and COLUMNS), so that --resume continues only the same run; and a lock, so that
one run at a time writes there. A kill loses at most a cut-off last record, which
--resume drops and redoes. CSV cells go through runtime.csv_cell, so none can act as a
spreadsheet formula; the JSONL keeps the values as they are.

Refusals are TableErrors, one line each; the script turns them into its exit.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no folder lock
    fcntl = None

from . import imagefiles, network, runtime, siteshift
from .intake import resolved

COLUMNS = ["file", "prediction", "confidence", "prob_normal", "prob_pneumonia",
           "refer", "reason", "threshold", "temperature", "error", "model", "resolved_path",
           "atypical", "outside", "typicality"]
"""refer: whether the film goes to a radiologist first; reason: why, in plain words (below
the referral rule's confidence, atypical, not like a chest X-ray), empty when answered.
typicality: the film's typicality / the model's cut (the highest over an ensemble's
members); atypical: above 1, the verdict is given with a warning; outside: atypical and
unlike a chest film (imagefiles.unlike_a_film), not a radiograph: no verdict. All three
empty for a model without typicality statistics."""
OUTSIDE = "OUTSIDE"  # the prediction column of an image that is not like a chest film: no verdict
CSV_NAME, JSONL_NAME = "predictions.csv", "predictions.jsonl"
MANIFEST = "run.json"  # what made this folder's rows: --resume must match it
MAX_MANIFEST_BYTES = 1 << 20
LOCK = ".lock"  # held by the run using the folder (hidden: folder scans skip it)


class TableError(Exception):
    """A results folder that cannot be used or written; the message is one line."""


# --- rows ------------------------------------------------------------------------------


def result_row(path, p_pneu, cal, model_id, flag=None) -> dict:
    """A verdict row. flag: (atypical, typicality / cut) from siteshift.outside_distribution
    and whether the image is unlike a chest film (imagefiles.unlike_a_film), or None. An
    atypical image gets its verdict, marked; one that is atypical and unlike a chest film
    gets no verdict and no confidence, only its probabilities for the record."""
    pred, conf = cal.decide(p_pneu)
    atypical, typicality, unlike = ((bool(flag[0]), float(flag[1]), bool(flag[2]))
                                    if flag is not None else (False, None, False))
    outside = atypical and unlike
    reasons = [("not like a chest X-ray (atypical for the training data, and unlike a chest film "
                "in layout or fine detail)") if outside else
               (f"the film is unlike those the model learnt from (typicality {typicality:.2f} x the "
                f"cut that {1 - siteshift.TYPICALITY_LEVEL:.0%} of validation films exceed): its "
                "figures may not hold for it") if atypical else "",
               "" if outside or not cal.referred(p_pneu) else cal.why_referred(p_pneu)]
    reason = "; ".join(r for r in reasons if r)
    return {
        "file": runtime.display_name(path),
        "prediction": OUTSIDE if outside else network.CLASS_NAMES[int(pred)],
        "confidence": "" if outside else round(float(conf), 6),
        "prob_normal": round(1.0 - p_pneu, 6),
        "prob_pneumonia": round(p_pneu, 6), "refer": bool(reason), "reason": reason,
        **cal.columns(),  # threshold, and a temperature per member
        "error": "", "model": model_id, "resolved_path": resolved(path),
        "atypical": atypical if typicality is not None else "",
        "outside": outside if typicality is not None else "",
        "typicality": "" if typicality is None else round(typicality, 4),
    }


def error_row(path, reason, model_id) -> dict:
    """The row of a file with no result: why, in the error column."""
    return dict.fromkeys(COLUMNS, "") | {
        "file": runtime.display_name(path), "error": reason, "model": model_id,
        "resolved_path": resolved(path)}


def csv_text(rows, columns=COLUMNS) -> str:
    """CSV records (\\r\\n line ends) of rows, every cell through runtime.csv_cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\r\n")
    for row in rows:
        w.writerow({k: runtime.csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def write_error(path, e: OSError, saved: str) -> TableError:
    """The one-line refusal for a failed write (disk full, folder gone, ...)."""
    return TableError(f"cannot write {runtime.display_name(path)} ({e.strerror or e}); {saved}")


class ResultWriter:
    """Appends rows to predictions.csv (and .jsonl): each batch is written with one
    write call per file, JSONL first, so a kill leaves at most one cut-off record; a
    failed write (disk full) is cut back off, and save() refuses in one line saying how
    to continue."""

    def __init__(self, out_dir: Path, json_lines: bool):
        self.out_dir = Path(out_dir)
        self.csv_path = self.out_dir / CSV_NAME
        self.jsonl_path = self.out_dir / JSONL_NAME if json_lines else None
        self.saved = 0  # rows written by this run
        self.started = False  # the CSV header is there

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
        """Append rows (dicts with COLUMNS), or raise OSError."""
        if not self.started:
            if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
                self._append(self.csv_path, csv_text([dict(zip(COLUMNS, COLUMNS))]))
            self.started = True
        if self.jsonl_path:
            self._append(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
        flat = [dict(r, temperature=json.dumps(r["temperature"]) if r["temperature"] != "" else "")
                for r in rows]
        self._append(self.csv_path, csv_text(flat))
        self.saved += len(rows)

    def save(self, rows):
        """write(rows); a failed write is a TableError telling how to continue."""
        try:
            self.write(rows)
        except OSError as e:
            raise write_error(e.filename or self.out_dir, e, (
                f"{self.saved} row(s) of this run were saved before it and are kept; free some "
                f"space and continue with --resume {runtime.display_name(self.out_dir)}")) from None


# --- reading rows back on --resume -----------------------------------------------------


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
    if records and records[0] == COLUMNS:
        records = records[1:]
    return [dict(zip(COLUMNS, map(runtime.csv_value, r))) for r in records
            if len(r) == len(COLUMNS)]


def complete_jsonl_rows(path: Path) -> list[dict]:
    """The complete records of predictions.jsonl; a line cut off by a kill is dropped."""
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
    csv_rows = one_row_per_file(complete_csv_rows(out_dir / CSV_NAME), retry)
    done = set(csv_rows)
    if json_lines:
        jsonl_rows = one_row_per_file(complete_jsonl_rows(out_dir / JSONL_NAME), retry)
        done &= set(jsonl_rows)
    texts = {CSV_NAME: csv_text(
        [dict(zip(COLUMNS, COLUMNS)), *(r for k, r in csv_rows.items() if k in done)])}
    if json_lines:
        texts[JSONL_NAME] = "".join(json.dumps(r) + "\n" for k, r in jsonl_rows.items() if k in done)
    for name, text in texts.items():
        try:
            runtime.write_atomic(out_dir / name, lambda f: f.write(text.encode("utf-8")))  # noqa: B023
        except OSError as e:
            raise write_error(out_dir / name, e, "its rows are kept as they were") from None
    return done


# --- the manifest and the folder ---------------------------------------------------------


def run_manifest(model_path, members, cal, json_lines, adapt=False) -> dict:
    """What makes a run's rows: the model file (and its id), its members' preprocessing,
    calibration, --adapt, --json and the table's columns."""
    digest = runtime.sha256_file(model_path)
    model_id = hashlib.sha256(digest.encode()).hexdigest()[:12]
    return {
        "model_id": model_id,
        "members": [{"path": str(model_path), "sha256": digest, "preprocessing": m["preprocessing"]}
                    for _, m in members],  # an ensemble file's members: one entry each
        "calibration": cal.summary(),
        "adapt": adapt,
        "json": json_lines,
        "columns": COLUMNS,
    }


def recorded_columns(out_dir: Path, old: dict):
    """The columns of the run in out_dir: its manifest's list; a manifest with none (written
    before they were recorded) stands for the header of its predictions.csv, if any."""
    if "columns" in old:
        return old["columns"]
    path = out_dir / CSV_NAME
    if not path.is_file():
        return COLUMNS
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        line = f.readline()
    return next(csv.reader([line[:-2]])) if line.endswith("\r\n") else COLUMNS  # else none whole


def check_resumable(out_dir: Path, manifest: dict) -> dict:
    """The manifest of the run in out_dir; a TableError if this run would mix results."""
    path, where = out_dir / MANIFEST, runtime.display_name(out_dir)
    if not path.is_file():
        raise TableError(f"--resume: {where} has no {MANIFEST}, so it cannot be "
                         "checked that the same model made its rows; start a new run")
    try:
        with imagefiles.open_regular(path, MAX_MANIFEST_BYTES, ValueError) as f:
            old = json.loads(f.read().decode("utf-8"))
        if not isinstance(old, dict) or not isinstance(old.get("members"), list) or not all(
                isinstance(m, dict) and {"sha256", "preprocessing"} <= m.keys()
                for m in old["members"]):
            raise ValueError("not the manifest this script writes")
        if "columns" in old and not (isinstance(old["columns"], list)
                                     and all(isinstance(c, str) for c in old["columns"])):
            raise ValueError("its columns are not a list of names")
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise TableError(f"--resume: {runtime.display_name(path)} is damaged ({e}); "
                         f"start a new run") from None
    for key, what in (("model_id", "model file(s)"), ("calibration", "calibration"),
                      ("adapt", "--adapt setting"),
                      ("members", "model files or preprocessing")):
        a, b = old.get(key, False if key == "adapt" else None), manifest[key]
        if key == "members":
            a = [(m["sha256"], m["preprocessing"]) for m in a or []]
            b = [(m["sha256"], m["preprocessing"]) for m in b]
        if a != b:
            raise TableError(f"--resume: the {what} differ from the run in {where} "
                             f"(see its {MANIFEST}); give the same --model, or start a new run")
    if (columns := recorded_columns(out_dir, old)) != manifest["columns"]:
        lost = [c for c in manifest["columns"] if c not in columns]
        new = [c for c in columns if c not in manifest["columns"]]
        how = "; ".join([*([f"without {', '.join(lost)}"] if lost else []),
                         *([f"with {', '.join(new)}"] if new else [])]) or "in another order"
        raise TableError(f"--resume: the rows in {where} have other columns than this predict.py "
                         f"writes ({runtime.display_name(how)}; see its {MANIFEST}); start a new run")
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
        raise TableError(f"another run is using {runtime.display_name(out_dir)}; wait for it "
                         "to end (then --resume it), or start a new run") from None
    # the descriptor stays open (and the lock held) until the process exits


def new_run_folder(parent, manifest: dict) -> Path:
    """A new folder parent/predict_<timestamp>, locked, with the manifest written."""
    try:
        out_dir = runtime.unique_dir(parent, f"predict_{runtime.timestamp()}")
    except OSError as e:
        raise TableError(f"cannot make a results folder in {runtime.display_name(parent)} "
                         f"({e.strerror or e})") from None
    lock_folder(out_dir)
    text = json.dumps(manifest, indent=2)
    try:
        runtime.write_atomic(out_dir / MANIFEST, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise write_error(out_dir / MANIFEST, e, "nothing was predicted") from None
    return out_dir


def resume_run_folder(out_dir: Path, manifest: dict, retry: set[str]) -> tuple[set[str], bool]:
    """Lock the folder of an earlier run, check that this run would continue it (see
    check_resumable) and bring its rows to one per file: the files done (the errors of
    those in retry are redone) and whether that run writes JSONL."""
    if not out_dir.is_dir():
        raise TableError(f"--resume: {runtime.display_name(out_dir)} is not a folder")
    lock_folder(out_dir)
    json_lines = bool(check_resumable(out_dir, manifest).get("json"))
    return done_files(out_dir, json_lines, retry), json_lines


# --- the evaluation table of visualize_results.py ----------------------------------------

EVALUATION_COLUMNS = ["file", "label", "prediction", "prob_pneumonia", "confidence", "correct",
                      "referred"]
"""file: the image (runtime.display_name); label, prediction: class names; prob_pneumonia:
the calibrated P(PNEUMONIA) and confidence: the probability of the predicted class, both
with 6 decimals; correct: 1 if prediction == label, else 0; referred: 1 if the referral rule
sends the film to a radiologist first (its confidence is below the rule's cut), else 0."""


def write_evaluation_table(path, paths, labels, probs, decisions, confidences, referred) -> None:
    """predictions.csv of an evaluation, EVALUATION_COLUMNS, one row per image: labels
    and decisions as class indices, referred as truth values. No cell can act as a
    spreadsheet formula; the file is replaced whole or not at all."""
    rows = [dict(zip(EVALUATION_COLUMNS, EVALUATION_COLUMNS))]
    for f, y, p, d, c, u in zip(paths, labels, probs, decisions, confidences, referred, strict=True):
        rows.append({"file": runtime.display_name(f), "label": network.CLASS_NAMES[y],
                     "prediction": network.CLASS_NAMES[d], "prob_pneumonia": f"{p:.6f}",
                     "confidence": f"{c:.6f}", "correct": int(d == y), "referred": int(bool(u))})
    text = csv_text(rows, EVALUATION_COLUMNS)
    runtime.write_atomic(path, lambda f: f.write(text.encode("utf-8")))
