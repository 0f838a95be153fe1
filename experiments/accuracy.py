#!/usr/bin/env python3
"""Train a recipe for several seeds, evaluate each on the test split, print mean and spread.

    python experiments/accuracy.py --recipe reference --seeds 1 2 3
    python experiments/accuracy.py --collect runs/*reference*     # summarise finished runs

Training uses the GPU when there is one, else the CPU. Each run is the plain
`train_cxray.py` command (printed), so every figure can be reproduced by hand; the
test numbers come from `visualize_results.py` on the run's checkpoint, at the
checkpoint's stored threshold and temperature (fitted on labelled films held out from
training, never on test).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="reference")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--data", default="chest_xray")
    p.add_argument("--out", default="runs")
    p.add_argument("--collect", nargs="+", metavar="RUN_DIR", help="only summarise these runs")
    p.add_argument("--train-args", default="", help="extra arguments for train_cxray.py")
    return p.parse_args()


def run(cmd):
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT)


def train(args, seed) -> Path:
    before = set(Path(ROOT / args.out).glob("*")) if (ROOT / args.out).exists() else set()
    run([sys.executable, "train_cxray.py", "--recipe", args.recipe, "--seed", seed,
         "--data", args.data, "--out", args.out, *args.train_args.split()])
    (new,) = [p for p in Path(ROOT / args.out).glob("*") if p not in before and p.is_dir()]
    return new


def evaluate(run_dir: Path, data: str) -> dict:
    found = sorted((run_dir / "test_eval").glob("*/metrics.json"))
    if not found:
        run([sys.executable, "visualize_results.py", "--model", run_dir / "mobilenet_cxr.pth",
             "--data", data, "--split", "test", "--out", run_dir / "test_eval"])
        found = sorted((run_dir / "test_eval").glob("*/metrics.json"))
    out = found[-1].parent
    m = json.loads((out / "metrics.json").read_text())
    h = json.loads(next(run_dir.glob("training_history_*.json")).read_text())["meta"]
    t = m["at_threshold"]
    return {"run": run_dir.name, "seed": h["seed"], "acc": t["accuracy"],
            "sens": t["sensitivity"], "spec": t["specificity"], "auc": t["auc"],
            "ece": m["ece"], "confident_errors": m["confident_error_share"],
            "confusion": m["confusion"], "val_auc": h["metrics"]["val_auc"],
            "minutes": h["wall_seconds"] / 60, "hardware": h["hardware"],
            "command": h["command"]}


def is_development_run(run_dir: Path) -> bool:
    """Ablation and candidate runs promised never to read the test split: never score
    them on it, and say so."""
    meta = json.loads(next(run_dir.glob("training_history_*.json")).read_text())["meta"]
    why = [k for k in ("ablate", "add") if meta.get(k)]
    if "test_acc" not in meta.get("metrics", {}):
        why.append("skip_test")
    if why:
        print(f"NOT SCORED on test: {run_dir} is a development run ({', '.join(why)}); "
              "it is judged on validation only (experiments/validation_check.py)", file=sys.stderr)
    return bool(why)


def summarise(rows):
    keys = ["acc", "sens", "spec", "auc", "ece", "confident_errors"]
    print("\n| seed | accuracy | sensitivity | specificity | ROC AUC | ECE | confident errors "
          "| confusion | val AUC | train min | hardware |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['acc']:.4f} | {r['sens']:.4f} | {r['spec']:.4f} | "
              f"{r['auc']:.4f} | {r['ece']:.4f} | {r['confident_errors']:.0%} | "
              f"{r['confusion']} | {r['val_auc']:.4f} | {r['minutes']:.1f} | {r['hardware']} |")
    stats = {k: (np.mean([r[k] for r in rows]), np.std([r[k] for r in rows], ddof=1)
                 if len(rows) > 1 else 0.0, min(r[k] for r in rows), max(r[k] for r in rows))
             for k in keys}
    print("| **mean ± sd** | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s, _, _ in stats.values())
          + " | | | | |")
    print("| min - max | " + " | ".join(f"{lo:.4f} - {hi:.4f}" for _, _, lo, hi in stats.values())
          + " | | | | |")
    print("\nCommands:")
    for r in rows:
        print(f"  {r['command']}")


def main():
    args = parse_args()
    if args.collect:
        run_dirs = [Path(p) for p in args.collect if (Path(p) / "mobilenet_cxr.pth").exists()]
        run_dirs = [d for d in run_dirs if not is_development_run(d)]
    else:
        run_dirs = []
        for seed in args.seeds:
            t0 = time.time()
            run_dirs.append(train(args, seed))
            print(f"seed {seed}: {(time.time() - t0) / 60:.1f} min", flush=True)
    rows = [evaluate(d, args.data) for d in run_dirs]
    summarise(rows)


if __name__ == "__main__":
    main()
