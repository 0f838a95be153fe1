#!/usr/bin/env python3
"""Step 2 of 4: fine-tune an ImageNet MobileNetV2 to tell NORMAL from PNEUMONIA.

The defaults reproduce the published reference run: 224 px, flips / rotation / jitter,
Adam 1e-4, batch 16, 8 epochs, ReduceLROnPlateau on validation F1, and the checkpoint
of the best validation F1. The test split is read once, at the very end.

    python train_cxray.py                      # the reference run on chest_xray/
    python train_cxray.py --seed 2 --out runs  # another seed
    python train_cxray.py --recipe improved    # the recipe that beats it
    torchrun --nproc_per_node 2 train_cxray.py # several processes (DDP)
    python train_cxray.py --resume runs/<run>  # continue an interrupted run

Each run writes a new folder runs/<timestamp>_<recipe>_seed<N>/ holding
mobilenet_cxr.pth, training_results_<ts>.txt, training_history_<ts>.json,
training_plot_<ts>.png and val_split.csv.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cxr import calib, checkpoints, dataset, network, runtime, scoring, siteshift  # noqa: E402

# ---------------------------------------------------------------------------------
# Recipes are data: every field is read by the code below, and the text in the
# checkpoint and the README is generated from the fields (describe()).
# ---------------------------------------------------------------------------------

RECIPES = {
    # The published reference run, unchanged.
    "reference": dict(
        epochs=8, batch_size=16, optimizer="adam", lr=1e-4, weight_decay=0.0,
        schedule="plateau", augment=["flip", "rotate10", "brightness0.1"],
        intensity="none", class_weights=False, label_smoothing=0.0,
        select="val_f1", select_mode="max", calibrate=False),
    # What fixes the normal-recall collapse: see README, "Beating the reference".
    "improved": dict(
        epochs=8, batch_size=32, optimizer="adamw", lr=3e-4, weight_decay=0.01,
        schedule="warmup_cosine",
        augment=["resized_crop", "flip", "rotate10", "brightness_contrast0.3"],
        intensity="equalize", class_weights=True, label_smoothing=0.1,
        select="val_loss", select_mode="min", calibrate=True),
}
# --ablate X: the improved recipe minus one part, replaced by the reference's choice.
ABLATIONS = {
    "equalize": {"intensity": "none"},
    "augment": {"augment": RECIPES["reference"]["augment"]},
    "loss": {"class_weights": False, "label_smoothing": 0.0},
}
# Augmentations by name: (plain words, the torchvision transform for a given image size).
AUGMENTATIONS = {
    "flip": ("RandomHorizontalFlip", lambda size: v2.RandomHorizontalFlip()),
    "rotate10": ("RandomRotation(10)", lambda size: v2.RandomRotation(10)),
    "brightness0.1": ("ColorJitter(brightness=0.1)", lambda size: v2.ColorJitter(brightness=0.1)),
    "resized_crop": ("RandomResizedCrop(scale 0.7-1, ratio 0.85-1.15)",
                     lambda size: v2.RandomResizedCrop(size, scale=(0.7, 1.0),
                                                       ratio=(0.85, 1.15), antialias=True)),
    "brightness_contrast0.3": ("ColorJitter(brightness=0.3, contrast=0.3)",
                               lambda size: v2.ColorJitter(brightness=0.3, contrast=0.3)),
}


def recipe_for(name: str, ablate=()) -> dict:
    """The recipe's fields, with --ablate applied as field overrides."""
    recipe = copy.deepcopy(RECIPES[name])
    for part in ablate:
        recipe.update(copy.deepcopy(ABLATIONS[part]))
    return recipe


def describe(recipe: dict) -> dict:
    """The recipe in words, generated from its fields (stored in the checkpoint)."""
    optimizer = {"adam": "Adam", "adamw": "AdamW"}[recipe["optimizer"]]
    if recipe["weight_decay"]:
        optimizer += f"(weight_decay={recipe['weight_decay']:g})"
    metric = {"val_f1": "validation F1 (PNEUMONIA positive)", "val_loss": "validation loss"}
    select = metric[recipe["select"]]
    loss = []
    if recipe["class_weights"]:
        loss.append("class-balanced weights")
    if recipe["label_smoothing"]:
        loss.append(f"label_smoothing={recipe['label_smoothing']:g}")
    return {
        "epochs": recipe["epochs"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
        "optimizer": optimizer,
        "scheduler": {"plateau": f"ReduceLROnPlateau(mode={recipe['select_mode']} on {select},"
                                 " factor=0.5, patience=2)",
                      "warmup_cosine": "linear warm-up for 1 epoch, then cosine decay to 0 "
                                       "(per step)"}[recipe["schedule"]],
        "augment": ", ".join(AUGMENTATIONS[a][0] for a in recipe["augment"]),
        "intensity": recipe["intensity"],
        "training": "all layers",
        "loss": "CrossEntropyLoss" + (f"({', '.join(loss)})" if loss else ""),
        "selection": f"{'best' if recipe['select_mode'] == 'max' else 'lowest'} {select}",
        "calibration": (calib.CALIBRATION_RULE if recipe["calibrate"]
                        else "none: argmax (threshold 0.5), temperature 1"),
    }


def recipe_changes(args) -> list[str]:
    """What each --ablate changes, in the words describe() gives the fields."""
    base = describe(RECIPES[args.recipe])
    lines = []
    for part in args.ablate:
        changed = describe(recipe_for(args.recipe, [part]))
        diff = "; ".join(f"{k} = {v}" for k, v in changed.items() if v != base[k])
        lines.append(f"Ablation ({part}): {diff}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fine-tune MobileNetV2 on chest X-rays (NORMAL vs PNEUMONIA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="chest_xray", help="the dataset root: train/ [val/] test/")
    p.add_argument("--out", default="runs", type=runtime.folder_or_new,
                   help="parent folder: each run writes to a new OUT/<ts>_<recipe>_seed<N>/")
    p.add_argument("--recipe", default="reference", choices=sorted(RECIPES))
    p.add_argument("--epochs", type=runtime.positive_int, help="default: the recipe's (reference: 8)")
    p.add_argument("--batch-size", type=runtime.positive_int,
                   help="global batch size (reference: 16)")
    p.add_argument("--lr", type=runtime.positive_float, help="learning rate (reference: 1e-4)")
    p.add_argument("--image-size", type=runtime.positive_int, default=network.IMAGE_SIZE)
    p.add_argument("--val-fraction", type=runtime.open_fraction, default=0.1,
                   help="patient-grouped validation share of train/ when there is no val/")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", type=runtime.device_name, help="auto, cpu or cuda")
    p.add_argument("--workers", type=runtime.nonnegative_int,
                   help="DataLoader worker processes (default 0, which keeps the published "
                        "runs' random augmentation stream; a resumed run keeps its own)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="start from random weights instead of ImageNet")
    p.add_argument("--cache-dir", default=".cache",
                   help="where decoded uint8 arrays are kept ('' to disable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(ABLATIONS),
                   help="improved recipe without this component (repeatable; ablation runs, "
                        "which never read the test split)")
    args = p.parse_args(argv)
    if args.ablate and args.recipe != "improved":
        p.error("--ablate options change the improved recipe: use them with --recipe improved")
    lo, hi = checkpoints.IMAGE_SIZE_RANGE
    if not lo <= args.image_size <= hi:
        p.error(f"--image-size {args.image_size}: must be {lo} to {hi} px (MobileNetV2 needs "
                f"{lo}; a checkpoint beyond {hi} would be refused at load)")
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, RECIPES[args.recipe][key])
    if args.workers is None and not args.resume:
        args.workers = 0
    args.calib_fraction = dataset.CALIB_FRACTION  # recorded in the run's state and checkpoint
    return args


# ---------------------------------------------------------------------------------
# The run: set-up, the epoch loop, then calibration, the test split (read once), and
# the report.
# ---------------------------------------------------------------------------------


def main(argv=None):
    runtime.printable_console()
    args = parse_args(argv)
    exit_on_ctrl_c()
    args, resumed = resume_arguments(args)
    args.cache_dir = dataset.usable_cache(args.cache_dir)
    world, rank, device = setup_distributed(args)  # one process unless started by torchrun
    recipe = recipe_for(args.recipe, args.ablate)
    amp = device.type == "cuda"  # bf16 autocast in the training step on CUDA only
    torch.manual_seed(args.seed)
    start = time.time()
    run_dir, commands = open_run_folder(args, resumed, world, rank)
    exit_on_ctrl_c(run_dir, rank)
    log(rank, f"Run folder: {runtime.display_name(run_dir)}")
    log(rank, f"Device: {hardware(device)} x {world} process(es), bf16 autocast: {amp}")
    log(rank, *recipe_changes(args), sep="\n")

    # Data: a patient-grouped validation split (a resumed run keeps the one it started
    # with), decoded once, augmented on tensors.
    saved = None if resumed is None else json.loads(resumed.get("split", "{}"))
    splits, patients, test_files, val_source, split = load_splits(args, recipe, run_dir, rank,
                                                                  saved)
    (x_train, y_train), (x_val, y_val) = splits["train"], splits["val"]
    log(rank, f"Train: {len(y_train)} images ({np.bincount(y_train, minlength=2).tolist()} "
              f"NORMAL/PNEUMONIA), validation: {len(y_val)} ({val_source})"
              + (f", calibration: {len(splits['cal'][1])}" if "cal" in splits else ""))
    loader, sampler, loader_gen = make_loader(x_train, y_train, recipe, args, world, rank, device)

    # Model, loss, optimiser and schedule; a resumed run picks up where it stopped.
    model, weight_source = make_model(args, device)
    log(rank, f"MobileNetV2 weights: {weight_source}")
    net = wrap_distributed(model, world, device)
    criterion, optimizer, scheduler = make_optimisation(recipe, model, y_train, len(loader),
                                                        args.lr, args.epochs)
    history, best, first_epoch = restore(resumed, model, optimizer, scheduler, loader_gen,
                                         recipe, rank)

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
        improved = is_better(val[recipe["select"]], best["score"], recipe["select_mode"])
        if improved:
            best = {"score": val[recipe["select"]], "epoch": epoch,
                    "state": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})}
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "val_loss": val["val_loss"], "val_acc": val["accuracy"],
                        "val_f1": val["val_f1"], "val_auc": val["auc"],
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0})
        if rank == 0:  # resumable after every epoch, before it is logged
            save_state(run_dir, model, optimizer, scheduler, epoch, history, best, loader_gen,
                       args, commands, split)
        log_epoch(rank, history[-1], args.epochs, improved, recipe)
    if world > 1:
        check_replicas_in_sync(model, world, rank)
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
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
    print("\n" + test_text, flush=True)
    meta = checkpoints.base_meta(args.image_size, recipe["intensity"])
    meta.update(recipe=args.recipe, recipe_details=describe(recipe), recipe_fields=recipe,
                ablate=args.ablate, seed=args.seed, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, weights=weight_source,
                validation=val_source, val_fraction=args.val_fraction,
                calib_fraction=args.calib_fraction if recipe["calibrate"] else None,
                metrics=metrics, command=commands[0],
                resumed_with=commands[1:], hardware=hardware(device), processes=world,
                wall_seconds=round(time.time() - start, 1), calibration=calibration)
    write_outputs(run_dir, best, meta, history, test_text, typicality)
    return 0


# ---------------------------------------------------------------------------------
# Set-up: arguments of a resumed run, processes, the run folder.
# ---------------------------------------------------------------------------------


RETIRED_OPTIONS = {"add": [], "skip_test": False, "amp": "auto"}  # held by older run states


def resume_arguments(args):
    """With --resume, the interrupted run's own arguments (--device and --workers may
    change; the run's own --workers unless given) and its saved state; otherwise args and
    None."""
    if not args.resume:
        return args, None
    state = load_state(Path(args.resume))
    saved = json.loads(state["args"])
    saved = {"ablate": [], **saved}  # older run states
    used = [k for k, default in RETIRED_OPTIONS.items() if saved.get(k, default) != default]
    if used:
        raise SystemExit(f"error: --resume: the run used --{used[0].replace('_', '-')}, an "
                         "option train_cxray.py does not have: start it again")
    if args.workers is not None and args.workers != saved.get("workers", 0):
        print(f"note: --workers {args.workers}, the run had {saved.get('workers', 0)}: the random "
              "augmentations differ from those of an uninterrupted run from here on")
        saved["workers"] = args.workers
    saved.update(resume=args.resume, device=args.device)
    return argparse.Namespace(**saved), state


def setup_distributed(args):
    """(world size, rank, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is the global batch: it must "
                         f"divide evenly among the {world} processes")
    if world == 1:
        return 1, 0, runtime.pick_device(args.device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = runtime.pick_device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return world, rank, device


def invoked_as() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def open_run_folder(args, resumed, world: int, rank: int) -> tuple[Path, list[str]]:
    """A new run folder (or the resumed one), and the commands that made the run: the
    first, then each --resume."""
    invocation = invoked_as()
    if world > 1:
        invocation = f"torchrun --nproc_per_node {world} " + invocation[len("python "):]
    commands = json.loads(resumed.get("commands", '["(not recorded)"]')) if resumed else []
    commands.append(invocation)
    if resumed is not None:
        return Path(args.resume), commands
    run_dir = None
    if rank == 0:
        with runtime.exit_on(dataset.DataError):  # before making a folder: a wrong --data leaves nothing
            dataset.check_data(args.data)
        name = args.recipe + "".join(f"-no-{a}" for a in args.ablate)
        with exit_if_unwritable(Path(args.out)):
            run_dir = runtime.unique_dir(args.out, f"{runtime.timestamp()}_{name}_seed{args.seed}")
        atexit.register(remove_if_unfinished, run_dir)
    if world > 1:  # every process needs rank 0's folder name
        names = [str(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    return run_dir, commands


def log(rank: int, *args, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


def hardware(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------
# Data: a patient-grouped validation split, decoded once, augmented on tensors.
# ---------------------------------------------------------------------------------


def load_splits(args, recipe: dict, run_dir: Path | None, rank: int, saved=None):
    """{split: (images, labels)} for train, val (and cal), {split: patient ids}, the test
    files (not read yet), where validation came from and the split by file path (what a
    resumed run's state passes back as saved). Unusable files are skipped and listed."""
    with runtime.exit_on(dataset.DataError):
        dataset.check_data(args.data)
        if saved:
            files, val_source = saved_split(args, saved, rank)
        else:
            if saved is not None:  # the state of an older version, which did not record it
                log(rank, "note: this run's state has no saved split: rebuilt from its seed, "
                          "the same only if the data folder is unchanged")
            files, val_source = dataset.split_files(args, recipe)
        arrays, used, skipped = dataset.decode_splits(files, args.image_size, args.cache_dir or None,
                                                 resumed=bool(saved))
    if rank == 0 and run_dir is not None and saved is None:
        report_skipped(run_dir, skipped)
        with exit_if_unwritable(run_dir / "val_split.csv"):
            write_split_csv(run_dir / "val_split.csv", used)
    patients = {name: [dataset.patient_id(p) for p in ps] for name, (ps, _) in used.items()}
    split = {"source": val_source,
             "files": {name: [[str(p), int(y)] for p, y in zip(ps, ys)]
                       for name, (ps, ys) in used.items()},
             "skipped": saved["skipped"] if saved else [str(p) for p, _ in skipped]}
    return arrays, patients, dataset.list_labelled(Path(args.data) / "test"), val_source, split


def saved_split(args, saved: dict, rank: int) -> tuple[dict, str]:
    """A resumed run's own split, as split_files returns one, from the file paths its state
    recorded: refused when one of them is gone; files added to the data since are not used."""
    files = {name: ([Path(p) for p, _ in rows], [y for _, y in rows])
             for name, rows in saved["files"].items()}
    known = {p for paths, _ in files.values() for p in paths}
    gone = sorted(p for p in known if not p.is_file())
    if gone:
        raise SystemExit(f"error: --resume: {len(gone)} file(s) of the run's split are gone, "
                         f"e.g. {runtime.display_name(gone[0])}: put them back, or start a new run")
    data = Path(args.data)
    listed = [p for folder in (data / "train", data / "val") if folder.is_dir()
              for p in dataset.list_labelled(folder)[0]]
    added = set(listed) - known - {Path(p) for p in saved["skipped"]}
    if added:
        log(rank, f"note: {len(added)} file(s) added to {runtime.display_name(data)} since the run "
                  "started are not used: a resumed run keeps the split it started with")
    return files, saved["source"]


def report_skipped(run_dir: Path, skipped):
    """Name each unusable file on the console and in skipped_files.txt; training goes on."""
    if not skipped:
        return
    lines = [f"{runtime.display_name(p)}: {reason}" for p, reason in skipped]
    for line in lines:
        print(f"skipped: {line}", file=sys.stderr)
    with open(run_dir / "skipped_files.txt", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    listed = runtime.display_name(run_dir / "skipped_files.txt")
    print(f"Skipped {len(lines)} unusable file(s), listed in {listed}")


def write_split_csv(path, used: dict):
    """Which file went to which split (train, val, cal), with its label and patient; the
    file as an absolute path, so that the split is found from any working folder. Code
    reads the file back (visualize_results.py --split val), so the path is stored exactly,
    bytes that are not UTF-8 included (surrogateescape), and not escaped: being absolute, it
    never starts like a spreadsheet formula. The patient (a file stem) is written as
    display_name shows it, through csv_cell."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["split", "label", "patient", "file"])
        for split, (ps, ls) in used.items():
            for p, y in zip(ps, ls):
                patient = runtime.csv_cell(runtime.display_name(dataset.patient_id(p)))
                w.writerow([split, network.CLASS_NAMES[y], patient, os.path.abspath(p)])


class XrayArrays(Dataset):
    """Decoded uint8 images plus labels; augmentation runs on tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).unsqueeze(0)  # (1, H, W) uint8
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


def train_transform(recipe: dict, size: int):
    """Per-image equalisation (recipes with intensity "equalize"), then the recipe's
    augmentations.

    Equalisation comes first, so the contrast jitter and the black corners of a rotation
    come after it: training inputs are not exactly equalised, while prediction inputs
    are (network.model_input)."""
    equalize = [v2.Lambda(network.equalize)] if recipe["intensity"] == "equalize" else []
    return v2.Compose(equalize + [AUGMENTATIONS[name][1](size) for name in recipe["augment"]])


def make_loader(x_train, y_train, recipe, args, world, rank, device):
    """The shuffled, augmented training loader (a DistributedSampler under torchrun).

    The order and the augmentations of an epoch come from loader_gen alone (saved with
    every epoch), so a resumed run repeats them exactly: with --workers, each epoch starts
    new workers seeded from it (persistent workers would carry their random state across
    epochs, which a resumed run cannot restore)."""
    train_set = XrayArrays(x_train, y_train, train_transform(recipe, args.image_size))
    loader_gen = torch.Generator().manual_seed(args.seed)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) \
        if world > 1 else None
    loader = DataLoader(train_set, batch_size=args.batch_size // world,
                        shuffle=sampler is None, sampler=sampler, generator=loader_gen,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=runtime.die_with_parent)
    return loader, sampler, loader_gen


# ---------------------------------------------------------------------------------
# Model, loss, optimiser, schedule.
# ---------------------------------------------------------------------------------


def make_model(args, device):
    with runtime.exit_on(network.WeightsUnavailable):
        model, weight_source = network.build_model(pretrained=not args.no_pretrained)
    return model.to(device).to(memory_format=torch.channels_last), weight_source


def wrap_distributed(model, world: int, device):
    """Under torchrun, DDP averages the gradients of all processes at every step."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def make_optimisation(recipe: dict, model, y_train, steps_per_epoch: int, lr: float,
                      epochs: int):
    """Loss, optimiser and scheduler of the recipe."""
    weights = None
    if recipe["class_weights"]:
        counts = np.bincount(y_train, minlength=2)
        weights = torch.tensor(len(y_train) / (2.0 * counts), dtype=torch.float32,
                               device=next(model.parameters()).device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=recipe["label_smoothing"])
    if recipe["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr,
                                     weight_decay=recipe["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr,
                                      weight_decay=recipe["weight_decay"])
    if recipe["schedule"] == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=recipe["select_mode"], factor=0.5, patience=2)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(steps_per_epoch, steps_per_epoch * epochs))
    return criterion, optimizer, scheduler


def warmup_cosine(warmup: int, total: int):
    """Learning-rate factor per step: linear warm-up, then cosine decay to 0."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def is_better(score: float, best: float, mode: str) -> bool:
    """Strictly better: on a tie the earlier epoch is kept."""
    return score > best if mode == "max" else score < best


# ---------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation.
# ---------------------------------------------------------------------------------


def train_one_epoch(model, loader, criterion, optimizer, device, amp, rank, epoch, epochs,
                    step_scheduler=None):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    with ctrl_c_held():  # the DataLoader's workers start (see exit_on_ctrl_c)
        batches = iter(loader)
    bar = tqdm(batches, desc=f"Epoch {epoch}/{epochs} [train]", unit="batch",
               total=len(loader), disable=rank != 0, leave=False)
    for x, y in bar:
        stop_if_interrupted()
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
    with ctrl_c_held():  # and stop, in finalisers
        del bar, batches
    return total_loss / seen, correct / seen


def evaluate(model, images, labels, intensity="none", calibration=None, desc=None) -> dict:
    """Validation loss (cross-entropy at temperature 1) and scoring.binary_metrics of (N, H, W)
    uint8 images: at the calibration's temperature and threshold, or argmax without one."""
    logits = network.predict_logits(model, images, intensity, desc=desc)
    cal = calibration or {"temperature": 1.0, "threshold": 0.5}
    p = network.probabilities(logits, cal["temperature"])
    m = scoring.binary_metrics(labels, p, cal["threshold"])
    loss = nn.functional.cross_entropy(logits, torch.as_tensor(labels)).item()
    return {**m, "val_loss": loss, "val_f1": m["f1"], "pred": scoring.decide(p, cal["threshold"])[0]}


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
# After training: the test split (once), the report (calibration and typicality: cc).
# ---------------------------------------------------------------------------------


def test_once(model, test_files, recipe, calibration, args, run_dir) -> tuple[dict, str]:
    """The test split's metrics and the published run's report, or a note when this is
    a development run that must not read it."""
    if args.ablate:
        return {}, ("Test split not read: development run (--ablate); "
                    "decide on validation, evaluate the final recipe once.\n")
    paths, labels = test_files
    x_test, kept, bad = dataset.decode_all(paths, args.image_size, args.cache_dir or None, "test")
    report_skipped(run_dir, bad)
    y_test = np.array([labels[i] for i in kept], dtype=np.int64)
    test = evaluate(model, x_test, y_test, recipe["intensity"], calibration, desc="test")
    cm = confusion_matrix(y_test, test["pred"], labels=[0, 1])
    recalls = cm.diagonal() / np.maximum(cm.sum(1), 1)
    report = classification_report(y_test, test["pred"], labels=[0, 1],
                                   target_names=network.CLASS_NAMES, digits=4, zero_division=0)
    text = (f"Test Accuracy: {test['accuracy'] * 100:.2f}%\n\n"
            f"Classification Report:\n{report}\n"
            f"Confusion Matrix (rows: true {network.CLASS_NAMES}, columns: predicted):\n{cm}\n"
            f"Test ROC AUC: {test['auc']:.4f}\n")
    return {"test_acc": test["accuracy"], "test_auc": test["auc"], "test_f1": test["f1"],
            "test_confusion": cm.tolist(), "test_recall_normal": float(recalls[0]),
            "test_recall_pneumonia": float(recalls[1])}, text


def write_outputs(run_dir: Path, best, meta, history, test_text, typicality):
    """The checkpoint, the history, the plot and the results text, then the resumable
    state is no longer needed (until then a file that cannot be written stops the run
    with one line, and --resume writes them all again)."""
    ts = runtime.timestamp()
    best_h = history[best["epoch"] - 1]
    lines = [f"Command: {meta['command']}", *(f"Resumed with: {c}" for c in meta["resumed_with"]),
             f"Recipe: {meta['recipe']}, seed {meta['seed']}",
             f"Hardware: {meta['hardware']} x {meta['processes']}",
             f"Wall time: {meta['wall_seconds']:.0f} s", f"Validation: {meta['validation']}",
             f"Best epoch ({meta['recipe_details']['selection']}): {best['epoch']} "
             f"(F1 {best_h['val_f1']:.4f}, AUC {best_h['val_auc']:.4f})",
             f"Calibration: {json.dumps(meta['calibration'])}", ""]
    lines += [f"Epoch {h['epoch']}: train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f} | "
              f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f} F1 {h['val_f1']:.4f} "
              f"AUC {h['val_auc']:.4f} | lr {h['lr']:.2e} | {h['seconds']:.0f} s"
              for h in history]
    writes = {
        "mobilenet_cxr.pth": lambda p: checkpoints.save_checkpoint(p, best["state"], meta, typicality),
        f"training_history_{ts}.json": lambda p: p.write_text(
            json.dumps({"meta": meta, "history": history}, indent=2)),
        f"training_plot_{ts}.png": lambda p: save_plot(history, p),
        f"training_results_{ts}.txt": lambda p: p.write_text(
            "\n".join(lines) + "\n\n" + test_text),
    }
    for name, write in writes.items():
        with exit_if_unwritable(run_dir / name, run_dir), ctrl_c_held():
            write(run_dir / name)
    (run_dir / "last_state.pth").unlink(missing_ok=True)
    print(f"Saved {runtime.display_name(run_dir / 'mobilenet_cxr.pth')} and reports in "
          f"{runtime.display_name(run_dir)}/ ({meta['wall_seconds'] / 60:.1f} min)")


def save_plot(history, path):
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    axes[0].set_title("Loss")
    axes[1].plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    axes[1].plot(epochs, [h["val_acc"] for h in history], "o-", label="validation")
    axes[1].set_title("Accuracy")
    axes[2].plot(epochs, [h["val_f1"] for h in history], "o-", label="val F1")
    axes[2].plot(epochs, [h["val_auc"] for h in history], "o-", label="val ROC AUC")
    axes[2].set_title("Validation F1 and AUC")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------
# Resumable state (written atomically after every epoch) and DDP's consistency check.
# ---------------------------------------------------------------------------------


def save_state(run_dir, model, optimizer, scheduler, epoch, history, best, loader_gen, args,
               commands, split):
    state = {
        "commands": json.dumps(commands),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": json.dumps(history),
        "best_score": best["score"],
        "best_epoch": best["epoch"],
        "best_state": best["state"],
        "torch_rng": torch.get_rng_state(),
        "loader_rng": loader_gen.get_state(),
        "args": json.dumps(vars(args)),
        "split": json.dumps(split),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with exit_if_unwritable(run_dir / "last_state.pth", run_dir), ctrl_c_held():
        runtime.write_atomic(run_dir / "last_state.pth", lambda f: torch.save(state, f))


def resume_hint(run_dir: Path) -> str:
    """What an interrupted run leaves: the command that continues it, or nothing."""
    if (run_dir / "last_state.pth").is_file():
        return (f"the last saved epoch is kept: continue with python train_cxray.py --resume "
                f"{shlex.quote(runtime.display_name(run_dir))}")
    return "no epoch was saved, so there is nothing to resume"


@contextlib.contextmanager
def exit_if_unwritable(path: Path, run_dir: Path | None = None):
    """A file that cannot be written (disk full, quota, read-only, permissions): one line
    naming it, and what the run keeps, instead of a traceback. write_atomic leaves the
    file's previous version as it was; torch.save reports the OSError as the context of
    a RuntimeError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        err = e if isinstance(e, OSError) else e.__context__
        if not isinstance(err, OSError):
            raise
        raise SystemExit(f"error: cannot write {runtime.display_name(path)} ({err.strerror or err})"
                         + (f"; {resume_hint(run_dir)}" if run_dir else "")) from None


CTRL_C = {"pressed": False, "held": 0, "said": False, "run_dir": None, "rank": 0}


def exit_on_ctrl_c(run_dir: Path | None = None, rank: int = 0):
    """From now on Ctrl-C stops the run with one line (no traceback) and exit status 130.

    Python drops an exception raised in a fork hook or a finaliser, so DataLoader workers
    start and stop with Ctrl-C held (ctrl_c_held), and each batch checks for it too. The
    workers inherit the handler: they get KeyboardInterrupt, which they expect. A process
    started with Ctrl-C ignored (nohup, a background job) keeps ignoring it, as Python does."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    CTRL_C.update(run_dir=run_dir, rank=rank)
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:
            raise KeyboardInterrupt
        CTRL_C["pressed"] = True
        if not CTRL_C["held"]:
            stop_if_interrupted()
    signal.signal(signal.SIGINT, stop)


def stop_if_interrupted():
    """After a Ctrl-C: the one line saying what the run leaves, and exit status 130."""
    if not CTRL_C["pressed"]:
        return
    if CTRL_C["rank"] == 0 and not CTRL_C["said"]:
        run_dir = CTRL_C["run_dir"]
        print(f"\nInterrupted: {resume_hint(run_dir) if run_dir else 'nothing was saved'}",
              file=sys.stderr, flush=True)
        CTRL_C["said"] = True
    raise SystemExit(128 + signal.SIGINT)


@contextlib.contextmanager
def ctrl_c_held():
    """A Ctrl-C pressed during the block takes effect after it."""
    CTRL_C["held"] += 1
    try:
        yield
    finally:
        CTRL_C["held"] -= 1
    stop_if_interrupted()


def load_state(run_dir: Path):
    path = run_dir / "last_state.pth"
    name = runtime.display_name(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"error: --resume: {name} "
                         f"{'is not a folder' if run_dir.exists() else 'not found'}")
    if (run_dir / "mobilenet_cxr.pth").is_file() and not path.is_file():
        raise SystemExit(f"error: --resume: {name} is a finished run (it has mobilenet_cxr.pth): "
                         "nothing to resume")
    if not path.is_file():
        raise SystemExit(f"error: --resume: {name} has no last_state.pth: not a run folder, or "
                         "a run stopped before its first epoch was saved")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        json.loads(state["args"])
        missing = {"epoch", "model", "optimizer", "scheduler", "history", "best_state"} - set(state)
        if missing:
            raise KeyError(sorted(missing)[0])
        return state
    except Exception as e:  # noqa: BLE001 - any damage to the file: one line, no traceback
        raise SystemExit(f"error: --resume: {runtime.display_name(path)} is damaged and cannot be resumed "
                         f"({type(e).__name__}); start the run again") from None


def restore(resumed, model, optimizer, scheduler, loader_gen, recipe, rank):
    """(history, best so far, first epoch to run): fresh, or from a resumed state."""
    if resumed is None:
        worst = -math.inf if recipe["select_mode"] == "max" else math.inf
        return [], {"score": worst, "epoch": 0, "state": None}, 1
    model.load_state_dict(resumed["model"])
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    torch.set_rng_state(resumed["torch_rng"])
    loader_gen.set_state(resumed["loader_rng"])
    if "cuda_rng" in resumed and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resumed["cuda_rng"])
    best = {"score": resumed["best_score"], "epoch": resumed["best_epoch"],
            "state": resumed["best_state"]}
    log(rank, f"Resuming after epoch {resumed['epoch']} (best so far: epoch {best['epoch']})")
    return json.loads(resumed["history"]), best, resumed["epoch"] + 1


def remove_if_unfinished(run_dir: Path):
    """A new run that stopped before saving its first epoch leaves no folder behind."""
    if run_dir.is_dir() and not any((run_dir / n).exists()
                                    for n in ("mobilenet_cxr.pth", "last_state.pth")):
        shutil.rmtree(run_dir, ignore_errors=True)


def check_replicas_in_sync(model, world: int, rank: int):
    """DDP must leave every process with the same parameters (a missing wrapper would
    let each process train on its own shard): compare hashes, refuse to save if not."""
    flat = torch.cat([p.detach().float().cpu().flatten() for p in model.parameters()])
    digests = [None] * world
    dist.all_gather_object(digests, hashlib.sha256(flat.numpy().tobytes()).hexdigest())
    if len(set(digests)) != 1:
        raise SystemExit(f"error: DDP processes ended with different weights "
                         f"({len(set(digests))} distinct): not saving a checkpoint")
    log(rank, f"DDP: weights identical on all {world} processes")


if __name__ == "__main__":
    sys.exit(main())
