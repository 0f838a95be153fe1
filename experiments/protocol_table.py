#!/usr/bin/env python3
"""The protocol table (docs/results.md): every evaluation folder's figures
under its declared protocol, printed from visualize_results.py's metrics.json.

    python visualize_results.py --model M --recalibrate 25 50 100 200 --out outputs/M0
    python visualize_results.py --model M --adapt --out outputs/M1
    python experiments/protocol_table.py outputs/M0/eval_* outputs/M1/eval_*
    python experiments/protocol_table.py --seeds outputs/<recipe>_seed*/eval_*

Zero-shot and label-free rows are the folder's metrics at the stored calibration; each
--recalibrate K gives a "local recalibration, K labelled images" row (cross-fitted,
mean over draws, with the sd of accuracy). With --seeds the folders are seeds of one
recipe: one row per protocol, mean ± sd over the seeds (sample sd), then each seed's
accuracy.

--ceiling adds, per folder, the figures at the threshold read off the folder's own
labels (the highest with sensitivity >= 0.97 on them). That is not a protocol and not a
result: it is the best one threshold can do on these scores, so it shows whether a
recalibration target is within reach of the model's ranking at all.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURES = ("accuracy", "sensitivity", "specificity", "auc", "ece")


def recalibrated(metrics: dict) -> str:
    """The prefix of a recalibration row: after --adapt the recalibration is fitted on the
    adapted model's scores, a different protocol from recalibrating the model as shipped."""
    return "AdaBN + " if "adaptation" in metrics.get("protocol", "") else ""


def ceiling(folder: Path) -> dict:
    """The folder's figures at the highest threshold with sensitivity >= TARGET_SENSITIVITY
    on its own labels (scikit-learn's ROC curve over predictions.csv), and the row's name.
    cxr (and with it torch, seconds at start-up) is imported only here, for
    --ceiling: the plain tables need nothing but metrics.json."""
    from sklearn.metrics import roc_curve

    from cxr import calib, network, scoring

    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([network.CLASS_NAMES.index(r["label"]) for r in rows])
    p = np.array([float(r["prob_pneumonia"]) for r in rows])
    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    t = float(thresholds[np.argmax(tpr >= calib.TARGET_SENSITIVITY)])
    name = (f"ceiling, not a result: threshold read off these images' own labels "
            f"(sensitivity >= {calib.TARGET_SENSITIVITY} on them)")
    return {**scoring.binary_metrics(y, p, t), "ece": float("nan"), "threshold": t, "name": name}


def rows_of(folder: Path, with_ceiling: bool = False) -> list[str]:
    m = json.loads((folder / "metrics.json").read_text())
    name = " + ".join(Path(p).name for p in m["models"])
    t, ref = m["at_threshold"], m.get("referral_rate", {})
    out = [f"| {name} | {m.get('protocol', 'zero-shot')} | {t['accuracy']:.4f} | "
           f"{t['sensitivity']:.4f} | {t['specificity']:.4f} | {t['auc']:.4f} | {m['ece']:.4f} | "
           f"{ref.get('NORMAL', float('nan')):.1%} / {ref.get('PNEUMONIA', float('nan')):.1%} |"]
    for r in m.get("recalibration", []):
        a, s = r["mean"], r["sd"]
        out.append(f"| {name} | {recalibrated(m)}local recalibration, K = {r['K']} labelled images of "
                   f"{Path(m['data']).name}, "
                   f"cross-fitted ({r['draws']} draws) | {a['accuracy']:.4f} ± {s['accuracy']:.4f} | "
                   f"{a['sensitivity']:.4f} | {a['specificity']:.4f} | {a['auc']:.4f} | "
                   f"{a['ece']:.4f} | {a['referred_NORMAL']:.1%} / {a['referred_PNEUMONIA']:.1%} |")
    if with_ceiling:
        c = ceiling(folder)
        out.append(f"| {name} | {recalibrated(m)}{c['name']}, threshold {c['threshold']:.4g} | "
                   f"{c['accuracy']:.4f} | {c['sensitivity']:.4f} | {c['specificity']:.4f} | "
                   f"{c['auc']:.4f} | – | – |")
    return out


def protocol_scores(folder: Path, with_ceiling: bool = False) -> dict[str, dict]:
    """{protocol: {measure: value}} of one evaluation folder (recalibration: draw means)."""
    m = json.loads((folder / "metrics.json").read_text())
    out = {m.get("protocol", "zero-shot"): {**m["at_threshold"], "ece": m["ece"]}}
    for r in m.get("recalibration", []):
        out[f"{recalibrated(m)}local recalibration, K = {r['K']}, cross-fitted"] = r["mean"]
    if with_ceiling:
        c = ceiling(folder)
        out[f"{recalibrated(m)}{c['name']}"] = c
    return out


def seed_rows(folders: list[Path], with_ceiling: bool = False) -> list[str]:
    """One row per protocol: mean ± sd over the folders (seeds), then each seed's accuracy."""
    by_protocol = defaultdict(list)
    for folder in folders:
        for protocol, scores in protocol_scores(folder, with_ceiling).items():
            by_protocol[protocol].append(scores)
    rows = []
    for protocol, runs in by_protocol.items():
        cells = []
        for k in MEASURES:
            v = np.array([r[k] for r in runs], dtype=float)
            if np.isnan(v).all():
                cells.append("–")
                continue
            sd = f" ± {v.std(ddof=1):.4f}" if len(v) > 1 else ""
            cells.append(f"{v.mean():.4f}{sd}")
        each = ", ".join(f"{r['accuracy']:.4f}" for r in runs)
        rows.append(f"| {protocol} | {len(runs)} | " + " | ".join(cells) + f" | {each} |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="visualize_results.py output folders")
    p.add_argument("--seeds", action="store_true",
                   help="the folders are seeds of one recipe: mean ± sd per protocol")
    p.add_argument("--ceiling", action="store_true",
                   help="add the figures at the threshold read off each folder's own labels "
                        "(a ceiling for recalibration, not a result)")
    args = p.parse_args()
    if args.seeds:
        print("| protocol | seeds | accuracy | sensitivity | specificity | ROC AUC | ECE | "
              "accuracy per seed |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(seed_rows(args.folders, args.ceiling)))
        return
    print("| model | protocol | accuracy | sensitivity | specificity | ROC AUC | ECE | "
          "referred NORMAL / PNEUMONIA |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        print("\n".join(rows_of(folder, args.ceiling)))


if __name__ == "__main__":
    main()
