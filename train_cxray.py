#!/usr/bin/env python3
"""Step 2 of 4: fine-tune an ImageNet MobileNetV2 to tell NORMAL from PNEUMONIA.

The defaults reproduce the published reference run: 224 px, flips / rotation / jitter,
Adam 1e-4, batch 16, 8 epochs, ReduceLROnPlateau on validation F1, and the checkpoint
of the best validation F1. The test split is read once, at the very end.

    python train_cxray.py                      # the reference run on chest_xray/
    python train_cxray.py --seed 2 --out runs  # another seed
    python train_cxray.py --recipe improved    # the recipe that beats it
    python train_cxray.py --recipe probe       # the head alone on frozen features (minutes)
    torchrun --nproc_per_node 2 train_cxray.py # several processes (DDP)
    python train_cxray.py --resume runs/<run>  # continue an interrupted run

Each run writes a new folder runs/<timestamp>_<recipe>_seed<N>/ holding
mobilenet_cxr.pth, training_results_<ts>.txt, training_history_<ts>.json,
training_plot_<ts>.png and val_split.csv.

This file is the lesson: the arguments, the run (main: the epoch loop), one epoch of
training, one evaluation, and the test split read once. What keeps the run's promises
lives in cxr/: recipes.py (the recipe table), engine.py (splits, loader, model, loss,
optimiser and schedule, the selection rule), runstate.py (run folder, resumable state,
Ctrl-C, torchrun) and runfiles.py (what a run writes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from cxr import (
    calib,
    checkpoints,
    dataset,
    engine,
    network,
    recipes,
    runfiles,
    runstate,
    runtime,
    siteshift,
)
from cxr.runstate import log  # print on the first process only


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fine-tune MobileNetV2 on chest X-rays (NORMAL vs PNEUMONIA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="chest_xray", help="the dataset root: train/ [val/] test/")
    p.add_argument("--out", default="runs", type=runtime.folder_or_new,
                   help="parent folder: each run writes to a new OUT/<ts>_<recipe>_seed<N>/")
    p.add_argument("--recipe", default="reference", choices=sorted(recipes.RECIPES),
                   help="the recipe (cxr/recipes.py): optimiser, learning rate, schedule, "
                        "augmentations, loss, selection, calibration")
    p.add_argument("--epochs", type=runtime.positive_int, help="default: the recipe's (reference: 8)")
    p.add_argument("--batch-size", type=runtime.positive_int,
                   help="global batch size (reference: 16)")
    p.add_argument("--image-size", type=runtime.positive_int, default=network.IMAGE_SIZE)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", type=runtime.device_name, help="auto, cpu or cuda")
    p.add_argument("--workers", type=runtime.nonnegative_int,
                   help="DataLoader worker processes (default 0, which keeps the published "
                        "runs' random augmentation stream; a resumed run keeps its own)")
    p.add_argument("--cache-dir", default=".cache",
                   help="where decoded uint8 arrays are kept ('' to disable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(recipes.ABLATIONS),
                   help="improved recipe without this component (repeatable; pretrained: "
                        "random initial weights; ablation runs never read the test split)")
    args = p.parse_args(argv)
    if args.ablate and args.recipe != "improved":
        p.error("--ablate options change the improved recipe: use them with --recipe improved")
    lo, hi = checkpoints.IMAGE_SIZE_RANGE
    if not lo <= args.image_size <= hi:
        p.error(f"--image-size {args.image_size}: must be {lo} to {hi} px (MobileNetV2 needs "
                f"{lo}; a checkpoint beyond {hi} would be refused at load)")
    for key in ("epochs", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, recipes.RECIPES[args.recipe][key])
    if args.workers is None and not args.resume:
        args.workers = 0
    # recorded in the run's state and checkpoint (a resumed run keeps its own)
    args.lr = recipes.RECIPES[args.recipe]["lr"]
    args.val_fraction, args.calib_fraction = dataset.VAL_FRACTION, dataset.CALIB_FRACTION
    return args


# ---------------------------------------------------------------------------------
# The run: set-up, the epoch loop, then calibration, the test split (read once), and
# the report.
# ---------------------------------------------------------------------------------


def main(argv=None):
    runtime.printable_console()
    args = parse_args(argv)
    runstate.exit_on_ctrl_c()
    args, resumed = runstate.resume_arguments(args)  # with --resume: the run's own arguments
    args.cache_dir = dataset.usable_cache(args.cache_dir)
    world, rank, device = runstate.setup_distributed(args)  # 1 process unless under torchrun
    recipe = recipes.recipe_for(args.recipe, args.ablate)
    amp = device.type == "cuda"  # bf16 autocast in the training step on CUDA only
    torch.manual_seed(args.seed)
    start = time.time()
    run_dir, commands = runstate.open_run_folder(args, resumed, world, rank)
    runstate.exit_on_ctrl_c(run_dir, rank)
    log(rank, f"Run folder: {runtime.display_name(run_dir)}")
    log(rank, f"Device: {runstate.hardware(device)} x {world} process(es), bf16 autocast: {amp}")
    log(rank, *recipes.recipe_changes(args.recipe, args.ablate), sep="\n")

    # Data: a patient-grouped validation split (a resumed run keeps the one it started
    # with), decoded once, augmented on tensors; the test files are not read yet.
    splits, patients, test_files, val_source, split = engine.load_splits(args, recipe, run_dir, rank,
                                                                         resumed)
    (x_train, y_train), (x_val, y_val) = splits["train"], splits["val"]
    loader, sampler, loader_gen = engine.make_loader(x_train, y_train, recipe, args, world, rank, device)

    # Model, loss, optimiser and schedule; a resumed run picks up where it stopped.
    model, weight_source = engine.make_model(recipe, device)
    log(rank, f"MobileNetV2 weights: {weight_source}")
    net = runstate.wrap_distributed(model, world, device)
    criterion, optimizer, scheduler = engine.make_optimisation(recipe, model, y_train, len(loader),
                                                               args.lr, args.epochs)
    history, best, first_epoch = runstate.restore(resumed, model, optimizer, scheduler,
                                                  loader_gen, recipe, rank)
    if recipe["train"] == "head":  # the probe: the head alone, on features computed once
        history, best, first_epoch = engine.train_head(model, splits, recipe, args, rank, criterion,
                                                       optimizer, scheduler)  # no epoch loop

    for epoch in range(first_epoch, args.epochs + 1):
        t0 = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        # one pass over the training images (a warm-up + cosine schedule steps per batch)
        train_loss, train_acc = train_one_epoch(
            net, loader, criterion, optimizer, device, amp, rank, epoch, args.epochs,
            scheduler if recipe["schedule"] == "warmup_cosine" else None)
        # validation, the same on every process; a plateau schedule steps on it
        val = evaluate(model, x_val, y_val, recipe["intensity"])
        if recipe["schedule"] == "plateau":
            scheduler.step(val[recipe["select"]])
        # keep the weights of the best epoch by the recipe's selection metric
        improved = engine.is_better(val[recipe["select"]], best["score"], recipe["select_mode"])
        if improved:
            best = {"score": val[recipe["select"]], "epoch": epoch,
                    "state": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})}
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "val_loss": val["val_loss"], "val_acc": val["accuracy"],
                        "val_f1": val["val_f1"], "val_auc": val["auc"],
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0})
        if rank == 0:  # resumable after every epoch, before it is logged
            runstate.save_state(run_dir, model, optimizer, scheduler, epoch, history, best,
                                loader_gen, args, commands, split)
        log_epoch(rank, history[-1], args.epochs, improved, recipe)
    if runstate.end_distributed(model, world, rank):  # the replicas agree; rank 0 goes on
        return 0

    # The best epoch's weights, their calibration (on the calibration split, which
    # selection never saw), the typicality statistics, then the test split, read once.
    model.load_state_dict(best["state"])
    calibration = (calib.calibrate(model, *splits["cal"], patients["cal"], recipe["intensity"],
                                   args.seed) if recipe["calibrate"] else None)
    typicality = siteshift.typicality_stats(model, x_train, y_train, x_val, y_val,
                                            recipe["intensity"], args.seed)
    val = evaluate(model, x_val, y_val, recipe["intensity"], calibration)
    metrics = {"best_epoch": best["epoch"], "val_f1": val["val_f1"], "val_acc": val["accuracy"],
               "val_auc": val["auc"]}
    test_metrics, test_text = test_once(model, test_files, recipe, calibration, args, run_dir)
    metrics.update(test_metrics)
    meta = runfiles.run_meta(args, recipe, metrics, calibration, weight_source, val_source,
                             commands, runstate.hardware(device), world, time.time() - start)
    runfiles.write_outputs(run_dir, best, meta, history, test_text, typicality)
    return 0


# ---------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation.
# ---------------------------------------------------------------------------------


def train_one_epoch(model, loader, criterion, optimizer, device, amp, rank, epoch, epochs,
                    step_scheduler=None):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    with runstate.ctrl_c_held():  # the DataLoader's workers start (see exit_on_ctrl_c)
        batches = iter(loader)
    bar = tqdm(batches, desc=f"Epoch {epoch}/{epochs} [train]", unit="batch",
               total=len(loader), disable=rank != 0, leave=False)
    for x, y in bar:
        runstate.stop_if_interrupted()
        x = network.normalize_batch(x.to(device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    with runstate.ctrl_c_held():  # and stop, in finalisers
        del bar, batches
    return total_loss / seen, correct / seen


def evaluate(model, images, labels, intensity="none", calibration=None, desc=None) -> dict:
    """Validation loss (cross-entropy at temperature 1) and scoring.binary_metrics of (N, H, W)
    uint8 images: at the calibration's temperature and threshold, or argmax without one."""
    logits = network.predict_logits(model, images, intensity, desc=desc)
    return engine.score_logits(logits, labels, calibration)


def log_epoch(rank, h, epochs, improved, recipe):
    log(rank, f"\nEpoch {h['epoch']}/{epochs}")
    log(rank, f"Train Loss: {h['train_loss']:.4f}, Train Acc: {h['train_acc']:.4f}")
    log(rank, f"Val Loss: {h['val_loss']:.4f}, Val Acc: {h['val_acc']:.4f}, "
              f"Val F1: {h['val_f1']:.4f}, Val AUC: {h['val_auc']:.4f}")
    if improved:
        what = {"val_f1": "F1", "val_loss": "val loss"}[recipe["select"]]
        log(rank, f"New best model saved with {what}: {h[recipe['select']]:.4f}")
    log(rank, f"Learning rate: {h['lr']:.2e}")


# ---------------------------------------------------------------------------------
# After training: the test split, read once.
# ---------------------------------------------------------------------------------


def test_once(model, test_files, recipe, calibration, args, run_dir) -> tuple[dict, str]:
    """The test split's metrics and the published run's report (printed), or a note when
    this is a development run that must not read it."""
    if args.ablate:
        text = ("Test split not read: development run (--ablate); "
                "decide on validation, evaluate the final recipe once.\n")
        print("\n" + text, flush=True)
        return {}, text
    paths, labels = test_files
    x_test, kept, bad = dataset.decode_all(paths, args.image_size, args.cache_dir or None, "test")
    runfiles.report_skipped(run_dir, bad)
    y_test = np.array([labels[i] for i in kept], dtype=np.int64)
    test = evaluate(model, x_test, y_test, recipe["intensity"], calibration, desc="test")
    test_metrics, text = runfiles.test_report(y_test, test)
    print("\n" + text, flush=True)
    return test_metrics, text


if __name__ == "__main__":
    sys.exit(main())
