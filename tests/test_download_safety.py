"""download_dataset.py deletes nothing it did not lay out itself, whatever the flags, and
copies a source with hostile links without following them forever."""

import os
import shutil

from conftest import TINY, run_script

MARKER = ".cxr_dataset"


def tree(folder):
    """Every entry under folder (links not followed), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(proc, *words):
    """One 'error:' line naming the problem, no traceback, and no suggestion to --force."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    for w in words:
        assert w in line, line
    assert "use --force" not in line, line
    return line


def test_force_on_the_current_folder_deletes_nothing(tmp_path):
    """`--data . --force` in a folder of a user's own files: refused, every file kept."""
    shutil.copytree(TINY, tmp_path / "src")
    work = tmp_path / "thesis"
    work.mkdir()
    (work / "thesis.tex").write_text("\\documentclass{article}")
    (work / "figures").mkdir()
    (work / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4")
    before = tree(work)
    for data in (".", str(work)):
        proc = run_script("download_dataset.py", "--source", tmp_path / "src", "--data", data,
                          "--force", cwd=work, check=False)
        refused(proc, "not laid out by this script")
    assert tree(work) == before
    # without --force the refusal does not point to --force either
    proc = run_script("download_dataset.py", "--source", tmp_path / "src", "--data", work,
                      check=False)
    refused(proc, "not a dataset folder")
    assert tree(work) == before


def test_force_refuses_a_dataset_folder_it_did_not_lay_out(tmp_path):
    """A user's own train/test layout (no marker) is not this script's to delete."""
    shutil.copytree(TINY, tmp_path / "src")
    own = tmp_path / "mine"
    shutil.copytree(TINY, own)
    before = tree(own)
    proc = run_script("download_dataset.py", "--source", tmp_path / "src", "--data", own,
                      "--force", check=False)
    refused(proc, "not laid out by this script", MARKER)
    assert tree(own) == before
    # a link named like the data folder is not replaced either
    link = tmp_path / "link"
    link.symlink_to(own, target_is_directory=True)
    proc = run_script("download_dataset.py", "--source", tmp_path / "src", "--data", link,
                      "--force", check=False)
    refused(proc, "not a folder this script made")
    assert link.is_symlink() and tree(own) == before


def test_force_replaces_its_own_layout_but_not_files_added_to_it(tmp_path):
    shutil.copytree(TINY, tmp_path / "src")
    dest = tmp_path / "chest_xray"
    run_script("download_dataset.py", "--source", tmp_path / "src", "--data", dest,
               "--mode", "copy", "--check", "none")
    assert (dest / MARKER).is_file() and (dest / "train").is_dir()
    # its own layout: --force lays it out again (here as links instead of copies)
    run_script("download_dataset.py", "--source", tmp_path / "src", "--data", dest,
               "--force", "--check", "none")
    assert (dest / "train").is_symlink() and (dest / MARKER).is_file()
    # a user's file beside the layout: refused, named, and everything kept
    (dest / "notes.txt").write_text("my notes")
    before = tree(dest)
    proc = run_script("download_dataset.py", "--source", tmp_path / "src", "--data", dest,
                      "--force", "--check", "none", check=False)
    refused(proc, "notes.txt")
    assert tree(dest) == before and (dest / "notes.txt").read_text() == "my notes"


def test_copy_does_not_follow_a_link_loop(tmp_path):
    """A link back to an ancestor inside the source: the copy ends, holds only the images,
    and no link is followed into a loop."""
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    (src / "train" / "NORMAL" / "loop").symlink_to(src / "train", target_is_directory=True)
    (src / "train" / "PNEUMONIA" / "self.jpeg").symlink_to(src / "train" / "PNEUMONIA" /
                                                            "self.jpeg")
    dest = tmp_path / "d"
    proc = run_script("download_dataset.py", "--source", src, "--data", dest, "--mode", "copy",
                      "--check", "none", timeout=120)
    assert "Traceback" not in proc.stderr
    copied = [p for p in dest.rglob("*") if p.is_file() and p.name != MARKER
              and not p.name.startswith("dataset_report_")]
    images = [p for p in TINY.rglob("*") if p.is_file()]
    assert sorted(p.name for p in copied) == sorted(p.name for p in images)
    assert max(len(p.relative_to(dest).parts) for p in dest.rglob("*")) <= 3
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert "self.jpeg" in proc.stdout  # the broken link is listed, not silently dropped
    assert os.path.isfile(dest / MARKER)
