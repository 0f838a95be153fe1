"""Rebuild tests/data/cxr64 from the shared 224 px Kermany copy (run once; output is committed).

A few dozen real images, downscaled to 64 x 64 greyscale JPEG, chosen so that several
patients have more than one image (the grouped split must keep them together).
"""
import random
import shutil
import sys
from pathlib import Path

from PIL import Image

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/chest_xray")
DST = Path(__file__).parent / "data" / "cxr64"
MULTI = {"NORMAL": ["IM-0629", "IM-0553", "NORMAL2-IM-1345"],
         "PNEUMONIA": ["person23_", "person30_", "person124_"]}


def pick(split, cls, n, rng):
    files = sorted((SRC / split / cls).iterdir())
    chosen = []
    if split == "train":
        for prefix in MULTI[cls]:
            chosen += [f for f in files if f.name.startswith(prefix)][:4]
    rest = [f for f in files if f not in chosen]
    chosen += rng.sample(rest, n - len(chosen))
    return chosen


def main():
    rng = random.Random(0)
    shutil.rmtree(DST, ignore_errors=True)
    for split, n in (("train", 24), ("test", 8)):
        for cls in ("NORMAL", "PNEUMONIA"):
            out = DST / split / cls
            out.mkdir(parents=True)
            for f in pick(split, cls, n, rng):
                Image.open(f).convert("L").resize((64, 64), Image.BILINEAR).save(out / f.name, quality=92)
    print(sum(1 for _ in DST.rglob("*.jpeg")), "images in", DST)


if __name__ == "__main__":
    main()
