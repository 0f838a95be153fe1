#!/usr/bin/env python3
"""Give an existing checkpoint what train_cxray.py fits at the end of a run today, on the
same weights and the run's own splits (rebuilt from the seed and fractions in its
metadata, so --data must be the data it was trained on).

    python experiments/upgrade_checkpoint.py --typicality-for models/mobilenet_cxr.pth
    python experiments/upgrade_checkpoint.py --calibrate-for runs/<run>/mobilenet_cxr.pth

--typicality-for adds the typicality statistics (the out-of-distribution flag), from the
run's train/validation split. --calibrate-for re-fits the calibration (temperature,
threshold, referral rule) on the run's calibration split; the old calibration and the
test figures measured with it move to meta["recalibrated"]. The checkpoint is rewritten
in place.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import calib, checkpoints, dataset, network, runtime, siteshift  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Add the typicality statistics to a checkpoint, or re-fit its calibration, "
                    "from its own splits of --data (weights unchanged).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--typicality-for", metavar="CHECKPOINT",
                      help="add the typicality statistics (the out-of-distribution flag), from "
                           "the run's own train/validation split of --data")
    what.add_argument("--calibrate-for", metavar="CHECKPOINT",
                      help="re-fit the calibration with train_cxray.py's method, on the run's "
                           "own calibration split of --data")
    p.add_argument("--data", default="chest_xray", help="the dataset the checkpoint was trained on")
    p.add_argument("--device", default="auto", type=runtime.device_name, help="auto, cpu or cuda")
    p.add_argument("--cache-dir", default=".cache",
                   help="where decoded uint8 arrays are kept ('' to disable)")
    return p.parse_args(argv)


def add_typicality(path: Path, args) -> None:
    """The typicality statistics, from the train/validation split the run was trained with."""
    with runtime.exit_on(checkpoints.CheckpointError):
        model, meta = checkpoints.load_checkpoint(path, runtime.pick_device(args.device))
    with runtime.exit_on(dataset.DataError):
        cache = dataset.usable_cache(args.cache_dir)
        splits, _, _, source = dataset.checkpoint_splits(meta, args.data, cache)
    print(f"{runtime.display_name(path)}: validation rebuilt as {source}")
    stats = siteshift.typicality_stats(model, *splits["train"], *splits["val"], network.intensity_of(meta),
                                meta["seed"])
    checkpoints.save_checkpoint(path, model.state_dict(), meta, stats)
    print(f"Saved {runtime.display_name(path)} with the typicality statistics")


def refit_calibration(path: Path, args) -> None:
    """The calibration a run fits at its end, on the run's own calibration split. The old
    calibration, and the test figures measured with it, are kept under "recalibrated"."""
    with runtime.exit_on(checkpoints.CheckpointError):
        model, meta = checkpoints.load_checkpoint(path, runtime.pick_device(args.device))
    if not meta.get("calib_fraction"):
        raise SystemExit(f"error: {runtime.display_name(path)} was trained without a calibration "
                         "split (reference recipe, or an older run): nothing to re-fit")
    with runtime.exit_on(dataset.DataError):
        splits, patients, _, _ = dataset.checkpoint_splits(meta, args.data,
                                                      dataset.usable_cache(args.cache_dir))
    calibration = calib.calibrate(model, *splits["cal"], patients["cal"], network.intensity_of(meta),
                               meta["seed"])
    stale = {k: v for k, v in meta["metrics"].items() if k.startswith("test_")}
    meta["metrics"] = {k: v for k, v in meta["metrics"].items() if k not in stale}
    meta["recalibrated"] = {"command": "python " + shlex.join(sys.argv), "when": runtime.timestamp(),
                            "previous_calibration": meta["calibration"],
                            "test_metrics_with_previous": stale}
    meta["calibration"] = calibration.to_dict()
    checkpoints.save_checkpoint(path, model.state_dict(), meta, getattr(model, "typicality", None))
    print(f"Saved {runtime.display_name(path)} with the re-fitted calibration (the test figures "
          "measured with the old one are under meta['recalibrated'])")


def main(argv=None) -> int:
    runtime.printable_console()
    args = parse_args(argv)
    if args.typicality_for:
        add_typicality(Path(args.typicality_for), args)
    else:
        refit_calibration(Path(args.calibrate_for), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
