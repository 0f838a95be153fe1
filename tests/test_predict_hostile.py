"""predict.py against hostile file names and a hostile machine: names that try to act on
the console or on a spreadsheet, a console that cannot print them, two runs on one
folder, files that fail and come right, writes that fail, and results folders placed
where their pictures would be read as films. Real films (copies of tests/data images
under hostile names), the shipped reference model, the script run as a user runs it."""

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, ROOT, TINY, run_folder, run_script, script_env

from cxr import runtime

MODEL = ROOT / "models" / "reference_seed1.pth"
FILM = sorted((TINY / "test" / "PNEUMONIA").iterdir())[0]
BIG_FILM = DATA / "fullres" / "IM-0421-0001.jpeg"  # one the reference model gives a verdict
# What a terminal or a spreadsheet would act on if it reached it raw.
RAW_CONTROLS = ["\x1b", "\r", "\x7f", "\x9b", "\x85", "\u202e", "\u2066", "\u2028"]


def predict(*args, **kw):
    return run_script("predict.py", "--model", MODEL, *args, **kw)


def films(folder, names, source=FILM):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source, folder / name)
    return folder


def csv_rows(out_dir):
    with open(out_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def one_line_error(proc, *words):
    """The run failed with one 'error:' line holding words, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- names that would act on the console ------------------------------------------------


SPOOFS = ["a\nNORMAL (P(PNEUMONIA) 0.1%).jpeg",  # a fake verdict line
          "up\x1b[1A\x1b[2Kerased.jpeg",  # cursor up, erase line
          "red\x1b[31m.jpeg", "cr\rNORMAL.jpeg", "del\x7f.jpeg",
          "c1\x9b31m\x85.jpeg",  # C1: CSI and next line
          "bidi\u202egpj.exe.jpeg", "iso\u2066x\u2069.jpeg", "ls\u2028NORMAL.jpeg"]


def test_names_cannot_act_on_the_console(tmp_path):
    folder = films(tmp_path / "in", SPOOFS)
    (folder / "bad\x1b[31m.jpeg").write_text("not an image")  # a skipped file's name too
    proc = predict("--dir", folder, "--quiet", "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for ch in RAW_CONTROLS:
        assert ch not in text, f"{ch!r} reached the console"
    for line in text.splitlines():
        assert not line.startswith(("NORMAL", "erased", "gpj", "31m")), line
    shown = [ln for ln in proc.stdout.splitlines() if ln.startswith(str(folder))]
    assert len(shown) == len(SPOOFS), proc.stdout
    assert any(ln.startswith(f"{folder}/a\\nNORMAL (P(PNEUMONIA) 0.1%).jpeg: ") for ln in shown)
    assert f"{folder}/bad\\x1b[31m.jpeg: not an image" in proc.stdout  # the skip list
    rows = csv_rows(run_folder(tmp_path / "o"))
    assert sorted(r["file"] for r in rows) == sorted(
        runtime.display_name(folder / n) for n in [*SPOOFS, "bad\x1b[31m.jpeg"])


def test_display_name_escapes_every_hidden_character_and_keeps_names_apart():
    raw = os.fsdecode(b"n\xff.jpeg")  # not UTF-8
    assert runtime.display_name(raw) == "n\\xff.jpeg"
    for ch in RAW_CONTROLS + ["\n", "\t", "\x00", "\u200b", "\ufeff"]:
        shown = runtime.display_name(f"a{ch}b")
        assert ch not in shown and shown.isprintable(), repr(shown)
    assert runtime.display_name("é ü 日本.png") == "é ü 日本.png"
    # a name spelling an escape is not shown like the character it spells
    assert runtime.display_name("a\\x1b") != runtime.display_name("a\x1b")
    assert runtime.display_name("a\\nb") != runtime.display_name("a\nb")


# --- names that would act on a spreadsheet ---------------------------------------------


FORMULAS = ["=HYPERLINK(\"http---x\",\"y\").jpeg", "+1+1.jpeg", "-2+3.jpeg", "@SUM(1).jpeg",
            "'quoted.jpeg"]


def test_csv_cells_cannot_be_formulas_and_the_jsonl_keeps_names(tmp_path):
    folder = films(tmp_path / "in", [*FORMULAS, "plain.jpeg"])
    predict("--dir", ".", "--quiet", "--json", "--out", tmp_path / "o", cwd=folder)
    out = run_folder(tmp_path / "o")
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        cells = [c for row in csv.reader(f) for c in row]
    for cell in cells:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    files = [r["file"] for r in csv_rows(out)]
    assert sorted(files) == sorted(["'" + n for n in FORMULAS] + ["plain.jpeg"])
    jsonl = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in jsonl) == sorted([*FORMULAS, "plain.jpeg"])


# --- a console that cannot print a name --------------------------------------------------


def test_a_console_that_cannot_print_a_name_loses_no_row(tmp_path):
    names = ["é.jpeg", "日本.jpeg", "plain.jpeg"]
    folder = films(tmp_path / "in", names)
    env = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
    proc = predict("--dir", folder, "--out", tmp_path / "o", env=env, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "\\xe9.jpeg" in proc.stdout and "\\u65e5\\u672c.jpeg" in proc.stdout
    rows = csv_rows(run_folder(tmp_path / "o"))
    assert sorted(Path(r["file"]).name for r in rows) == sorted(names)


# --- resume: one row per file, failed files retried ------------------------------------


def test_resume_retries_failures_and_keeps_one_row_per_file(tmp_path):
    folder = films(tmp_path / "in", ["a.jpeg", "b.jpeg", "=c.jpeg"])
    (folder / "copying.jpeg").write_bytes(FILM.read_bytes()[:400])  # a copy still going on
    (folder / "notes.txt").write_text("not a film")
    predict("--dir", ".", "--quiet", "--json", "--out", tmp_path / "o", cwd=folder)
    out = run_folder(tmp_path / "o")
    first = csv_rows(out)
    assert [r["error"] != "" for r in first if r["file"] == "copying.jpeg"] == [True]
    # two runs that wrote the same rows (what two resumes at once used to leave)
    for name in ("predictions.csv", "predictions.jsonl"):
        data = (out / name).read_bytes()
        header = data[:data.index(b"\r\n") + 2] if name.endswith(".csv") else b""
        (out / name).write_bytes(data + data[len(header):])
    shutil.copy(FILM, folder / "copying.jpeg")  # the copy has finished

    proc = predict("--dir", ".", "--quiet", "--json", "--resume", out, cwd=folder)
    assert "Predicted 1 image(s)" in proc.stdout, proc.stdout
    rows = csv_rows(out)
    names = ["a.jpeg", "b.jpeg", "'=c.jpeg", "copying.jpeg", "notes.txt"]
    assert sorted(r["file"] for r in rows) == sorted(names)
    assert [r["error"] for r in rows if r["file"] == "copying.jpeg"] == [""]
    jsonl = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in jsonl) == sorted(n.lstrip("'") for n in names)


# --- two runs on one folder ----------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    folder = films(tmp_path / "in", [f"f{i:02d}.jpeg" for i in range(40)])
    args = ["--dir", folder, "--quiet", "--batch-size", 1, "--workers", 0]
    first = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--model", MODEL,
                              *map(str, args), "--out", tmp_path / "o"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=script_env())
    try:
        started = time.time()
        csvs = lambda: list((tmp_path / "o").glob("*/predictions.csv"))  # noqa: E731
        while not (csvs() and len(csvs()[0].read_text().splitlines()) > 2):
            assert first.poll() is None, "the first run ended before it could be paused"
            assert time.time() - started < 240
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # paused mid-run, holding its folder
        out = run_folder(tmp_path / "o")
        second = predict(*args, "--resume", out, check=False)
        one_line_error(second, "another run is using", str(out))
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=300)
    assert first.returncode == 0
    rows = csv_rows(out)
    assert len(rows) == 40 and len({r["resolved_path"] for r in rows}) == 40


# --- writes that fail ---------------------------------------------------------------------


def test_an_out_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = predict("--image", FILM, "--out", tmp_path / "a_file" / "sub", check=False)
    one_line_error(proc, "cannot make a results folder", str(tmp_path / "a_file" / "sub"))
    (tmp_path / "f\x1b[31m").write_text("")  # an --out that is a file, named to spoof
    proc = predict("--image", FILM, "--out", tmp_path / "f\x1b[31m", check=False)
    one_line_error(proc, f"{tmp_path}/f\\x1b[31m exists and is not a folder")
    assert "\x1b" not in proc.stderr


def limit_file_size(nbytes):
    """preexec_fn: no file may grow past nbytes (a full disk, as the writer sees it)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_disk_full_mid_run_is_one_line_and_keeps_the_rows_written(tmp_path):
    folder = films(tmp_path / "in", [f"f{i:02d}.jpeg" for i in range(30)])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--model", str(MODEL), "--dir", str(folder),
         "--quiet", "--batch-size", "2", "--workers", "0", "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env(),
        preexec_fn=limit_file_size(4000))
    out = run_folder(tmp_path / "o")
    line = one_line_error(proc, "cannot write", str(out / "predictions.csv"), "--resume")
    rows = csv_rows(out)
    assert 0 < len(rows) < 30 and f"{len(rows)} row(s)" in line, line
    assert (out / "predictions.csv").read_bytes().endswith(b"\r\n")  # no cut-off row
    assert all(r["prediction"] for r in rows)


# --- results folders where their pictures would be read as films --------------------------


def test_gradcam_into_a_data_set_or_an_input_folder_is_refused(tmp_path):
    data = tmp_path / "chest_xray" / "test"
    films(data / "NORMAL", ["n.jpeg"])
    films(data / "PNEUMONIA", ["p.jpeg"])
    scans = films(tmp_path / "scans", ["s.jpeg"])
    for out in (data / "NORMAL", data, data / "PNEUMONIA" / "cams"):
        proc = predict("--dir", scans, "--gradcam", "--out", out, check=False)
        one_line_error(proc, "inside the labelled data set folder", "read the Grad-CAM PNGs as films")
    proc = predict("--dir", scans, "--gradcam", "--out", scans, check=False)
    one_line_error(proc, f"inside the input folder {scans}")
    assert sorted(p.name for p in scans.iterdir()) == ["s.jpeg"]
    assert sorted(p.name for p in data.rglob("*")) == ["NORMAL", "PNEUMONIA", "n.jpeg", "p.jpeg"]


def test_gradcam_names_are_printable_fit_and_never_collide(tmp_path):
    long = "é" * 123  # 246 bytes: the film's name fits in 255, name + _gradcam.png does not
    names = [f"{long}.jpeg", "a\nb.jpeg", "a\rb.jpeg", "a_b.jpeg", "   .jpeg", "$\\frac$.jpeg"]
    folder = films(tmp_path / "in", names, source=BIG_FILM)
    proc = predict("--dir", folder, "--quiet", "--gradcam", "--out", tmp_path / "o",
                   check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = run_folder(tmp_path / "o")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(names), pngs
    assert {"a_b_gradcam.png", "a_b_gradcam_2.png", "a_b_gradcam_3.png"} <= set(pngs)
    assert all(n.isprintable() and len(os.fsencode(n)) <= 255 for n in pngs)
    assert proc.stdout.count("Grad-CAM: ") == len(names)


# --- the other scripts: names printed escaped, CSVs safe, the split file exact -------------


@pytest.mark.parametrize("script,args", [
    ("download_dataset.py", ["--source", "{bad}", "--data", "{tmp}/d"]),
    ("visualize_results.py", ["--split", "{bad}", "--out", "{tmp}/o"]),
    ("train_cxray.py", ["--data", "{bad}", "--out", "{tmp}/o"]),
])
def test_the_other_scripts_print_names_escaped(script, args, tmp_path):
    bad = tmp_path / "no\x1b[2Jsuch\u202e"
    args = [a.format(bad=bad, tmp=tmp_path) for a in args]
    proc = run_script(script, *args, check=False)
    line = one_line_error(proc)
    assert runtime.display_name(bad) in line, line
    for ch in RAW_CONTROLS:
        assert ch not in proc.stdout + proc.stderr, f"{ch!r} reached the console"


def test_visualize_predictions_csv_cells_cannot_be_formulas(tmp_path):
    import numpy as np

    from cxr import predtable

    paths = [Path(n) for n in ("=cmd.jpeg", "-1.jpeg", "plain.jpeg")]
    predtable.write_evaluation_table(tmp_path / "p.csv", paths, np.array([1, 0, 0]),
                                     np.array([0.9, 0.2, 0.7]), np.array([1, 0, 1]),
                                     np.array([0.9, 0.8, 0.7]), np.array([False, False, False]))
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["'=cmd.jpeg", "'-1.jpeg", "plain.jpeg"]


def test_the_split_file_gives_back_every_name_exactly(tmp_path):
    """val_split.csv is read back by visualize_results.py --split val: any file name, one
    that is not UTF-8 or holds a newline or a backslash too, must come back as it was."""
    import numpy as np

    from cxr import evalfiles, runfiles

    names = ["a\nb.jpeg", "back\\x1b.jpeg", os.fsdecode(b"n\xff.jpeg"), "=cmd.jpeg", "é.jpeg"]
    paths = [p.resolve() for p in (films(tmp_path / "data", names) / n for n in names)]
    run = tmp_path / "run"
    run.mkdir()
    runfiles.write_split_csv(run / "val_split.csv",
                             {"val": (paths, np.ones(len(paths), dtype=int))})
    files, labels, _, _ = evalfiles.labelled_files("val", None, [run / "model.pth"])
    assert files == paths and labels == [1] * len(paths)
    with open(run / "val_split.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        patients = [r["patient"] for r in csv.DictReader(f)]
    assert "'=cmd" in patients and not any(p.startswith(("=", "+", "-", "@")) for p in patients)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    predict("--image", FILM, "--out", out)
    return run_folder(out)


@pytest.mark.parametrize("damage", ["cut", "list", "nested", "fifo", "not-utf8"])
def test_a_damaged_manifest_is_one_line_on_resume(finished_run, tmp_path, damage):
    """--resume reads the folder's run.json: damaged, it is named in one line, never a
    traceback, and never read without bound."""
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    manifest = run_dir / "run.json"
    text = manifest.read_text()
    manifest.unlink()
    if damage == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.write_bytes({"cut": text[: len(text) // 2].encode(), "list": b"[1, 2]",
                              "nested": b"[" * 100_000 + b"]" * 100_000,
                              "not-utf8": b'{"a": "\xff"}'}[damage])
    proc = predict("--image", FILM, "--resume", run_dir, check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert "run.json" in line, line


@pytest.mark.parametrize("dropped", ["typicality", "atypical"])  # atypical: the columns before it
@pytest.mark.parametrize("recorded", ["manifest", "header only"])
def test_resume_refuses_a_folder_with_other_columns(finished_run, tmp_path, recorded, dropped):
    """Bug: --resume on a folder whose rows have other columns (written by a predict.py
    with another column list) reading none of its rows as complete, and silently redoing
    them all under a header they do not match. The run.json lists the columns (or, in a
    manifest from before it listed them, the CSV header stands for them); other columns
    are refused in one line, and the folder is left as it was."""
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["columns"] == list(csv_rows(run_dir)[0])  # what this predict.py writes
    older = [c for c in manifest["columns"] if c != dropped]
    with open(run_dir / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=older, extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows(finished_run))
    if recorded == "manifest":
        manifest["columns"] = older
    else:
        del manifest["columns"]
    (run_dir / "run.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    proc = predict("--image", FILM, "--resume", run_dir, check=False)
    line = one_line_error(proc, "--resume", "columns", f"without {dropped}")
    assert runtime.display_name(run_dir) in line, line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_resume_accepts_a_manifest_listing_no_columns_over_the_same_header(finished_run, tmp_path):
    """A run.json from before the columns were listed, over a CSV with this predict.py's
    header: resumed as before (the file done, nothing redone)."""
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    manifest = json.loads((run_dir / "run.json").read_text())
    del manifest["columns"]
    (run_dir / "run.json").write_text(json.dumps(manifest))
    before = (run_dir / "predictions.csv").read_bytes()
    proc = predict("--image", FILM, "--resume", run_dir)
    assert "Resuming: 1 of 1 files already done" in proc.stdout
    assert (run_dir / "predictions.csv").read_bytes() == before


def test_the_evaluation_table_is_documented_and_formula_free(tmp_path):
    """predtable.write_evaluation_table (visualize_results.py's predictions.csv): its
    documented columns in order, one row per image with class names, 6 decimals, correct
    and referred as 0/1, and no file name that a spreadsheet would run as a formula."""
    from cxr import predtable

    names = ["=cmd.jpeg", "a\nb.jpeg", "ok.png"]
    path = tmp_path / "predictions.csv"
    predtable.write_evaluation_table(path, names, [0, 1, 1], [0.1, 0.45, 0.9],
                                     [0, 1, 0], [0.9, 0.45, 0.1], [False, True, False])
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    assert records[0] == predtable.EVALUATION_COLUMNS
    assert records[0][-2:] == ["correct", "referred"]
    assert records[1:] == [["'=cmd.jpeg", "NORMAL", "NORMAL", "0.100000", "0.900000", "1", "0"],
                           ["a\\nb.jpeg", "PNEUMONIA", "PNEUMONIA", "0.450000", "0.450000", "1", "1"],
                           ["ok.png", "PNEUMONIA", "NORMAL", "0.900000", "0.100000", "0", "0"]]
