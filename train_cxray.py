#!/usr/bin/env python3
"""Step 2 of 4: fine-tune an ImageNet MobileNetV2 to tell NORMAL from PNEUMONIA.

The defaults reproduce the published reference run: 224 px, flips / rotation / jitter,
Adam 1e-4, batch 16, 8 epochs, ReduceLROnPlateau on validation F1, and the checkpoint
of the best validation F1. The test split is read once, at the very end.

    python train_cxray.py                      # the reference run on chest_xray/
    python train_cxray.py --seed 2 --out runs  # another seed
    torchrun --nproc_per_node 2 train_cxray.py # several processes (DDP)
    python train_cxray.py --resume runs/<run>  # continue an interrupted run

Each run writes a new folder runs/<timestamp>_<recipe>_seed<N>/ holding
mobilenet_cxr.pth, training_results_<ts>.txt, training_history_<ts>.json,
training_plot_<ts>.png and val_split.csv.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cxr_common as cc  # noqa: E402

RECIPES = {
    # The published reference run, unchanged.
    "reference": {
        "epochs": 8,
        "batch_size": 16,
        "lr": 1e-4,
        "optimizer": "Adam",
        "scheduler": "ReduceLROnPlateau(mode=max on val F1, factor=0.5, patience=2)",
        "augment": "RandomHorizontalFlip, RandomRotation(10), ColorJitter(brightness=0.1)",
        "intensity": "none",
        "loss": "CrossEntropyLoss",
        "selection": "best validation F1 (PNEUMONIA positive)",
        "calibration": "none: argmax (threshold 0.5), temperature 1",
    },
    # What fixes the normal-recall collapse: see README, "Beating the reference".
    "improved": {
        "epochs": 8,
        "batch_size": 32,
        "lr": 3e-4,
        "optimizer": "AdamW(weight_decay=0.01)",
        "scheduler": "linear warm-up for 1 epoch, then cosine decay to 0 (per step)",
        "augment": "RandomResizedCrop(scale 0.7-1, ratio 0.85-1.15), RandomHorizontalFlip, "
                   "RandomRotation(10), ColorJitter(brightness=0.3, contrast=0.3)",
        "intensity": "equalize",
        "loss": "CrossEntropyLoss(class-balanced weights, label_smoothing=0.1)",
        "selection": "lowest validation loss",
        "calibration": "temperature (min NLL) and threshold (highest with sensitivity >= "
                       f"{0.97}) fitted on the validation split under simulated acquisition "
                       "shift; uncertain band between the sensitivity-0.995 and "
                       "specificity-0.995 thresholds",
    },
}
# For the ablation table: the improved recipe minus one component, that component
# replaced by the reference's choice (python train_cxray.py --recipe improved --ablate X).
ABLATIONS = {
    "equalize": "no per-image histogram equalisation (intensity 'none', as the reference)",
    "augment": "the reference augmentation (flip, rotation 10, brightness 0.1)",
    "loss": "plain cross-entropy (no class weights, no label smoothing)",
}
# Candidate additions, measured on validation before any recipe adopts them
# (python train_cxray.py --recipe improved --add X --skip-test).
ADDITIONS = {
    "noise": "Gaussian sensor noise (sd 0.05 of the range, ~13 grey levels) on half the "
             "images, before equalisation",
}
TARGET_SENSITIVITY = 0.97
BAND_LEVEL = 0.995
STRESS_COPIES = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fine-tune MobileNetV2 on chest X-rays (NORMAL vs PNEUMONIA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="chest_xray", help="folder with train/ [val/] test/")
    p.add_argument("--out", default="runs", type=cc.folder_or_new,
                   help="parent folder of the run folders")
    p.add_argument("--recipe", default="reference", choices=sorted(RECIPES))
    p.add_argument("--epochs", type=cc.positive_int, help="default: the recipe's (reference: 8)")
    p.add_argument("--batch-size", type=cc.positive_int,
                   help="global batch size (reference: 16)")
    p.add_argument("--lr", type=cc.positive_float, help="learning rate (reference: 1e-4)")
    p.add_argument("--image-size", type=cc.positive_int, default=cc.IMAGE_SIZE)
    p.add_argument("--val-fraction", type=cc.open_fraction, default=0.1,
                   help="patient-grouped validation share of train/ when there is no val/")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=cc.nonnegative_int, default=0,
                   help="DataLoader worker processes")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast; auto = on for CUDA only")
    p.add_argument("--no-pretrained", action="store_true",
                   help="start from random weights instead of ImageNet")
    p.add_argument("--cache-dir", default=".cache",
                   help="where decoded uint8 arrays are kept ('' to disable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--skip-test", action="store_true",
                   help="do not read the test split (development runs; implied by --ablate, --add)")
    p.add_argument("--ablate", action="append", default=[], choices=sorted(ABLATIONS),
                   help="improved recipe without this component (repeatable; ablation runs)")
    p.add_argument("--add", action="append", default=[], choices=sorted(ADDITIONS),
                   help="improved recipe plus this candidate (repeatable; validation runs)")
    args = p.parse_args(argv)
    if (args.ablate or args.add) and args.recipe != "improved":
        p.error("--ablate and --add change the improved recipe: use them with --recipe improved")
    if args.image_size < 32:
        p.error(f"--image-size {args.image_size}: MobileNetV2 needs at least 32 px")
    recipe = RECIPES[args.recipe]
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    return args


# ---------------------------------------------------------------------------------
# Distributed set-up (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK).
# ---------------------------------------------------------------------------------


def setup_distributed(device_name: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, cc.pick_device(device_name)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return world, rank, device


def log(rank: int, *args, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------
# Data: a patient-grouped validation split, decoded once, augmented on tensors.
# ---------------------------------------------------------------------------------


def grouped_split(paths, labels, val_fraction: float, seed: int):
    """Stratified by class, grouped by patient: no patient on both sides."""
    n_splits = max(2, round(1 / val_fraction))
    groups = [cc.patient_id(p) for p in paths]
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def check_data(args):
    """The training folder exists and holds both classes (one line otherwise)."""
    data = Path(args.data)
    if not (data / "train").is_dir():
        raise SystemExit(
            f"error: {data}/train not found: run download_dataset.py first (or pass --data)"
        )
    require_both_classes(cc.list_labelled(data / "train")[1], f"{data}/train")


def load_splits(args, run_dir: Path, rank: int):
    data = Path(args.data)
    check_data(args)
    train_paths, train_labels = cc.list_labelled(data / "train")
    if (data / "val").is_dir() and cc.list_labelled(data / "val")[0]:
        val_paths, val_labels = cc.list_labelled(data / "val")
        val_source = f"{data}/val"
    else:
        tr, va = grouped_split(train_paths, train_labels, args.val_fraction, args.seed)
        val_paths = [train_paths[i] for i in va]
        val_labels = [train_labels[i] for i in va]
        train_paths = [train_paths[i] for i in tr]
        train_labels = [train_labels[i] for i in tr]
        val_source = f"patient-grouped {args.val_fraction:.0%} of {data}/train, seed {args.seed}"
    test_paths, test_labels = cc.list_labelled(data / "test")
    cache = args.cache_dir or None
    splits, skipped = {}, []
    for name, paths, labels in (("train", train_paths, train_labels),
                                ("val", val_paths, val_labels)):
        images, kept, bad = cc.decode_all(paths, args.image_size, cache, name)
        splits[name] = (images, np.array([labels[i] for i in kept], dtype=np.int64),
                        [paths[i] for i in kept])
        skipped += bad
        require_both_classes(splits[name][1], f"the {name} split")
    if rank == 0:
        report_skipped(run_dir, skipped)
        (_, y_tr, p_tr), (_, y_va, p_va) = splits["train"], splits["val"]
        write_split_csv(run_dir / "val_split.csv", p_tr, y_tr, p_va, y_va)
    splits = {k: v[:2] for k, v in splits.items()}
    return splits, (test_paths, test_labels), val_source


def require_both_classes(labels, where: str):
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(cc.CLASS_NAMES))
    empty = [cc.CLASS_NAMES[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise SystemExit(f"error: {where} has no usable {' or '.join(empty)} images: a "
                         "classifier needs examples of both classes")


def report_skipped(run_dir: Path, skipped):
    """Name each unusable file on the console and in skipped_files.txt; training goes on."""
    if not skipped:
        return
    lines = [f"{cc.display_name(p)}: {reason}" for p, reason in skipped]
    for line in lines:
        print(f"skipped: {line}", file=sys.stderr)
    with open(run_dir / "skipped_files.txt", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"Skipped {len(lines)} unusable file(s), listed in {run_dir / 'skipped_files.txt'}")


def write_split_csv(path, train_paths, train_labels, val_paths, val_labels):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "label", "patient", "file"])
        for split, ps, ls in (("train", train_paths, train_labels), ("val", val_paths, val_labels)):
            for p, y in zip(ps, ls):
                w.writerow([split, cc.CLASS_NAMES[y], cc.patient_id(p), cc.display_name(p)])


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


def train_transform(recipe: str, size: int, ablate=(), add=()):
    reference = [
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.1),
    ]
    if recipe == "reference":
        return v2.Compose(reference)
    stronger = [
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.3, contrast=0.3),
    ]
    # the same per-image equalisation as at prediction time
    equalize = [] if "equalize" in ablate else [v2.Lambda(cc.equalize)]
    noise = [v2.RandomApply([v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=0.05),
                             v2.ToDtype(torch.uint8, scale=True)], p=0.5)] \
        if "noise" in add else []  # v2.GaussianNoise: torchvision >= 0.20
    return v2.Compose(noise + equalize + (reference if "augment" in ablate else stronger))


def recipe_of(args) -> dict:
    """The recipe's settings as run, with any --ablate replacements written in."""
    recipe = dict(RECIPES[args.recipe])
    ablate, add = args.ablate, args.add
    if "equalize" in ablate:
        recipe["intensity"] = "none"
    if "augment" in ablate:
        recipe["augment"] = RECIPES["reference"]["augment"]
    if "loss" in ablate:
        recipe["loss"] = RECIPES["reference"]["loss"]
    if ablate:
        recipe["ablated"] = {a: ABLATIONS[a] for a in ablate}
    if add:
        recipe["augment"] += "; plus " + "; ".join(ADDITIONS[a] for a in add)
        recipe["added"] = {a: ADDITIONS[a] for a in add}
    return recipe


def stress_transform(size: int):
    """Simulated acquisition shift for calibration: exposure, contrast, gamma, field of
    view, blur. Applied to validation images only (never to test)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.4, contrast=0.4),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.5),
        v2.Lambda(lambda x: v2.functional.adjust_gamma(
            x, float(torch.empty(1).uniform_(0.6, 1.6)))),
    ])


def stressed_copies(images: np.ndarray, labels: np.ndarray, copies: int, seed: int):
    """copies x len(images) perturbed versions of the validation images (fixed seed)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed + 1000)
    t = stress_transform(images.shape[-1])
    out = np.stack([t(torch.from_numpy(im)[None])[0].numpy()
                    for _ in range(copies) for im in images])
    torch.set_rng_state(state)
    return out, np.tile(labels, copies)


def fit_calibration(logits: torch.Tensor, labels: np.ndarray) -> dict:
    """Temperature by minimum NLL on a grid; threshold and uncertain band by the rules
    in RECIPES['improved']['calibration']. Validation data only."""
    y = torch.as_tensor(labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))
    nll = [nn.functional.cross_entropy(logits / t, y).item() for t in grid]
    temperature = float(grid[int(np.argmin(nll))])
    p = (logits / temperature).softmax(1)[:, 1].numpy()
    pos, neg = np.sort(p[labels == 1]), np.sort(p[labels == 0])
    threshold = float(pos[int(np.floor((1 - TARGET_SENSITIVITY) * len(pos)))])
    lo = float(pos[int(np.floor((1 - BAND_LEVEL) * len(pos)))])
    hi = float(np.nextafter(neg[min(len(neg) - 1, int(np.ceil(BAND_LEVEL * len(neg))) - 1)], 1))
    band = [min(lo, threshold), max(hi, threshold)]
    return {"temperature": temperature, "threshold": threshold, "uncertain_band": band,
            "nll_at_temperature": float(min(nll)), "nll_at_1": float(
                nn.functional.cross_entropy(logits, y).item())}


# ---------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation.
# ---------------------------------------------------------------------------------


def autocast(device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_one_epoch(model, loader, criterion, optimizer, device, amp, rank, epoch, epochs,
                    step_scheduler=None):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"Epoch {epoch}/{epochs} [train]", unit="batch",
               disable=rank != 0, leave=False)
    for x, y in bar:
        x = cc.normalize_batch(x.to(device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
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
    return total_loss / seen, correct / seen


@torch.no_grad()
def predict_logits(model, images_u8: np.ndarray, device, amp=False, batch_size=64, desc=None,
                   intensity="none"):
    """Logits for (N, H, W) uint8 images, in order."""
    model.eval()
    out = []
    starts = range(0, len(images_u8), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        x = torch.from_numpy(images_u8[s:s + batch_size]).unsqueeze(1).to(device)
        x = cc.model_input(x, intensity).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(cc.CLASS_NAMES))


def evaluate(model, images, labels, device, amp, intensity="none", desc=None, batch_size=64,
             calibration=None):
    """Loss, accuracy, F1, AUC of (N, H, W) uint8 images. With a calibration, predictions
    use its temperature and threshold; without, argmax."""
    logits = predict_logits(model, images, device, amp, batch_size, desc, intensity)
    y = torch.as_tensor(labels)
    loss = nn.functional.cross_entropy(logits, y).item()
    if calibration is None:
        prob = logits.softmax(1)[:, 1].numpy()
        pred = logits.argmax(1).numpy()
    else:
        prob = (logits / calibration["temperature"]).softmax(1)[:, 1].numpy()
        pred = (prob >= calibration["threshold"]).astype(int)
    auc = roc_auc_score(labels, prob) if len(set(labels.tolist())) == 2 else float("nan")
    return {
        "loss": loss,
        "acc": accuracy_score(labels, pred),
        "f1": f1_score(labels, pred, zero_division=0),
        "auc": float(auc),
        "pred": pred,
        "prob": prob,
        "logits": logits,
    }


def make_optimisation(args, model, y_train, steps_per_epoch, device):
    """Loss, optimiser and scheduler of the recipe. Returns (criterion, optimizer,
    scheduler, whether the scheduler steps every batch)."""
    if args.recipe == "reference":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max",
                                                               factor=0.5, patience=2)
        return nn.CrossEntropyLoss(), optimizer, scheduler, False
    if "loss" in args.ablate:
        criterion = nn.CrossEntropyLoss()
    else:
        counts = np.bincount(y_train, minlength=2)
        weights = torch.tensor(len(y_train) / (2.0 * counts), dtype=torch.float32,
                               device=device)
        criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup, total = steps_per_epoch, steps_per_epoch * args.epochs

    def schedule(step):  # linear warm-up, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return criterion, optimizer, scheduler, True


# ---------------------------------------------------------------------------------
# Resumable state: written atomically after every epoch.
# ---------------------------------------------------------------------------------


def save_state(run_dir, model, optimizer, scheduler, epoch, history, best, loader_gen, args,
               commands):
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
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    cc.write_atomic(run_dir / "last_state.pth", lambda f: torch.save(state, f))


def load_state(run_dir: Path):
    path = run_dir / "last_state.pth"
    if not path.is_file():
        raise SystemExit(f"error: --resume: {path} not found (a finished run has none)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        json.loads(state["args"])
        return state
    except Exception as e:  # noqa: BLE001 - any damage to the file: one line, no traceback
        raise SystemExit(f"error: --resume: {path} is damaged and cannot be resumed "
                         f"({type(e).__name__}); start the run again") from None


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


# ---------------------------------------------------------------------------------
# Reports: console block, text file, history JSON, plot.
# ---------------------------------------------------------------------------------


def test_block(acc, labels, pred) -> str:
    cm = confusion_matrix(labels, pred, labels=[0, 1])
    report = classification_report(labels, pred, labels=[0, 1], target_names=cc.CLASS_NAMES,
                                   digits=4, zero_division=0)
    return (
        f"Test Accuracy: {acc * 100:.2f}%\n\n"
        f"Classification Report:\n{report}\n"
        f"Confusion Matrix (rows: true {cc.CLASS_NAMES}, columns: predicted):\n{cm}\n"
    )


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


def hardware(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    resume_dir = Path(args.resume) if args.resume else None
    resumed = None
    if resume_dir:
        resumed = load_state(resume_dir)
        saved = json.loads(resumed["args"])
        saved = {"ablate": [], "add": [], "skip_test": False, **saved}  # older run states
        saved.update(resume=args.resume, device=args.device, workers=args.workers)
        args = argparse.Namespace(**saved)
    world, rank, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is the global batch: it must "
                         f"divide evenly among the {world} processes")
    cc.tune_cpu_allocator()  # keeps freed tensor memory: faster CPU steps, see cxr_common
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    start = time.time()

    ts = cc.timestamp()
    if resume_dir:
        run_dir = resume_dir
    elif rank == 0:
        name = args.recipe + "".join(f"-no-{a}" for a in args.ablate) \
            + "".join(f"+{a}" for a in args.add)
        check_data(args)  # before making a folder: a wrong --data leaves nothing behind
        run_dir = cc.unique_dir(args.out, f"{ts}_{name}_seed{args.seed}")
        atexit.register(remove_if_unfinished, run_dir)
    if world > 1:  # every process needs rank 0's folder name
        names = [str(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    invocation = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if world > 1:
        invocation = f"torchrun --nproc_per_node {world} " + invocation[len("python "):]
    # the command that made the run, then each --resume that continued it
    commands = json.loads(resumed.get("commands", '["(not recorded)"]')) if resumed else []
    commands.append(invocation)
    command = commands[0]
    log(rank, f"Run folder: {run_dir}")
    log(rank, f"Device: {hardware(device)} x {world} process(es), bf16 autocast: {amp}")

    # Data
    splits, (test_paths, test_labels), val_source = load_splits(args, run_dir, rank)
    x_train, y_train = splits["train"]
    x_val, y_val = splits["val"]
    log(rank, f"Train: {len(y_train)} images ({np.bincount(y_train, minlength=2).tolist()} "
              f"NORMAL/PNEUMONIA), validation: {len(y_val)} ({val_source})")
    recipe = recipe_of(args)
    intensity = recipe["intensity"]
    skip_test = bool(args.skip_test or args.ablate or args.add)
    if recipe.get("ablated"):
        log(rank, f"Ablation: {'; '.join(recipe['ablated'].values())}")
    if recipe.get("added"):
        log(rank, f"Candidate addition: {'; '.join(recipe['added'].values())}")
    train_set = XrayArrays(x_train, y_train, train_transform(args.recipe, args.image_size,
                                                             args.ablate, args.add))
    loader_gen = torch.Generator().manual_seed(args.seed)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed) \
        if world > 1 else None
    loader = DataLoader(train_set, batch_size=args.batch_size // world,
                        shuffle=sampler is None, sampler=sampler, generator=loader_gen,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)

    # Model, loss, optimiser, scheduler
    try:
        model, weight_source = cc.build_model(pretrained=not args.no_pretrained)
    except cc.WeightsUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    log(rank, f"MobileNetV2 weights: {weight_source}")
    model = model.to(device).to(memory_format=torch.channels_last)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                              if device.type == "cuda" else None) \
        if world > 1 else model
    criterion, optimizer, scheduler, per_step = make_optimisation(args, model, y_train,
                                                                  len(loader), device)
    history, best, first_epoch = [], {"score": -np.inf, "epoch": 0, "state": None}, 1
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        history = json.loads(resumed["history"])
        best = {"score": resumed["best_score"], "epoch": resumed["best_epoch"],
                "state": resumed["best_state"]}
        torch.set_rng_state(resumed["torch_rng"])
        loader_gen.set_state(resumed["loader_rng"])
        if "cuda_rng" in resumed and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resumed["cuda_rng"])
        first_epoch = resumed["epoch"] + 1
        log(rank, f"Resuming after epoch {resumed['epoch']} (best so far: epoch "
                  f"{best['epoch']})")

    for epoch in range(first_epoch, args.epochs + 1):
        t0 = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loss, train_acc = train_one_epoch(net, loader, criterion, optimizer, device,
                                                amp, rank, epoch, args.epochs,
                                                scheduler if per_step else None)
        val = evaluate(model, x_val, y_val, device, amp, intensity)  # same on every rank
        if not per_step:
            scheduler.step(val["f1"])
        lr = optimizer.param_groups[0]["lr"]
        log(rank, f"\nEpoch {epoch}/{args.epochs}")
        log(rank, f"Train Loss: {train_loss:.4f}, Train Acc: {train_acc:.4f}")
        log(rank, f"Val Loss: {val['loss']:.4f}, Val Acc: {val['acc']:.4f}, "
                  f"Val F1: {val['f1']:.4f}, Val AUC: {val['auc']:.4f}")
        score = val["f1"] if recipe["selection"].startswith("best validation F1") else -val["loss"]
        if score > best["score"]:
            best = {"score": score, "epoch": epoch,
                    "state": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})}
            if args.recipe == "reference":
                log(rank, f"New best model saved with F1: {val['f1']:.4f}")
            else:
                log(rank, f"New best model saved with val loss: {val['loss']:.4f}")
        log(rank, f"Learning rate: {lr:.2e}")
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "val_loss": val["loss"], "val_acc": val["acc"], "val_f1": val["f1"],
                        "val_auc": val["auc"], "lr": lr, "seconds": time.time() - t0})
        if rank == 0:
            save_state(run_dir, model, optimizer, scheduler, epoch, history, best,
                       loader_gen, args, commands)
    if world > 1:
        check_replicas_in_sync(model, world, rank)
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return 0

    # The best checkpoint, its calibration (validation data only), then the test split,
    # read once.
    model.load_state_dict(best["state"])
    calibration = None
    if args.recipe != "reference":
        x_sv, y_sv = stressed_copies(x_val, y_val, STRESS_COPIES, args.seed)
        sv_logits = predict_logits(model, x_sv, device, amp, intensity=intensity)
        calibration = fit_calibration(sv_logits, y_sv)
        calibration["fitted_on"] = (f"{STRESS_COPIES} shifted copies of the {len(y_val)} "
                                    "validation images (stress_transform)")
        calibration["rule"] = recipe["calibration"]
        print(f"\nCalibration on shifted validation: temperature {calibration['temperature']:.3f},"
              f" threshold P(PNEUMONIA) >= {calibration['threshold']:.4f}, uncertain band "
              f"[{calibration['uncertain_band'][0]:.4f}, {calibration['uncertain_band'][1]:.4f})")
    val = evaluate(model, x_val, y_val, device, amp, intensity, calibration=calibration)
    metrics = {"best_epoch": best["epoch"], "val_f1": val["f1"], "val_acc": val["acc"],
               "val_auc": val["auc"]}
    if skip_test:
        test_text = ("Test split not read: development run (--skip-test, --ablate or --add); "
                     "decide on validation, evaluate the final recipe once.\n")
    else:
        x_test, kept, bad = cc.decode_all(test_paths, args.image_size, args.cache_dir or None,
                                          "test")
        report_skipped(run_dir, bad)
        y_test = np.array([test_labels[i] for i in kept], dtype=np.int64)
        test = evaluate(model, x_test, y_test, device, amp, intensity, desc="test",
                        calibration=calibration)
        cm = confusion_matrix(y_test, test["pred"], labels=[0, 1])
        recalls = cm.diagonal() / np.maximum(cm.sum(1), 1)
        metrics.update(
            test_acc=test["acc"], test_auc=test["auc"], test_f1=test["f1"],
            test_confusion=cm.tolist(), test_recall_normal=float(recalls[0]),
            test_recall_pneumonia=float(recalls[1]))
        test_text = (test_block(test["acc"], y_test, test["pred"])
                     + f"Test ROC AUC: {test['auc']:.4f}\n")
    wall = time.time() - start
    print("\n" + test_text, flush=True)

    meta = cc.base_meta(args.image_size, intensity)
    meta.update(recipe=args.recipe, recipe_details=recipe, ablate=args.ablate,
                add=args.add,
                seed=args.seed,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                weights=weight_source, validation=val_source, metrics=metrics,
                command=command, resumed_with=commands[1:], hardware=hardware(device),
                processes=world,
                wall_seconds=round(wall, 1), calibration=calibration)
    cc.save_checkpoint(run_dir / "mobilenet_cxr.pth", best["state"], meta)
    (run_dir / f"training_history_{ts}.json").write_text(
        json.dumps({"meta": meta, "history": history}, indent=2))
    save_plot(history, run_dir / f"training_plot_{ts}.png")
    with open(run_dir / f"training_results_{ts}.txt", "w") as f:
        f.write(f"Command: {command}\n"
                + "".join(f"Resumed with: {c}\n" for c in commands[1:])
                + f"Recipe: {args.recipe}, seed {args.seed}\n"
                f"Hardware: {hardware(device)} x {world}\nWall time: {wall:.0f} s\n"
                f"Validation: {val_source}\nBest epoch ({recipe['selection']}): "
                f"{best['epoch']} (F1 {val['f1']:.4f}, AUC {val['auc']:.4f})\n"
                f"Calibration: {json.dumps(calibration)}\n\n")
        for h in history:
            f.write(f"Epoch {h['epoch']}: train loss {h['train_loss']:.4f} acc "
                    f"{h['train_acc']:.4f} | val loss {h['val_loss']:.4f} acc "
                    f"{h['val_acc']:.4f} F1 {h['val_f1']:.4f} AUC {h['val_auc']:.4f} | "
                    f"lr {h['lr']:.2e} | {h['seconds']:.0f} s\n")
        f.write("\n" + test_text)
    (run_dir / "last_state.pth").unlink(missing_ok=True)
    print(f"Saved {run_dir / 'mobilenet_cxr.pth'} and reports in {run_dir}/ "
          f"({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
