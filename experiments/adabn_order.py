"""AdaBN and file order: the same images in two orders must give the same answers.

    python experiments/adabn_order.py --data chest_xray --model models/mobilenet_cxr.pth

Adapts the model's BatchNorm statistics to the unlabeled images of --split (a
transductive protocol: it reads the test images, never their labels, to adapt) with
cxr.siteshift.adapt_batchnorm, for the files in sorted order and in a shuffled order,
and prints the largest difference in P(PNEUMONIA), the change between batch sizes, and
accuracy / sensitivity / specificity at the model's threshold beside zero-shot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cxr import checkpoints, dataset, network, scoring, siteshift  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="chest_xray")
    p.add_argument("--split", default="test")
    p.add_argument("--model", default=str(checkpoints.DEFAULT_MODEL))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 16])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    model, meta = checkpoints.load_checkpoint(args.model)
    cal = checkpoints.calibration_of(meta)
    files, labels = dataset.list_labelled(Path(args.data) / args.split)
    size, intensity = meta["preprocessing"]["image_size"], network.intensity_of(meta)
    x, kept, _ = dataset.decode_all(files, size)
    y = np.asarray(labels)[kept]
    order = np.random.default_rng(args.seed).permutation(len(y))

    def prob(m, idx):
        out = np.empty(len(y))
        out[idx] = cal.probability([network.predict_logits(m, x[idx], intensity)])
        return out

    def line(name, p):
        m = scoring.binary_metrics(y, p, cal.threshold)
        print(f"{name:<34} acc {m['accuracy']:.4f}  sens {m['sensitivity']:.4f}  "
              f"spec {m['specificity']:.4f}")

    p0 = prob(model, np.arange(len(y)))
    line("zero-shot", p0)
    sorted_idx = np.arange(len(y))
    previous = None
    for b in args.batch_sizes:
        a = prob(siteshift.adapt_batchnorm(model, x[sorted_idx], intensity, b), sorted_idx)
        s = prob(siteshift.adapt_batchnorm(model, x[order], intensity, b), order)
        line(f"AdaBN, batch {b}, file order", a)
        line(f"AdaBN, batch {b}, shuffled", s)
        print(f"  max |P(file order) - P(shuffled)| = {np.abs(a - s).max():.2e}")
        if previous is not None:
            print(f"  max |P - P(batch {args.batch_sizes[0]})| = {np.abs(a - previous).max():.2e}")
        previous = a
    print(siteshift.adaptation_warning(len(y), cal.positive(p0)) or "no adaptation warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
