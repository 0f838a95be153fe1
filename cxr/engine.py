"""The parts of training that are not the loop itself: the data splits (decoded once),
the Dataset of decoded arrays and its augmentations, the loader, the model, the loss,
optimiser and schedule of a recipe, the selection rule, the scores of logits, and the
probe recipe's training (the head alone, on features computed once).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2

from cxr import calib, dataset, network, recipes, runfiles, runstate, runtime, scoring


def load_splits(args, recipe: dict, run_dir: Path | None, rank: int, resumed=None):
    """{split: (images, labels)} for train, val (and cal), {split: patient ids}, the test
    files (not read yet), where validation came from and the split by file path (saved in
    the run's state: a resumed run keeps the split it started with). Unusable files are
    skipped and listed."""
    saved = None if resumed is None else json.loads(resumed.get("split", "{}"))
    with runtime.exit_on(dataset.DataError):
        dataset.check_data(args.data)
        if saved:
            files, val_source = saved_split(args, saved, rank)
        else:
            if saved is not None:  # the state of an older version, which did not record it
                runstate.log(rank, "note: this run's state has no saved split: rebuilt from its seed, "
                          "the same only if the data folder is unchanged")
            files, val_source = dataset.split_files(args, recipe)
        arrays, used, skipped = dataset.decode_splits(files, args.image_size, args.cache_dir or None,
                                                      resumed=bool(saved))
    if rank == 0 and run_dir is not None and saved is None:
        runfiles.report_skipped(run_dir, skipped)
        with runstate.exit_if_unwritable(run_dir / "val_split.csv"):
            runfiles.write_split_csv(run_dir / "val_split.csv", used)
    y_train = arrays["train"][1]
    runstate.log(rank, f"Train: {len(y_train)} images ({np.bincount(y_train, minlength=2).tolist()} "
                       f"NORMAL/PNEUMONIA), validation: {len(arrays['val'][1])} ({val_source})"
                       + (f", calibration: {len(arrays['cal'][1])}" if "cal" in arrays else ""))
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
        runstate.log(rank, f"note: {len(added)} file(s) added to {runtime.display_name(data)} since the run "
                  "started are not used: a resumed run keeps the split it started with")
    return files, saved["source"]


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
    return v2.Compose(equalize + [recipes.AUGMENTATIONS[name][1](size) for name in recipe["augment"]])


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


def make_model(recipe: dict, device):
    """MobileNetV2 with ImageNet weights (random ones for --ablate pretrained), in the
    channels-last memory format, and where its weights came from."""
    with runtime.exit_on(network.WeightsUnavailable):
        model, weight_source = network.build_model(pretrained=recipe["pretrained"])
    return model.to(device).to(memory_format=torch.channels_last), weight_source


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


def score_logits(logits: torch.Tensor, labels, calibration=None) -> dict:
    """Validation loss (cross-entropy at temperature 1) and scoring.binary_metrics of logits:
    at the calibration's temperature and threshold, or argmax without one."""
    cal = calibration or calib.Calibration()
    p = cal.probability([logits])
    m = scoring.binary_metrics(labels, p, cal.threshold)
    loss = nn.functional.cross_entropy(logits, torch.as_tensor(labels)).item()
    return {**m, "val_loss": loss, "val_f1": m["f1"], "pred": cal.decide(p)[0]}


# ---------------------------------------------------------------------------------
# The probe recipe (recipe["train"] == "head"): the head alone, on features computed once.
# ---------------------------------------------------------------------------------


def train_head(model, splits, recipe, args, rank, criterion, optimizer, scheduler):
    """Train the classifier head alone; the backbone keeps the weights it was built with.

    One inference pass computes the pooled 1280-d features of the training and validation
    images (eval mode: no augmentation, BatchNorm statistics unchanged); then each epoch
    is one shuffled pass over the training features in batches of args.batch_size, with
    the recipe's loss, optimiser and schedule (only the head has gradients, so only it
    moves), scored on the validation features; the epoch kept is the best by the recipe's
    selection metric, as in the epoch loop. Returns (history, best, first_epoch), the
    epoch loop's own variables, first_epoch past the last epoch: the loop does not run."""
    t0 = time.time()
    for p in model.features.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    feats = {}
    for name in ("train", "val"):
        images, labels = splits[name]
        _, f = network.predict_logits(model, images, recipe["intensity"], batch_size=16,
                                      desc=f"features: {name}" if rank == 0 else None, features=True)
        feats[name] = f.to(device), torch.as_tensor(labels, device=device)
    runstate.log(rank, f"Features of {sum(len(y) for _, y in feats.values())} training and validation "
                       f"images, computed once: {time.time() - t0:.0f} s")
    (f_train, y_train), (f_val, y_val) = feats["train"], feats["val"]
    head, select, gen = model.classifier, recipe["select"], torch.Generator().manual_seed(args.seed)
    history = []
    best = {"score": -math.inf if recipe["select_mode"] == "max" else math.inf, "epoch": 0, "state": None}
    for epoch in range(1, args.epochs + 1):
        runstate.stop_if_interrupted()
        head.train()  # its dropout, as in full training
        total_loss, correct = 0.0, 0
        for idx in torch.randperm(len(y_train), generator=gen).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            logits = head(f_train[idx])
            loss = criterion(logits, y_train[idx])
            loss.backward()
            optimizer.step()
            if recipe["schedule"] == "warmup_cosine":
                scheduler.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
        head.eval()
        with torch.no_grad():
            val = score_logits(head(f_val).float().cpu(), y_val.cpu().numpy())
        if recipe["schedule"] == "plateau":
            scheduler.step(val[select])
        improved = is_better(val[select], best["score"], recipe["select_mode"])
        if improved:
            best = {"score": val[select], "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append({"epoch": epoch, "train_loss": total_loss / len(y_train),
                        "train_acc": correct / len(y_train), "val_loss": val["val_loss"],
                        "val_acc": val["accuracy"], "val_f1": val["val_f1"], "val_auc": val["auc"],
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0})
        t0 = time.time()
        h = history[-1]
        runstate.log(rank, f"Epoch {epoch}/{args.epochs}: train loss {h['train_loss']:.4f} acc "
                           f"{h['train_acc']:.4f} | val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f} "
                           f"F1 {h['val_f1']:.4f} AUC {h['val_auc']:.4f}" + (" (best)" if improved else ""))
    return history, best, args.epochs + 1
