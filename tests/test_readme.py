"""The README's quoted console output is what the code prints today (the drift test).

A fenced block in README.md right after the line `<!-- drift-test -->` is a console
transcript: its first line is `$ <command>` and the rest is the output as quoted. Each
such command (only ones that need no training and no downloaded data) is run here, as a
user runs it from the repository root, and every quoted line must appear in its real
output, in order and with no other line in between; a quoted line `...` stands for any
number of lines. Without a leading `...` the quote must start at the first line of the
output, without a trailing one it must end at the last.

Both sides are normalised first, so what changes from run to run does not count:
timestamps become `<ts>`; the repository's absolute path is dropped (the default model
prints as models/...); a progress bar rewritten with carriage returns counts as what a
terminal would show last; blank lines and trailing spaces are ignored. Paths under
`outputs/` in the command are redirected into a temporary folder, and that folder is
printed back as `outputs`.

When a script's output changes on purpose, run the command and paste the new lines
into the README's block.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import HAVE_PYDICOM, ROOT, script_env

README = ROOT / "README.md"
MARKER = "<!-- drift-test -->"
TIMESTAMP = re.compile(r"\d{8}_\d{6}(?:_\d+)?")


def transcripts(text: str) -> list[tuple[str, list[str]]]:
    """[(command, quoted output lines)] for every marked block of the README."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        assert lines[j].startswith("```"), f"README line {j + 1}: a fenced block must follow {MARKER}"
        end = next(k for k in range(j + 1, len(lines)) if lines[k].startswith("```"))
        block = lines[j + 1:end]
        assert block and block[0].startswith("$ "), f"README line {j + 2}: start with '$ command'"
        found.append((block[0][2:].strip(), block[1:]))
    return found


def normalise(text: str, tmp=None) -> list[str]:
    """Console text as the README quotes it: see the module docstring."""
    out = []
    for line in text.split("\n"):  # not splitlines(): it also splits at "\r"
        line = line.split("\r")[-1].rstrip()  # what a terminal shows after tqdm's rewrites
        if tmp is not None:
            line = line.replace(str(tmp), "outputs")
        line = line.replace(f"{ROOT}/", "")
        line = TIMESTAMP.sub("<ts>", line)
        if line:
            out.append(line)
    return out


def quote_problem(quoted: list[str], actual: list[str]) -> str | None:
    """None if `actual` contains the quote (see the module docstring), else why not."""
    quoted = [q.rstrip() for q in quoted if q.strip()]
    chunks, current = [], []
    for q in quoted:
        if q.strip() == "...":
            chunks.append(current)
            current = []
        else:
            current.append(q)
    chunks.append(current)
    anchored_start, anchored_end = bool(chunks[0]), bool(chunks[-1])
    chunks = [c for c in chunks if c]
    pos = 0
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        if n == 0 and anchored_start:
            starts = [0]
        elif last and anchored_end:
            starts = [len(actual) - len(chunk)]
        else:
            starts = range(pos, len(actual) - len(chunk) + 1)
        at = next((s for s in starts
                   if s >= pos and actual[s:s + len(chunk)] == chunk), None)
        if at is None:
            where = ("at the start" if n == 0 and anchored_start else
                     "at the end" if last and anchored_end else "after the previous part")
            return f"these quoted lines are not in the output {where}:\n  " + "\n  ".join(chunk)
        pos = at + len(chunk)
        if last and anchored_end and pos != len(actual):
            return "the output goes on after the quote ends (add a final '...' line?)"
    return None


def run_quoted(command: str, tmp) -> list[str]:
    """Run a README command from the repository root; its output, normalised."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].endswith(".py"), f"not a script command: {command}"
    args = [str(tmp / a[len("outputs/"):]) if a.startswith("outputs/") else a for a in argv[2:]]
    if argv[1] in ("predict.py", "visualize_results.py") and "--out" not in args:
        args += ["--out", str(tmp)]
    proc = subprocess.run([sys.executable, str(ROOT / argv[1]), *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", timeout=300, env=script_env())
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout}"
    return normalise(proc.stdout, tmp)


BLOCKS = transcripts(README.read_text(encoding="utf-8"))


def test_readme_quotes_the_commands_it_should():
    """The walkthrough's two no-training outputs are quoted and marked, so they are
    checked: the dataset survey on the test fixture and the shipped model on examples/."""
    commands = [c for c, _ in BLOCKS]
    assert any(c.startswith("python predict.py --dir examples") for c in commands), commands
    assert any(c.startswith("python download_dataset.py --source tests/data") for c in commands)


@pytest.mark.parametrize("command, quoted", BLOCKS, ids=[c for c, _ in BLOCKS])
def test_quoted_output_matches(command, quoted, tmp_path):
    if "examples" in command and not HAVE_PYDICOM:  # examples/ holds a DICOM
        pytest.skip("needs the optional package pydicom (examples/ holds a DICOM)")
    actual = run_quoted(command, tmp_path)
    problem = quote_problem(quoted, actual)
    assert problem is None, (f"README drifted from `{command}`: {problem}\n--- actual output "
                             "(normalised)\n" + "\n".join(actual))


# The matcher itself: a changed, missing or extra line must fail it.

OUTPUT = ["Model: a", "Image: x", "P: 1%", "Image: y", "P: 2%", "Done"]


@pytest.mark.parametrize("quote, ok", [
    (OUTPUT, True),
    (["Model: a", "...", "Done"], True),
    (["...", "Image: y", "P: 2%", "..."], True),
    (["Model: a", "Image: x", "P: 1%", "..."], True),
    (["Model: a", "Image: x", "P: 9%", "..."], False),  # a changed line
    (["Model: a", "P: 1%", "..."], False),  # a line left out without "..."
    (["Model: a", "...", "P: 2%", "Image: y", "..."], False),  # order
    (["Image: x", "..."], False),  # must start at the first line
    (["Model: a", "...", "P: 2%"], False),  # must end at the last line
    (OUTPUT + ["Extra"], False),
])
def test_matcher(quote, ok):
    assert (quote_problem(quote, OUTPUT) is None) == ok


def test_normalise():
    tmp = "/tmp/pytest-1/test_x0"
    text = (f"decoding:  50%|#####     |\r                \rModel: {ROOT}/models/m.pth\n\n"
            f"Grad-CAM: {tmp}/predict_20261127_111200_2/a.png   \n")
    assert normalise(text, tmp) == ["Model: models/m.pth", "Grad-CAM: outputs/predict_<ts>/a.png"]
