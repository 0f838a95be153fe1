"""Training under a hostile trial: interrupted, resumed after the data changed, with
DataLoader workers, on a full disk, with an unwritable cache, --out or --resume folder.
The script runs as a user runs it, on the tiny real images."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_folder, run_script, script_env, train_args
from test_failures import one_line_error

EPOCHS = 3
WORKERS = ["--epochs", EPOCHS, "--seed", 3, "--workers", 2]


def interrupted(out, *args):
    """train_cxray.py stopped by Ctrl-C (SIGINT to its process group, as a terminal sends
    it, which a background job like this test would otherwise ignore) as soon as it logs
    epoch 1: (run folder, exit status, stdout, stderr)."""
    out.mkdir(parents=True)
    logs = out.parent / f"{out.name}.log"
    with open(f"{logs}.out", "w") as so, open(f"{logs}.err", "w") as se:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_cxray.py"),
                                 *map(str, train_args(out, *args))], cwd=ROOT, stdout=so,
                                stderr=se, env=script_env(), start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        t0 = time.time()
        while "\nEpoch 1/" not in open(f"{logs}.out").read():
            assert proc.poll() is None, open(f"{logs}.err").read()[-2000:]
            assert time.time() - t0 < 240
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    return run_folder(out), proc.returncode, open(f"{logs}.out").read(), open(f"{logs}.err").read()


def copy_of(run_dir, where):
    """A copy of a run folder to resume, leaving the original as it was."""
    return shutil.copytree(run_dir, where / run_dir.name)


def state_epoch(run_dir):
    return torch.load(run_dir / "last_state.pth", weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def ctrl_c_run(tmp_path_factory):
    """A 3-epoch run with two DataLoader workers, stopped by Ctrl-C after epoch 1."""
    return interrupted(tmp_path_factory.mktemp("ctrl_c") / "runs", *WORKERS)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The same run as ctrl_c_run, not interrupted."""
    out = tmp_path_factory.mktemp("whole")
    run_script("train_cxray.py", *train_args(out, *WORKERS))
    return run_folder(out)


@pytest.mark.slow
def test_ctrl_c_is_one_line_saying_how_to_resume(ctrl_c_run, tmp_path):
    run_dir, code, out, err = ctrl_c_run
    assert code == 130, err[-2000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if "Interrupted" in ln]
    assert lines == [f"Interrupted: the last saved epoch is kept: continue with python "
                     f"train_cxray.py --resume {run_dir}"], err[-2000:]
    assert not (run_dir / "mobilenet_cxr.pth").exists()
    assert state_epoch(run_dir) >= 1
    resumed = run_script("train_cxray.py", "--resume", copy_of(run_dir, tmp_path), "--workers", 0)
    assert f"Resuming after epoch {state_epoch(run_dir)}" in resumed.stdout
    assert ("note: --workers 0, the run had 2: the random augmentations differ from those of an "
            "uninterrupted run from here on") in resumed.stdout.splitlines()
    assert (tmp_path / run_dir.name / "mobilenet_cxr.pth").is_file()


@pytest.mark.slow
def test_resume_with_workers_gives_the_uninterrupted_model(ctrl_c_run, uninterrupted_run,
                                                          tmp_path):
    """Resumed without repeating --workers 2: the run keeps its own, and each epoch's order
    and augmentations come from the saved generator alone."""
    cut = copy_of(ctrl_c_run[0], tmp_path)
    run_script("train_cxray.py", "--resume", cut)
    a = torch.load(uninterrupted_run / "mobilenet_cxr.pth", weights_only=True)
    b = torch.load(cut / "mobilenet_cxr.pth", weights_only=True)
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"
    assert a["meta"]["metrics"] == b["meta"]["metrics"]
    history = lambda run: [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads(  # noqa: E731
        next(run.glob("training_history_*.json")).read_text())["history"]]
    assert history(uninterrupted_run) == history(cut)


@pytest.mark.slow
def test_resume_keeps_its_split_when_the_data_changes(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(TINY, data)
    run_dir, code, first, _ = interrupted(tmp_path / "runs", "--epochs", 2, "--data", data)
    assert code == 130
    split_csv = (run_dir / "val_split.csv").read_bytes()
    state = (run_dir / "last_state.pth").read_bytes()

    # a file of the split is gone: refused in one line naming it, nothing changed
    gone = sorted((data / "train" / "NORMAL").iterdir())[0]
    gone.rename(tmp_path / gone.name)
    proc = run_script("train_cxray.py", "--resume", run_dir, check=False)
    one_line_error(proc, "--resume", str(gone), "gone")
    assert (run_dir / "val_split.csv").read_bytes() == split_csv
    assert (run_dir / "last_state.pth").read_bytes() == state

    # it is back, and new files were added: they are left out, said in one line
    (tmp_path / gone.name).rename(gone)
    for cls in ("NORMAL", "PNEUMONIA"):
        for i, f in enumerate(sorted((data / "train" / cls).iterdir())[:3]):
            shutil.copy(f, f.with_name(f"person{900 + i}_{cls.lower()}_1{f.suffix}"))
    proc = run_script("train_cxray.py", "--resume", run_dir)
    notes = [ln for ln in proc.stdout.splitlines() if "added" in ln]
    assert notes == [f"note: 6 file(s) added to {data} since the run started are not used: a "
                     "resumed run keeps the split it started with"], proc.stdout
    assert (run_dir / "val_split.csv").read_bytes() == split_csv
    sizes = lambda text: [ln for ln in text.splitlines() if ln.startswith("Train: ")]  # noqa: E731
    assert sizes(proc.stdout) == sizes(first) and len(sizes(first)) == 1
    assert (run_dir / "mobilenet_cxr.pth").is_file()


def limit_file_size(limit):
    """preexec_fn: files larger than limit bytes cannot be written (EFBIG, as a full
    disk or a quota would refuse them); Python already ignores SIGXFSZ."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_state_that_cannot_be_written_keeps_the_previous_one(ctrl_c_run, tmp_path):
    cut = copy_of(ctrl_c_run[0], tmp_path)
    before = (cut / "last_state.pth").read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "train_cxray.py"), "--resume", str(cut)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=script_env(), preexec_fn=limit_file_size(len(before) // 2))
    one_line_error(proc, f"cannot write {cut / 'last_state.pth'}",
                   f"continue with python train_cxray.py --resume {cut}")
    assert (cut / "last_state.pth").read_bytes() == before
    assert sorted(p.name for p in cut.iterdir()) == ["last_state.pth", "val_split.csv"]
    run_script("train_cxray.py", "--resume", cut)
    assert (cut / "mobilenet_cxr.pth").is_file()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A folder on a tmpfs of the given size in bytes (root with mount rights only)."""
    mounted = []

    def make(size):
        folder = tmp_path / "tmpfs"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder],
                              capture_output=True)
        if proc.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root with mount rights)")
        mounted.append(folder)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(["umount", folder], check=True)


@pytest.mark.slow
def test_a_full_disk_at_the_checkpoint_keeps_the_run_resumable(ctrl_c_run, small_tmpfs,
                                                               tmp_path):
    """Room for the state of epoch 1 but not for the checkpoint after it: No space left."""
    room = (ctrl_c_run[0] / "last_state.pth").stat().st_size + 2_000_000
    out = small_tmpfs(room)
    proc = run_script("train_cxray.py", *train_args(out, "--epochs", 1), check=False)
    run_dir = run_folder(out)
    one_line_error(proc, f"cannot write {run_dir / 'mobilenet_cxr.pth'}", "No space left",
                   "continue with python train_cxray.py --resume")
    assert sorted(p.name for p in run_dir.iterdir()) == ["last_state.pth", "val_split.csv"]
    moved = copy_of(run_dir, tmp_path)
    run_script("train_cxray.py", "--resume", moved)
    assert (moved / "mobilenet_cxr.pth").is_file()


@pytest.mark.slow
def test_an_unwritable_cache_folder_is_skipped_in_one_line(tmp_path):
    (tmp_path / ".cache").write_text("a file where the default cache folder would go")
    args = [a for a in train_args(tmp_path / "runs", "--epochs", 1)]
    i = args.index("--cache-dir")
    del args[i:i + 2]  # the default, .cache, in the working folder
    proc = run_script("train_cxray.py", *args, cwd=tmp_path)
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("note:")]
    assert notes == ["note: cache folder .cache cannot be written (not a folder): decoding "
                     "without a cache"], proc.stdout
    assert (run_folder(tmp_path / "runs") / "mobilenet_cxr.pth").is_file()


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    proc = run_script("train_cxray.py", *train_args(tmp_path / "file" / "runs"), check=False)
    one_line_error(proc, f"cannot write {tmp_path / 'file' / 'runs'}", "Not a directory")


@pytest.mark.parametrize("case, words", [
    ("empty", "has no last_state.pth"),
    ("finished", "is a finished run"),
    ("truncated", "is damaged"),
    ("incomplete", "is damaged"),
])
def test_resume_refuses_what_it_cannot_continue(case, words, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = run_dir / "last_state.pth"
    if case == "finished":
        (run_dir / "mobilenet_cxr.pth").write_bytes(b"a checkpoint")
    elif case in ("truncated", "incomplete"):  # a state file cut short; one without weights
        torch.save({"args": json.dumps({"seed": 1}), "epoch": 1,
                    "model": {"w": torch.zeros(100_000)}}, state)
        if case == "truncated":
            state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    proc = run_script("train_cxray.py", "--resume", run_dir, check=False)
    one_line_error(proc, "--resume", words)


@pytest.mark.parametrize("size", [16, 2000])
def test_an_image_size_no_checkpoint_could_load_is_refused_before_training(tmp_path, size):
    """A size outside the checkpoint loader's range would train for hours and then write
    a model that load_checkpoint refuses: refused at the command line instead."""
    proc = run_script("train_cxray.py", *train_args(tmp_path / "runs"), "--image-size", size,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--image-size {size}: must be 32 to 1024 px" in proc.stderr
    assert not (tmp_path / "runs").exists()
