"""A training run's bookkeeping: the run folder, the resumable state written after every
epoch (save_state, load_state, restore, the arguments of a resumed run), Ctrl-C and
unwritable files as one-line exits, and the processes of a torchrun (DDP) run.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cxr import dataset, runtime


def log(rank: int, *args, **kwargs):
    """Print on the first process only (every process of a torchrun run runs the script)."""
    if rank == 0:
        print(*args, **kwargs, flush=True)


def hardware(device) -> str:
    """The device in words, as recorded in the checkpoint."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# Options train_cxray.py no longer has, with the value that kept the run as it is today:
# a run state holding another value is refused on --resume. (--lr and --val-fraction,
# also gone, stay honoured: a resumed run keeps its own, recorded in its state.)
RETIRED_OPTIONS = {"add": [], "skip_test": False, "amp": "auto", "no_pretrained": False}


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
    """The command line of this process, as a user would type it."""
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


def wrap_distributed(model, world: int, device):
    """Under torchrun, DDP averages the gradients of all processes at every step."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


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


def end_distributed(model, world: int, rank: int) -> bool:
    """After the last epoch of a torchrun run: check that the replicas agree, wait for every
    process and leave the process group. True for the processes other than the first,
    whose work is done (the first goes on alone to calibrate, test and write)."""
    if world > 1:
        check_replicas_in_sync(model, world, rank)
        dist.barrier()
        dist.destroy_process_group()
    return rank != 0


def save_state(run_dir, model, optimizer, scheduler, epoch, history, best, loader_gen, args,
               commands, split):
    """Everything a resumed run needs, written atomically to RUN_DIR/last_state.pth."""
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
    start and stop with Ctrl-C held (ctrl_c_held), and each batch checks for it too. A
    forked worker that inherits the handler ignores Ctrl-C from then on (raising there
    could land in the fork hook itself and print a traceback): the run, stopping, shuts
    its workers down. A process started with Ctrl-C ignored (nohup, a background job)
    keeps ignoring it, as Python does."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    CTRL_C.update(run_dir=run_dir, rank=rank)
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:  # a forked worker: the run shuts it down
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
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
    """The state saved in RUN_DIR (--resume), or one line saying why there is none."""
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
