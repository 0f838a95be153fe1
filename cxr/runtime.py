"""Run plumbing the scripts share: argument types, the device, output folders, atomic
writes, a file's digest, printing names safely on any console, CSV cells that cannot
be formulas, and whether an output can be written without overwriting an input.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import math
import os
import sys
import tempfile
import unicodedata
from pathlib import Path

import torch

# Characters a name may hold that would act on a terminal or hide what it says: control
# characters (newline, carriage return, ESC, DEL, C1), line and paragraph separators, and
# invisible format characters (bidi overrides and isolates, zero-width characters).
HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}

SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class ModelOnce(argparse.Action):
    """--model, given once: an ensemble is one file (experiments/build_ensemble.py)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "_model_given", False):
            parser.error(f"{option_string} is given once: build an ensemble file of several "
                         "checkpoints with experiments/build_ensemble.py")
        namespace._model_given = True
        setattr(namespace, self.dest, values)

def display_name(path) -> str:
    """A path as one line of plain text, safe to print and to store as a name.

    Bytes that are not UTF-8 show as \\xNN; control, line-separator and invisible format
    characters as \\n, \\xNN or \\uNNNN; a backslash (where it is not the path separator)
    as \\\\, so two different paths never look alike. Everything else is kept.
    """
    text = str(path)
    try:
        text = os.fsencode(text).decode("utf-8", "surrogateescape")
    except UnicodeError:  # a str path holding lone surrogates: escaped one by one below
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\" and os.sep != "\\":
            out.append("\\\\")
        elif ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif unicodedata.category(ch) in HIDDEN_CATEGORIES:
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)

def printable_console() -> None:
    """Let stdout and stderr print any character: one the console's encoding lacks (a
    unicode file name on an ASCII or POSIX-locale console) shows as \\uNNNN instead of
    raising UnicodeEncodeError in the middle of a run. Scripts call this first."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")

# Text starting with one of these is a formula to a spreadsheet (OWASP, CSV injection); '
# is included so that csv_value can undo csv_cell exactly.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")

def csv_cell(value):
    """A value for a CSV cell that a spreadsheet shows as text and never runs: text that
    starts with = + - @ tab, carriage return or ' gets a leading ' (OWASP's advice).
    Other values are returned unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value

def csv_value(text: str) -> str:
    """The text of a cell written with csv_cell, as it was before."""
    return text[1:] if text.startswith("'") else text

def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d_%H%M%S")

def unique_dir(parent, name: str) -> Path:
    """A new folder parent/name (name_2, name_3, ... if taken): never overwrite a run."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        candidate = parent / (name if i == 1 else f"{name}_{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new run folder under {parent}")

def write_atomic(path, write) -> None:
    """Call write(binary file) on a temp file beside path, then rename it over path:
    a kill never leaves half a file, and concurrent writers (DDP ranks) never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

@contextlib.contextmanager
def exit_on(*errors):
    """For scripts: turn the named exceptions into a one-line 'error: ...' exit."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"error: {e}") from None

def pick_device(name: str = "auto") -> torch.device:
    """auto: the GPU when there is one, else the CPU (with its allocator tuned)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        tune_cpu_allocator()
    return torch.device(name)

def die_with_parent(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the worker is killed when its parent dies (Linux), so a
    SIGKILLed run leaves no orphaned decoder holding memory."""
    if not sys.platform.startswith("linux"):
        return
    try:
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, 9)  # SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)

def tune_cpu_allocator() -> bool:
    """Let the process keep freed tensor memory instead of giving it back after each batch.

    With glibc's defaults every multi-megabyte activation of a CPU forward pass is
    returned to the OS (munmap / heap trim) and page-faulted back in on the next batch;
    that made MobileNetV2 inference about 2x slower on the 2-core machine
    (`python experiments/speed.py --no-tune-allocator` shows the untuned figures).
    PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason;
    mallopt does it with no dependency. Returns False (and changes nothing) where the C
    library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 512 << 20))
    except (OSError, AttributeError):
        return False

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value

def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value

def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value

def open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value

def device_name(text: str) -> str:
    """--device: auto, cpu or cuda (refused when no CUDA GPU is available)."""
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"choose auto, cpu or cuda, not {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda asked for, but no CUDA GPU is available")
    return text

def folder_or_new(text: str) -> str:
    """A folder to write into: may exist as a folder or not at all, never as a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{display_name(text)} exists and is not a folder")
    return text

def write_problem(path: Path, folder: bool) -> str | None:
    """Why path cannot be written as a folder (folder=True) or a regular file, None if
    it can: an existing path must be of that kind, and the nearest existing folder on the
    way must let this process create a file in it (tried, not guessed from permissions)."""
    if os.path.lexists(path):
        if folder and not os.path.isdir(path):
            return "exists and is not a folder"
        if not folder and not os.path.isfile(path):
            return ("is a folder" if os.path.isdir(path) else "exists and is not a regular file")
    where = path if folder else path.parent
    while not os.path.lexists(where):
        where = where.parent
    if not os.path.isdir(where):
        return f"{display_name(where)} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        return f"cannot write in {display_name(where)} ({e.strerror or e})"
    return None

def overwrites_an_input(save, inputs) -> str | None:
    """The input (a model file or an image) that the file save is, under any
    spelling, link or hard link; None if it is none of them."""
    try:
        st = os.stat(save)
    except OSError:
        return None  # a new file
    for q in inputs:
        try:
            sq = os.stat(q)
        except OSError:
            continue
        if (sq.st_dev, sq.st_ino) == (st.st_dev, st.st_ino):
            return display_name(q)
    return None
