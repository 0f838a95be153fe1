#!/usr/bin/env python3
"""Step 3 of 4: classify chest X-rays with a trained checkpoint, optionally with Grad-CAM.

    python predict.py --image examples/person1_virus_6.jpeg --gradcam
    python predict.py --dir scans/ --json                 # recursive, batched
    python predict.py --dir scans/ --model ensemble.pth   # experiments/build_ensemble.py
    python predict.py --dir archive/ --resume outputs/predict_<ts>  # after a kill

Accepts JPEG, PNG (8/16-bit, RGBA, palette), BMP, TIFF and DICOM (.dcm, needs the
optional package pydicom). Each file goes through the same preprocessing as training
(cxr.dataset.load_image_array). Unreadable files are reported in one line and skipped;
the rest of the batch goes on.

Results are appended to <out>/predictions.csv (and .jsonl with --json) as they are
computed, so a killed run loses nothing and --resume redoes only the files that failed
(the table, its columns and the checks on --resume: cxr/predtable.py). Names are printed
escaped; CSV cells cannot act as formulas. This is decision support, not a diagnosis.

A film unlike the training data (typicality above the model's cut) gets its verdict with
a warning ("atypical"); only an atypical image that is also not laid out or grained like
a chest film (cxr.imagefiles.unlike_a_film) gets none (OUTSIDE). What is printed:
cxr/predconsole.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxr import checkpoints, dataset, imagefiles, intake, network, predconsole, predtable, runtime, siteshift
from gradcam import GradCAM, figure_path, save_figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Predict NORMAL / PNEUMONIA for chest X-rays "
                                "(decision support only).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--dir", action="append", default=[], help="a folder, searched recursively")
    p.add_argument("--model", default=checkpoints.DEFAULT_MODEL, action=runtime.ModelOnce,
                   help="a checkpoint, or an ensemble file (experiments/build_ensemble.py)")
    p.add_argument("--out", type=runtime.folder_or_new, default="outputs",
                   help="parent folder: each run writes to a new OUT/predict_<timestamp>/")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="continue an interrupted run in OUT_DIR, skipping files already done")
    p.add_argument("--json", action="store_true", help="also write predictions.jsonl")
    p.add_argument("--gradcam", action="store_true", help="write <name>_gradcam.png per image")
    p.add_argument("--batch-size", type=runtime.positive_int, default=32)
    p.add_argument("--workers", type=runtime.nonnegative_int, default=1,
                   help="decoding worker processes (0: decode in the main process)")
    p.add_argument("--device", default="auto", type=runtime.device_name, help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="one line per image, not the block")
    p.add_argument("--adapt", action="store_true",
                   help="label-free adaptation (transductive): re-estimate the BatchNorm "
                        "statistics on all the images given (AdaBN) before predicting; the "
                        "out-of-distribution flag still uses the model as trained")
    return p.parse_args(argv)


# --- The steps. ---


def check_gradcam_folder(args) -> None:
    """--gradcam writes PNGs: refuse a results folder inside an input folder or a labelled
    data set, whose later scans would read them as films."""
    if not args.gradcam:
        return
    out = Path(args.resume or args.out).resolve()
    folders = [d for d in map(Path, args.dir) if d.is_dir()]
    where = next((f"the input folder {runtime.display_name(d)}" for d in folders
                  if out == d.resolve() or d.resolve() in out.parents), None)
    data = dataset.labelled_data_folder(out)
    if where is None and data is not None:
        where = f"the labelled data set folder {runtime.display_name(data)}"
    if where:
        raise SystemExit(f"error: --gradcam: the results folder {runtime.display_name(out)} is inside "
                         f"{where}, and its later scans would read the Grad-CAM PNGs as films; "
                         "give an --out outside it")


def open_output(args, manifest, retry: set[str]) -> tuple[Path, set[str], bool]:
    """The output folder (new, or the one resumed, locked), the files done (the errors of
    those in retry are redone), and whether JSONL is written."""
    if not args.resume:
        manifest = dict(manifest, json=args.json, command=" ".join(sys.argv))
        return predtable.new_run_folder(args.out, manifest), set(), args.json
    out_dir = Path(args.resume)
    done, json_lines = predtable.resume_run_folder(out_dir, manifest, retry)
    if args.json != json_lines:
        print(f"note: the run being resumed was started {'with' if json_lines else 'without'}"
              " --json; continuing it that way")
    return out_dir, done, json_lines


def adapted_members(members, cal, files, size, batch_size):
    """--adapt: each member with BatchNorm statistics re-estimated on all readable inputs."""
    arrays = [a for a, _ in (dataset.try_load_image_array(f, size) for f in files) if a is not None]
    if not arrays:
        return members
    x = np.stack(arrays)
    print(f"--adapt: BatchNorm statistics re-estimated on {len(x)} unlabeled image(s) "
          "(transductive; the flag uses the model as trained)")
    logits = network.member_logits(members, x, batch_size)
    adapted, warning = siteshift.adapt_members(members, x, cal.positive(cal.probability(logits)),
                                               batch_size)
    if warning:
        print(f"warning: --adapt: {warning}", file=sys.stderr)
    return adapted


def unlike_a_film(path, array) -> bool:
    """Whether the photograph check finds the film unlike a chest film, read at
    imagefiles.FILM_SIZE px whatever the model's input size (decoded again from the file
    when that differs; a file that can no longer be read is not judged)."""
    if array.shape[-1] != imagefiles.FILM_SIZE:
        array, _ = dataset.try_load_image_array(path, imagefiles.FILM_SIZE)
    return array is not None and imagefiles.unlike_a_film(array) is not None


def score_batch(items, todo, members, scorers, cal, model_id) -> dict[int, dict]:
    """The rows of one batch of (index, array or None, error), by index."""
    good = [(i, a) for i, a, _ in items if a is not None]
    rows = {i: predtable.error_row(todo[i], err, model_id) for i, a, err in items if a is None}
    if not good:
        return rows
    x = np.stack([a for _, a in good])
    logits, feats = network.member_logits(members, x, len(good), features=True)
    flags = siteshift.outside_distribution(members, feats)
    unlike = [flags is not None and bool(flags[0][k]) and unlike_a_film(todo[i], a)
              for k, (i, a) in enumerate(good)]  # only an atypical film needs the look
    if scorers is not members:
        logits = network.member_logits(scorers, x, len(good))
    probs = cal.probability(logits)
    for k, ((i, _), p) in enumerate(zip(good, probs)):
        if not np.isfinite(p):
            rows[i] = predtable.error_row(todo[i], "the model's output is not a finite number "
                                          "(NaN or infinity): no verdict", model_id)
        else:
            rows[i] = predtable.result_row(todo[i], float(p), cal, model_id,
                                           None if flags is None else (flags[0][k], flags[1][k], unlike[k]))
    return rows


def explain(cam, array, row, members, device, out_dir, image, explained):
    """The Grad-CAM figure of the reported class (not the raw argmax) for one film."""
    x1 = torch.from_numpy(array)[None, None].to(device)
    reported = network.CLASS_NAMES.index(row["prediction"])
    heat, _, _ = cam(network.model_input(x1, network.intensity_of(members[0][1])), class_idx=reported)
    try:
        png = figure_path(out_dir, image)
        save_figure(png, array, heat, row["prediction"], row["confidence"], row["file"], explained)
        print(f"Grad-CAM: {runtime.display_name(png)}")
    except OSError as e:  # the row is saved; only its picture is missing
        print(f"warning: the Grad-CAM of {row['file']} was not saved ({e.strerror or e})",
              file=sys.stderr)


def main(argv=None):
    runtime.printable_console()
    args = parse_args(argv)
    if not args.image and not args.dir:
        raise SystemExit("error: give --image FILE and/or --dir FOLDER (see --help)")
    check_gradcam_folder(args)

    # 1. the model (an ensemble file: its members) and its calibration
    device = runtime.pick_device(args.device)  # on the CPU, with its allocator tuned (~2x faster)
    with runtime.exit_on(checkpoints.CheckpointError):
        members, cal, size = checkpoints.load_model(args.model, device)
    manifest = predtable.run_manifest(args.model, members, cal, args.json, args.adapt)
    model_id = manifest["model_id"]

    # 2. the inputs, and the results folder (new, or the run resumed: its files are done)
    files, not_read = intake.collect_inputs(args.image, args.dir, results=args.resume)
    given = {intake.resolved(p) for p in [*files, *(p for p, _ in not_read)]}
    with runtime.exit_on(predtable.TableError):
        out_dir, done, json_lines = open_output(args, manifest, retry=given)
    todo = [p for p in files if intake.resolved(p) not in done]
    not_read = [(p, r) for p, r in not_read if intake.resolved(p) not in done]
    predconsole.print_header(args.model, members, cal, model_id)
    if done:
        print(f"Resuming: {len(files) - len(todo)} of {len(files)} files already done")
    predconsole.print_notes(members, cal)
    scorers = members
    if args.adapt:  # transductive: every image given, also those done before a --resume
        scorers = adapted_members(members, cal, files, size, args.batch_size)

    # 3. score in batches; each batch's rows reach the disk before anything about them is printed
    writer = predtable.ResultWriter(out_dir, json_lines)
    with runtime.exit_on(predtable.TableError):
        writer.save([predtable.error_row(p, r, model_id) for p, r in not_read])
    skipped = [(runtime.display_name(p), reason) for p, reason in not_read]
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    loader = DataLoader(intake.FileImages(todo, size), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=intake.collate,
                        worker_init_fn=runtime.die_with_parent)
    cam = GradCAM(members[0][0]) if args.gradcam else None
    explained = f"map of member 1 of {len(members)}" if len(members) > 1 else ""
    n_ok = n_atypical = n_far = 0
    for items in loader:
        rows = score_batch(items, todo, members, scorers, cal, model_id)
        with runtime.exit_on(predtable.TableError):
            writer.save([rows[i] for i in sorted(rows)])
        arrays = {i: a for i, a, _ in items}

        # 4. one block (or line) per film, and its Grad-CAM figure
        for i in sorted(rows):
            row = rows[i]
            if row["error"]:
                print(f"skipped: {row['file']}: {row['error']}", file=sys.stderr)
                skipped.append((row["file"], row["error"]))
                continue
            n_ok += 1
            n_far += row["outside"] is True
            n_atypical += row["atypical"] is True and row["outside"] is not True
            predconsole.print_line(row, cal) if args.quiet else predconsole.print_block(row, cal)
            if cam is not None and row["prediction"] != predtable.OUTSIDE:
                explain(cam, arrays[i], row, members, device, out_dir, todo[i], explained)

    predconsole.print_summary(n_ok, n_atypical, n_far, skipped, out_dir / predtable.CSV_NAME)
    if n_ok == 0 and not done:
        print("error: no image could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
