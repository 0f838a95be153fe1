"""Pin the numbers a restructure must not change, and compare them later, bit for bit.

    python experiments/pin_numbers.py --save pins.json      # before moving code
    python experiments/pin_numbers.py --compare pins.json   # after: every value identical

What is pinned, each by running the scripts as a user does (so it holds across layouts):
- training on the 64-film fixture (tests/data/cxr64, 64 px, batch 8, --workers 0): the
  reference recipe for 2 epochs (seed 0) and the improved recipe for 1 epoch (seed 1):
  a SHA-256 of every saved tensor (weights, typicality statistics), the history, the
  calibration and the metrics in the checkpoint;
- both shipped checkpoints' probabilities on examples/ and on the fixture's test split
  (predict.py, every column of predictions.csv);
- visualize_results.py's metrics.json for both shipped checkpoints on the fixture's
  test split, and one --adapt evaluation.
Timing fields (seconds, dates, paths, hardware) are left out.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "cxr64"
MODELS = {"improved": ROOT / "models" / "mobilenet_cxr.pth",
          "reference": ROOT / "models" / "reference_seed1.pth"}
VOLATILE = {"seconds", "wall_seconds", "hardware", "command", "resumed_with", "created",
            "timestamp", "date", "run_dir", "out_dir", "model", "models", "path", "paths",
            "data"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def only_run_folder(parent: Path) -> Path:
    (child,) = [p for p in parent.iterdir() if p.is_dir()]
    return child


def tensor_digest(obj) -> str | object:
    """A digest of every tensor in a nested structure (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()

    def walk(x, key):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{key}[{i}]")

    walk(obj, "")
    return h.hexdigest()


def plain(obj):
    """The JSON-comparable part of metadata: tensors digested, volatile keys dropped."""
    if isinstance(obj, torch.Tensor):
        return {"tensor_sha256": tensor_digest(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if str(k) not in VOLATILE}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def pin_training(tmp: Path) -> dict:
    pins = {}
    for name, extra in (("reference_2ep_seed0", ["--epochs", 2, "--seed", 0]),
                        ("improved_1ep_seed1", ["--recipe", "improved", "--epochs", 1,
                                                "--seed", 1])):
        out = tmp / name
        run("train_cxray.py", "--data", TINY, "--image-size", 64, "--batch-size", 8,
            "--workers", 0, "--cache-dir", "", "--out", out, *extra)
        run_dir = only_run_folder(out)
        payload = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)
        (history_file,) = run_dir.glob("training_history_*.json")
        history = json.loads(history_file.read_text())["history"]
        pins[name] = {"state_dict_sha256": tensor_digest(payload["state_dict"]),
                      "typicality_sha256": tensor_digest(payload.get("typicality")),
                      "meta": plain({k: payload["meta"].get(k) for k in
                                     ("calibration", "metrics", "preprocessing")}),
                      "history": plain(history)}
    return pins


def predictions(csv_path: Path) -> list[dict]:
    rows = list(csv.DictReader(open(csv_path, newline="", encoding="utf-8")))
    for r in rows:
        r["file"] = Path(r["file"]).name
        r.pop("resolved_path", None)
    return sorted(rows, key=lambda r: r["file"])


def pin_inference(tmp: Path) -> dict:
    pins = {}
    for model_name, model in MODELS.items():
        for data_name, folder in (("examples", ROOT / "examples"), ("tiny_test", TINY / "test")):
            out = tmp / f"predict_{model_name}_{data_name}"
            run("predict.py", "--model", model, "--dir", folder, "--out", out, "--quiet",
                "--workers", 0)
            pins[f"predict/{model_name}/{data_name}"] = predictions(
                only_run_folder(out) / "predictions.csv")
        for extra_name, extra in (("zero_shot", []), ("adapt", ["--adapt"])):
            if extra and model_name != "improved":
                continue
            out = tmp / f"eval_{model_name}_{extra_name}"
            run("visualize_results.py", "--model", model, "--split", TINY / "test",
                "--out", out, "--bootstrap", 200, *extra)
            eval_dir = only_run_folder(out)
            metrics = json.loads((eval_dir / "metrics.json").read_text())
            pins[f"visualize/{model_name}/{extra_name}"] = plain(metrics)
            pins[f"visualize/{model_name}/{extra_name}/rows"] = predictions(
                eval_dir / "predictions.csv")
    return pins


def differences(old, new, where="") -> list[str]:
    if type(old) is not type(new):
        return [f"{where}: {old!r} -> {new!r}"]
    if isinstance(old, dict):
        out = [f"{where}/{k}: only before" for k in old.keys() - new.keys()]
        out += [f"{where}/{k}: only after" for k in new.keys() - old.keys()]
        for k in sorted(old.keys() & new.keys()):
            out += differences(old[k], new[k], f"{where}/{k}")
        return out
    if isinstance(old, list):
        if len(old) != len(new):
            return [f"{where}: {len(old)} items -> {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path, help="write the pins to this JSON file")
    g.add_argument("--compare", type=Path, help="compare with pins saved before")
    p.add_argument("--skip-training", action="store_true", help="pin inference only")
    p.add_argument("--show", type=int, default=40, help="differences printed in full")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pins = {} if args.skip_training else pin_training(Path(tmp))
        pins.update(pin_inference(Path(tmp)))
    if args.save:
        args.save.write_text(json.dumps(pins, indent=1, sort_keys=True))
        print(f"{len(pins)} groups pinned in {args.save}")
        return 0
    before = json.loads(args.compare.read_text())
    if args.skip_training:
        before = {k: v for k, v in before.items() if k in pins}
    diff = differences(before, json.loads(json.dumps(pins)))
    for d in diff[:args.show]:
        print(d)
    per_group = {}
    for d in diff:  # every group with a difference, also beyond the 40 lines shown
        group = "/".join(d.split(":")[0].split("/")[:4])
        per_group[group] = per_group.get(group, 0) + 1
    for group, n in sorted(per_group.items()):
        print(f"  {n} difference(s) under {group}")
    print(f"{len(diff)} differences in {len(before)} groups" if diff
          else f"identical: {len(before)} groups")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
