"""The files a prediction run is given: each file once (known by its resolved path), the
ones that cannot be read listed with why, and a dataset that decodes them in worker
processes, carrying a decoding error as a value instead of raising it, so that one bad
file never stops a batch."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from . import dataset, runtime, scan


def resolved(path) -> str:
    """The key a file is known by across runs: its absolute, resolved path."""
    try:
        return runtime.display_name(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return runtime.display_name(Path(path).absolute())


def inside(path, folder) -> bool:
    """Whether path lies in folder (resolved; False when folder is None)."""
    try:
        return folder is not None and folder in Path(path).resolve().parents
    except (OSError, RuntimeError):  # a symlink loop
        return False


def collect_inputs(images, folders, results=None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to predict: the image files given and those found (recursively) in the
    folders, each once by resolved path, and the files not read, with why. The files of
    the results folder `results` (the run being resumed) are never inputs. Prints one note
    when several paths lead to one file."""
    files, not_read = [Path(f) for f in images], []
    results = Path(results).resolve() if results else None
    for d in folders:
        if not Path(d).is_dir():
            not_read.append((Path(d), "not a folder"))
            continue
        found, others = scan.scan_folder(d)
        files += [f for f in found if not inside(f, results)]
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


class FileImages(Dataset):
    """Item i: (i, the decoded array or None, the error or None), never an exception."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        array, error = dataset.try_load_image_array(self.paths[i], self.size)
        return i, array, error


def collate(items):
    """A batch as the list of (index, array or None, error) it is."""
    return items
