#!/usr/bin/env python3
"""Build an ensemble file from checkpoints: their weights, metadata and typicality
statistics, and one calibration for them all. predict.py and visualize_results.py load
it like any checkpoint (--model ENSEMBLE.pth).

    python experiments/build_ensemble.py --model models/mobilenet_cxr.pth \\
        --model models/reference_seed1.pth --out ensemble.pth

The ensemble's P(PNEUMONIA) is the mean of its members' temperature-scaled ones. Its
threshold is here the mean of the members' own and its referral rule the strictest of
theirs, each fitted on its own member's split: an approximation, which predict says in a
note. To fit one on a
shared labelled set: visualize_results.py --model ensemble.pth --recalibrate K
--save-calibrated calibrated.pth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import calib, checkpoints, runtime  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Build an ensemble file from checkpoints.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="a member's checkpoint; give 2 or more, in order (member 1 explains "
                        "with Grad-CAM and flags atypical films)")
    p.add_argument("--out", required=True, help="the ensemble file to write")
    args = p.parse_args(argv)
    if not 2 <= len(args.model) <= checkpoints.MAX_MEMBERS:
        p.error(f"give 2 to {checkpoints.MAX_MEMBERS} --model checkpoints")
    return args


def main(argv=None) -> int:
    runtime.printable_console()
    args = parse_args(argv)
    if same := runtime.overwrites_an_input(args.out, args.model):
        raise SystemExit(f"error: --out {runtime.display_name(args.out)} is {same}: name a new file")
    with runtime.exit_on(checkpoints.CheckpointError):
        members = [checkpoints.load_checkpoint(q) for q in args.model]
        sizes = {meta["preprocessing"]["image_size"] for _, meta in members}
        if len(sizes) != 1:
            raise checkpoints.CheckpointError(f"the members use different image sizes {sorted(sizes)}")
        cal = calib.Calibration.of_members([checkpoints.calibration_of(meta) for _, meta in members])
    checkpoints.save_ensemble(args.out, members, cal, {
        "built_from": [{"path": str(q), "sha256": runtime.sha256_file(q)} for q in args.model]})
    checkpoints.load_model(args.out)  # it loads back, every field checked
    print(f"Saved {runtime.display_name(args.out)}: an ensemble of {len(members)} "
          f"({cal.describe()})")
    if cal.caveat():
        print(cal.caveat())
    return 0


if __name__ == "__main__":
    sys.exit(main())
