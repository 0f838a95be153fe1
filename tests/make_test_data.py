"""Rebuild the committed test images from the shared 224 px Kermany copy (run once; the
output is committed).

    python tests/make_test_data.py [SRC] [cxr64] [patients64]   (default: both)

cxr64: a few dozen real images, downscaled to 64 x 64 greyscale JPEG, chosen so that
several patients have more than one image (the grouped split must keep them together).
patients64: the same kind of images for the tests that depend on patient grouping:
whole patients with two to four films each, and patients with one, in both classes of
train/ and test/.
"""
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxr.dataset import patient_id  # noqa: E402

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/chest_xray")
DATA = Path(__file__).parent / "data"
DST = DATA / "cxr64"
MULTI = {"NORMAL": ["IM-0629", "IM-0553", "NORMAL2-IM-1345"],
         "PNEUMONIA": ["person23_", "person30_", "person124_"]}
# (split, class): (patients with 2-4 films, all of them taken; patients with one film).
# test/NORMAL has only five patients with several films.
PATIENTS = {("train", "NORMAL"): (8, 8), ("train", "PNEUMONIA"): (8, 8),
            ("test", "NORMAL"): (5, 6), ("test", "PNEUMONIA"): (6, 4)}


def save_small(src: Path, folder: Path):
    Image.open(src).convert("L").resize((64, 64), Image.BILINEAR).save(folder / src.name, quality=92)


def pick(split, cls, n, rng):
    files = sorted((SRC / split / cls).iterdir())
    chosen = []
    if split == "train":
        for prefix in MULTI[cls]:
            chosen += [f for f in files if f.name.startswith(prefix)][:4]
    rest = [f for f in files if f not in chosen]
    chosen += rng.sample(rest, n - len(chosen))
    return chosen


def make_cxr64():
    rng = random.Random(0)
    shutil.rmtree(DST, ignore_errors=True)
    for split, n in (("train", 24), ("test", 8)):
        for cls in ("NORMAL", "PNEUMONIA"):
            out = DST / split / cls
            out.mkdir(parents=True)
            for f in pick(split, cls, n, rng):
                save_small(f, out)
    print(sum(1 for _ in DST.rglob("*.jpeg")), "images in", DST)


def make_patients64():
    rng = random.Random(0)
    dst = DATA / "patients64"
    shutil.rmtree(dst, ignore_errors=True)
    for (split, cls), (n_multi, n_single) in PATIENTS.items():
        films = defaultdict(list)
        for f in sorted((SRC / split / cls).iterdir()):
            films[patient_id(f)].append(f)
        multi = sorted(p for p, fs in films.items() if 2 <= len(fs) <= 4)
        single = sorted(p for p, fs in films.items() if len(fs) == 1)
        out = dst / split / cls
        out.mkdir(parents=True)
        for p in rng.sample(multi, n_multi) + rng.sample(single, n_single):
            for f in films[p]:
                save_small(f, out)
    print(sum(1 for _ in dst.rglob("*.jpeg")), "images in", dst)


def main():
    targets = sys.argv[2:] or ["cxr64", "patients64"]
    for name in targets:
        {"cxr64": make_cxr64, "patients64": make_patients64}[name]()


if __name__ == "__main__":
    main()
