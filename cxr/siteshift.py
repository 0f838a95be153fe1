"""A new site: typicality of a film's features (the out-of-distribution flag), a
domain-classifier shift check, and label-free BatchNorm adaptation (AdaBN).

A film whose typicality / cut ratio is above 1 is *atypical* (1% of validation films by
construction): predict.py gives its verdict with a warning. Only an atypical image that is
also unlike a chest film (imagefiles.unlike_a_film: layout, fine detail) gets no verdict.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cxr import network

TYPICALITY_DIMS = 64

TYPICALITY_LEVEL = 0.99

REFERENCE_SAMPLE = 1000  # validation images kept (as PCA features) for the domain check

def fit_typicality(train_feats, train_labels, val_feats, val_labels, seed: int = 0,
                   dims: int = TYPICALITY_DIMS) -> dict:
    """The typicality statistics: PCA and class Gaussians from the training features,
    the cut from the validation features. Tensors and numbers only (weights_only)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    f, y = np.asarray(train_feats, dtype=np.float64), np.asarray(train_labels)
    pca = PCA(min(dims, len(f) - 1, f.shape[1]), random_state=seed).fit(f)
    z = pca.transform(f)
    means = np.stack([z[y == k].mean(0) for k in range(len(network.CLASS_NAMES))])
    precision = LedoitWolf().fit(z - means[y]).precision_
    stats = {k: torch.tensor(v, dtype=torch.float32) for k, v in (
        ("pca_mean", pca.mean_), ("components", pca.components_), ("class_means", means),
        ("precision", precision))}
    val_scores = typicality_score(val_feats, stats)
    stats["train_scores"] = torch.tensor(typicality_score(f, stats), dtype=torch.float32)
    stats["val_scores"] = torch.tensor(val_scores, dtype=torch.float32)
    stats["cut"] = float(np.quantile(val_scores, TYPICALITY_LEVEL))
    stats["level"] = TYPICALITY_LEVEL
    keep = np.random.default_rng(seed).permutation(len(val_scores))[:REFERENCE_SAMPLE]
    stats["reference_z"] = torch.tensor(project(val_feats, stats)[keep], dtype=torch.float32)
    stats["reference_labels"] = torch.tensor(np.asarray(val_labels)[keep], dtype=torch.int64)
    return stats

def project(feats, stats) -> np.ndarray:
    """Features in the stored PCA space."""
    f = np.asarray(feats, dtype=np.float64)
    return (f - stats["pca_mean"].double().numpy()) @ stats["components"].double().numpy().T

def typicality_score(feats, stats) -> np.ndarray:
    """Mahalanobis distance to the nearest class mean (higher = less typical)."""
    z = project(feats, stats)
    prec = stats["precision"].double().numpy()
    d2 = [np.einsum("ij,jk,ik->i", z - m, prec, z - m)
          for m in stats["class_means"].double().numpy()]
    return np.sqrt(np.maximum(np.min(d2, axis=0), 0))

def domain_probabilities(reference_z, z, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(folder | x) of a logistic regression telling the reference images
    from the folder's, for reference_z then z; None with too few images for the folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference_z, z])
    d = np.r_[np.zeros(len(reference_z)), np.ones(len(z))]
    k = min(folds, len(reference_z), len(z))
    if k < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return cross_val_predict(clf, x, d, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                             method="predict_proba")[:, 1]

def domain_auc(reference_z, z, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling the reference images
    (validation, held out from training) from the folder's: 0.5 = indistinguishable."""
    from sklearn.metrics import roc_auc_score

    s = domain_probabilities(reference_z, z, folds, seed)
    if s is None:
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(len(reference_z)), np.ones(len(z))], s))

def shift_verdict(auc: float) -> str:
    """Plain words for a domain-classifier AUC."""
    if not np.isfinite(auc):
        return "not measured (too few images)"
    if auc < 0.6:
        return "no clear shift: these images are hard to tell from the validation images"
    if auc < 0.75:
        return "mild shift: some difference from the images the model was validated on"
    if auc < 0.9:
        return "clear shift: the images differ from the training source; expect lower accuracy"
    return ("strong shift: the images are easy to tell from the training source; the "
            "validation figures do not apply, recalibrate locally before use")

def outside_distribution(members, feats: list[torch.Tensor]):
    """(atypical, ratio) per image: ratio = the highest over the members of typicality
    score / cut; atypical when above 1.
    None when a member has no typicality statistics."""
    if any(getattr(model, "typicality", None) is None for model, _ in members):
        return None
    ratio = np.max([typicality_score(f.numpy(), model.typicality) / model.typicality["cut"]
                    for (model, _), f in zip(members, feats)], axis=0)
    return ratio > 1, ratio

MIN_ADAPT_IMAGES = 100  # fewer images give unstable statistics: a warning
ONE_SIDED_SHARE = 0.9  # more than this share called one class: a warning


class _Measured(Exception):
    """Raised by a BatchNorm's hook once its input is measured: the rest of the block
    need not run."""


def adapt_batchnorm(model, images_u8: np.ndarray, intensity: str = "none",
                    batch_size: int = 64) -> nn.Module:
    """AdaBN: a copy of the model whose BatchNorm statistics are the exact mean and
    variance of each BatchNorm layer's input over all these unlabeled images, each layer
    measured after the layers before it were adapted (what one training-mode pass over
    all the images as a single batch would give, without holding them in one batch).
    No weight changes.

    The network's feature blocks are adapted in order: all images' inputs to a block are
    kept; each BatchNorm inside it is measured over all of them (per-batch moments
    combined in float64 by Chan et al.'s pairwise rule), set, and the next measured; then
    the block's outputs become the next block's inputs. The images are read in an order
    set by their content, so the result does not depend on the order of the files (bit
    for bit) nor, beyond rounding, on the batch size."""
    import copy
    import hashlib

    keys = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest() for a in images_u8]
    images_u8 = images_u8[np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=int)]
    adapted = copy.deepcopy(model).eval()
    device = next(adapted.parameters()).device
    moments = {}

    def measure(module, inputs):  # Chan et al.'s pairwise update, in float64
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        nb = inputs[0].numel() // inputs[0].shape[1]
        n, total, m2 = moments.get(module, (0, 0.0, 0.0))
        delta = mean.double() - total
        moments[module] = (n + nb, total + delta * nb / (n + nb),
                           m2 + var.double() * nb + delta * delta * n * nb / (n + nb))
        raise _Measured

    with torch.no_grad():
        xs = [network.model_input(torch.as_tensor(images_u8[s:s + batch_size]).unsqueeze(1).to(device),
                                  intensity).contiguous(memory_format=torch.channels_last)
              for s in range(0, len(images_u8), batch_size)]
        for block in adapted.features:
            for bn in [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
                hook = bn.register_forward_pre_hook(measure)
                for x in xs:
                    try:
                        block(x)
                    except _Measured:
                        pass
                hook.remove()
                n, mean, m2 = moments.pop(bn)
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(m2 / max(n - 1, 1))
            xs = [block(x) for x in xs]
    adapted.typicality = getattr(model, "typicality", None)
    return adapted


def adapt_members(members, images_u8: np.ndarray, predicted_positive, batch_size: int = 64):
    """--adapt (label-free, transductive): (each member with its BatchNorm statistics
    re-estimated on these unlabeled images, the adaptation_warning or None), given the
    model's own zero-shot decisions on them."""
    adapted = [(adapt_batchnorm(model, images_u8, network.intensity_of(meta), batch_size), meta)
               for model, meta in members]
    return adapted, adaptation_warning(len(images_u8), predicted_positive)


def adaptation_warning(n_images: int, predicted_positive) -> str | None:
    """Why AdaBN statistics from these images may mislead, in one line, or None. The
    statistics carry the mix of the images: a small set, or one the model itself calls
    almost all one class, moves them towards that set (six healthy films adapted alone
    were called PNEUMONIA)."""
    share = float(np.mean(predicted_positive)) if n_images else 0.0
    if n_images < MIN_ADAPT_IMAGES:
        return (f"only {n_images} image(s) to adapt to (at least {MIN_ADAPT_IMAGES} give stable "
                "statistics): adapt on a larger set of this site's films")
    if max(share, 1 - share) > ONE_SIDED_SHARE:
        name = network.CLASS_NAMES[int(share > 0.5)]
        return (f"the model calls {max(share, 1 - share):.0%} of these images {name} before "
                "adapting: statistics of a one-sided set shift the answers towards it; "
                "adapt on a mixed set of this site's films")
    return None


TYPICALITY_SAMPLE = 2000  # training images whose features fit the typicality Gaussians

def typicality_stats(model, x_train, y_train, x_val, y_val, intensity, seed) -> dict:
    """The statistics of the out-of-distribution flag (fit_typicality) for this model:
    Gaussians fitted on the features of TYPICALITY_SAMPLE of its training images (enough
    for 64 dimensions, and a third of the time), the cut on validation."""
    keep = np.sort(np.random.default_rng(seed).permutation(len(y_train))[:TYPICALITY_SAMPLE])
    x_train, y_train = x_train[keep], y_train[keep]
    _, f_train = network.predict_logits(model, x_train, intensity, desc="typicality: train",
                                features=True)
    _, f_val = network.predict_logits(model, x_val, intensity, features=True)
    stats = fit_typicality(f_train.numpy(), y_train, f_val.numpy(), y_val, seed)
    print(f"Typicality: cut {stats['cut']:.2f} (flags {1 - stats['level']:.0%} of validation; "
          f"{(stats['train_scores'] > stats['cut']).float().mean():.1%} of training)")
    return stats
