#!/usr/bin/env python3
"""Speed figures, each a ratio of two timings taken in this one run.

    python experiments/speed.py                    # CPU or GPU, whatever is here
    python experiments/speed.py --batches 20 --fullres ../shared/data/samples/fullres

1. Training: images/s of train_cxray.py's real loop (decoded-once uint8 arrays,
   augmentation on tensors, channels_last) divided by the same model and optimiser fed
   ready synthetic tensors (the bound); the seed-style loader (ImageFolder + PIL
   transforms, decoding JPEGs every epoch) beside it.
2. Prediction: predict.py's path on full-resolution JPEGs (worker decoding with
   Pillow's draft mode, batched inference) divided by the bare model on ready tensors.
   Also printed: the ceiling of that ratio if decoding and the network shared the cores
   perfectly, 1 / (1 + bare / (cores x decode rate of one core)).

A shared 2-core machine is noisy (two identical bound runs have differed by 25%), so
each pair is measured in --rounds interleaved rounds and the ratio of the medians is
reported beside the per-round ratios. Run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cxr import dataset, engine, intake, network, recipes, runstate, runtime  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description="Training and prediction speed ratios.")
    p.add_argument("--data", default=str(ROOT / "chest_xray"))
    p.add_argument("--fullres", default=str(ROOT.parent / "shared/data/samples/fullres"))
    p.add_argument("--batches", type=int, default=16, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of each pair")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="glibc's default malloc thresholds (as before runtime.tune_cpu_allocator)")
    p.add_argument("--skip-training", action="store_true", help="prediction figures only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(model, batches, optimizer, criterion, device, warmup, amp):
    """images/s of forward+backward+step over an iterable of (x_uint8_or_float, y)."""
    model.train()
    seen, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync(device)
            t0, seen = time.perf_counter(), 0
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = network.normalize_batch(x)
        x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x).float(), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - t0)


def limited(loader, n):
    for i, b in enumerate(loader):
        if i >= n:
            return
        yield b


def training(args, device, amp):
    paths, labels = dataset.list_labelled(Path(args.data) / "train")
    rng = np.random.default_rng(0)
    n = args.batch_size * (args.batches + args.warmup)
    idx = rng.choice(len(paths), size=min(len(paths), 4 * n), replace=False)
    sub = [paths[i] for i in idx]
    arrays, kept, _ = dataset.decode_all(sub, 224, ROOT / ".cache", "speed")
    y = np.array([labels[idx[i]] for i in kept])
    model, _ = network.build_model(pretrained=False)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    crit = torch.nn.CrossEntropyLoss()
    steps = args.batches + args.warmup

    synthetic = [(torch.randn(args.batch_size, 3, 224, 224),
                  torch.randint(0, 2, (args.batch_size,))) for _ in range(4)]
    transform = engine.train_transform(recipes.recipe_for("reference"), 224)
    loader = DataLoader(engine.XrayArrays(arrays, y, transform),
                        batch_size=args.batch_size, shuffle=True,
                        pin_memory=device.type == "cuda")
    bounds, reals = [], []
    for _ in range(args.rounds):  # interleaved, so that drifts hit both alike
        bounds.append(timed_steps(model, (synthetic[i % 4] for i in range(steps)), opt, crit,
                                  device, args.warmup, amp))
        reals.append(timed_steps(model, limited(loader, steps), opt, crit, device,
                                 args.warmup, amp))
    seed_tf = transforms.Compose([
        transforms.Resize((224, 224)), transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(10), transforms.ColorJitter(brightness=0.1),
        transforms.ToTensor(), transforms.Normalize(network.IMAGENET_MEAN, network.IMAGENET_STD)])
    folder = datasets.ImageFolder(str(Path(args.data) / "train"), transform=seed_tf)
    seed_loader = DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=2)
    seed = timed_steps(model, limited(seed_loader, steps), opt, crit, device, args.warmup, amp)
    return bounds, reals, seed


def prediction(args, device):
    files = sorted(Path(args.fullres).glob("*.jp*g"))
    if not files:
        return None
    files = (files * 20)[:320]
    model, _ = network.build_model(pretrained=False)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    members = [(model, {"preprocessing": {"intensity": "none"}})]
    bs = args.batch_size
    ready = torch.randint(0, 255, (bs, 224, 224), dtype=torch.uint8).numpy()

    def bare_rate():
        with torch.no_grad():
            network.ensemble_probability(members, ready, [1.0], bs)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(len(files) // bs):
                network.ensemble_probability(members, ready, [1.0], bs)
            sync(device)
        return len(files) // bs * bs / (time.perf_counter() - t0)

    def end_to_end_rate():  # predict.py's loader and inference, minus the printing
        loader = DataLoader(intake.FileImages(files, 224), batch_size=bs, num_workers=1,
                            collate_fn=intake.collate)
        n = 0
        with torch.no_grad():
            for b, items in enumerate(loader):
                if b == 1:  # the first batch pays for the worker's start-up
                    t0, n = time.perf_counter(), 0
                network.ensemble_probability(members, np.stack([a for _, a, _ in items]), [1.0], bs)
                n += len(items)
        sync(device)
        return n / (time.perf_counter() - t0)

    bares, e2es = [], []
    for _ in range(args.rounds):
        bares.append(bare_rate())
        e2es.append(end_to_end_rate())
    t0 = time.perf_counter()
    for f in files[:32]:
        dataset.load_image_array(f, 224)
    draft = 32 / (time.perf_counter() - t0)
    from PIL import Image
    t0 = time.perf_counter()
    for f in files[:32]:
        Image.open(f).convert("L").resize((224, 224), Image.Resampling.BILINEAR)
    full = 32 / (time.perf_counter() - t0)
    return bares, e2es, draft, full


def pair(name_a, a, name_b, b, unit="img/s"):
    """Medians of two interleaved series, their ratio and the per-round ratios."""
    ma, mb = float(np.median(a)), float(np.median(b))
    rounds = " ".join(f"{x / y:.2f}" for x, y in zip(b, a))
    print(f"  {name_a:<29}: {ma:7.1f} {unit} (rounds: {' '.join(f'{x:.1f}' for x in a)})")
    print(f"  {name_b:<29}: {mb:7.1f} {unit} (rounds: {' '.join(f'{x:.1f}' for x in b)})")
    print(f"  ratio of medians             : {mb / ma:7.2f}      (per round: {rounds})")
    return mb / ma


def main():
    args = parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)  # allocator: below
    amp = device.type == "cuda"
    tuned = False if args.no_tune_allocator else runtime.tune_cpu_allocator()
    print(f"Device: {runstate.hardware(device)}, torch {torch.__version__}, batch {args.batch_size}, "
          f"CPU allocator tuned (runtime.tune_cpu_allocator): {tuned}")
    # Prediction first: a training step's large frees would raise glibc's thresholds by
    # themselves and hide what the allocator tuning does.
    pred = prediction(args, device)
    if pred:
        bares, e2es, draft, full = pred
        print(f"\nPrediction on full-resolution JPEGs (batch {args.batch_size}, 1 decoding "
              f"worker, after its first batch), {args.rounds} interleaved rounds")
        pair("bare model on ready tensors", bares, "predict.py path end to end", e2es)
        print(f"  decode + resize, draft mode  : {draft:7.1f} img/s (one process)")
        print(f"  decode + resize, full decode : {full:7.1f} img/s (one process)")
        if device.type == "cpu":
            cores = torch.get_num_threads()
            ceiling = 1 / (1 + float(np.median(bares)) / (cores * draft))
            print(f"  ceiling of the ratio with perfect sharing of {cores} cores: {ceiling:.2f}")
    if args.skip_training:
        return
    bounds, reals, seed = training(args, device, amp)
    print(f"\nTraining (MobileNetV2, 224 px, forward + backward + Adam step), "
          f"{args.rounds} interleaved rounds")
    pair("bound, synthetic tensors", bounds, "real loop (decoded once)", reals)
    print(f"  seed-style ImageFolder + PIL : {seed:7.1f} img/s  ratio "
          f"{seed / np.median(bounds):.2f} (one run)")


if __name__ == "__main__":
    main()
