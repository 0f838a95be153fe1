"""The site protocols of an evaluation, which use the images being evaluated (their
numbers are named beside the zero-shot ones): label-free adaptation of the members to
these images, the shift report of a labelled folder, and local recalibration, cross-
fitted on patient-grouped partitions of the folder, with the calibrated copy of the
model (a checkpoint, or an ensemble file) for predict.py.
"""

from __future__ import annotations

import numpy as np
import torch

from cxr import calib, checkpoints, network, runtime, scoring, siteshift


def shift_report(members, feats, y, pred) -> dict | None:
    """Typicality flags, their error rates, and a domain classifier (validation images
    vs these) on the first member's features; None without typicality statistics."""
    flags = siteshift.outside_distribution(members, feats)
    if flags is None:
        return None
    flag, _ = flags
    stats = members[0][0].typicality
    z = siteshift.project(feats[0].numpy(), stats)
    ref_z, ref_y = stats["reference_z"].numpy(), stats["reference_labels"].numpy()
    auc = siteshift.domain_auc(ref_z, z)
    by_class = {n: siteshift.domain_auc(ref_z[ref_y == k], z[y == k])
                for k, n in enumerate(network.CLASS_NAMES) if (y == k).sum() >= 5}
    worst = max(by_class, key=by_class.get) if by_class else None
    verdict = siteshift.shift_verdict(auc)
    if worst is not None and siteshift.shift_verdict(by_class[worst]) != verdict:
        verdict += f"; but for {worst} images alone: {siteshift.shift_verdict(by_class[worst])}"
    wrong = pred != y
    return {
        "flagged_share": float(flag.mean()),
        "flagged_by_class": {n: float(flag[y == k].mean()) if (y == k).any() else float("nan")
                             for k, n in enumerate(network.CLASS_NAMES)},
        "error_rate_flagged": float(wrong[flag].mean()) if flag.any() else float("nan"),
        "error_rate_unflagged": float(wrong[~flag].mean()) if (~flag).any() else float("nan"),
        "domain_auc": auc, "verdict": verdict, "domain_auc_by_class": by_class,
        "validation_flagged_share": 1 - stats["level"],
        "scores": siteshift.typicality_score(feats[0].numpy(), stats), "flag": flag,
    }

def recalibration_problem(ks, y, groups) -> str | None:
    """Why --recalibrate cannot cross-fit with one of the K on these images (None if it
    can with all): n images make n // K groups of whole patients, which must be 2 or
    more, each with both classes, so no more than the patients of either class."""
    y, groups = np.asarray(y), np.asarray(groups)
    patients = [len(np.unique(groups[y == c])) for c in (0, 1)]
    n = len(y)
    lo, hi = n // (min(patients) + 1) + 1, n // 2
    for k in ks:
        if not lo <= k <= hi:
            fits = (f"K from {lo} to {hi} works here" if lo <= hi else
                    "no K works here: it needs at least 2 patients of each class")
            return (f"--recalibrate {k}: {n} images of {patients[0]} NORMAL and {patients[1]} "
                    f"PNEUMONIA patients make {n // k} group(s) of {k}; cross-fitting needs 2 "
                    f"or more, each with both classes: {fits}")
    return None

def site_patients(y, groups) -> np.ndarray:
    """Patient ids for the site protocols, told apart by class as well: files named alike
    in NORMAL/ and PNEUMONIA/ (001.png in both) are two patients, as site_partitions
    places them."""
    return np.array([f"{network.CLASS_NAMES[c]}/{g}" for c, g in zip(y, groups)])

def site_partitions(groups, y, k: int, rng) -> list[np.ndarray]:
    """Images split into groups of about k, whole patients each, both classes in each
    (patients are assigned class by class to the group with the fewest of that class):
    there must be no more groups than patients of either class (recalibration_problem)."""
    parts = max(1, len(y) // k)
    out = [[] for _ in range(parts)]
    for c in (0, 1):
        patients = np.unique(groups[y == c])
        counts = np.zeros(parts)
        for g in rng.permutation(patients):
            rows = np.flatnonzero((groups == g) & (y == c))
            j = int(np.argmin(counts))
            out[j] += rows.tolist()
            counts[j] += len(rows)
    return [np.array(sorted(o)) for o in out]

def recalibrated_scores(y, logit, fit_rows, score_rows, groups, seed):
    """Fit the calibration on fit_rows; (calibration, P(PNEUMONIA) of score_rows)."""
    two = torch.tensor(np.c_[np.zeros(len(logit)), logit], dtype=torch.float32)
    cal = calib.Calibration.fit(two[fit_rows], y[fit_rows], groups[fit_rows], seed)
    return cal, cal.probability([two[score_rows]])

def recalibrate(y, p, groups, ks, draws: int, seed: int = 0) -> list[dict]:
    """Cross-fitted local recalibration: per draw, the images are split into groups of
    about K (whole patients); each group is scored by the calibration fitted on the next
    group, so no image is scored by a calibration that saw it. Mean and spread over
    draws of the metrics at the fitted threshold and of the share each fitted referral
    rule refers; the error among the films answered, pooled over the draws."""
    logit, groups = network.logit(p), site_patients(y, groups)
    rows = []
    for k in ks:
        rng, runs, promised = np.random.default_rng(seed), [], []
        errors = answered = 0  # pooled over the draws: the error among the films answered
        for _ in range(draws):
            parts = site_partitions(groups, y, k, rng)
            q, pred, conf = np.zeros(len(y)), np.zeros(len(y), dtype=int), np.zeros(len(y))
            referred = np.zeros(len(y), dtype=bool)
            for j, part in enumerate(parts):
                cal, q[part] = recalibrated_scores(y, logit, parts[(j + 1) % len(parts)], part,
                                                   groups, seed)
                pred[part], conf[part] = cal.decide(q[part])  # each part at its own calibration
                referred[part] = cal.referred(q[part])
                promised.append(cal.sensitivity_promised)
            m = scoring.binary_metrics(y, (pred + 0.5) / 2, 0.5)  # decisions at each row's threshold
            m["auc"] = scoring.binary_metrics(y, q, 0.5)["auc"]
            m["ece"] = scoring.expected_calibration_error(pred == y, conf)[0]
            m["nll"] = scoring.log_loss(y, q)
            for c, name in enumerate(network.CLASS_NAMES):
                m[f"referred_{name}"] = float(referred[y == c].mean())
            m["answered"] = float((~referred).mean())
            errors += int(((pred != y) & ~referred).sum())
            answered += int((~referred).sum())
            runs.append(m)
        keys = runs[0].keys()
        rows.append({"K": k, "draws": len(runs), "sensitivity_promised": min(promised),
                     "risk_answered": errors / answered if answered else float("nan"),
                     "mean": {key: float(np.mean([r[key] for r in runs])) for key in keys},
                     "sd": {key: float(np.std([r[key] for r in runs])) for key in keys}})
    return rows

def save_site_model(path, members, model_paths, cal_in, y, p, groups, k, source, adapted,
                    seed=0) -> str:
    """--save-calibrated: a copy of the model (a checkpoint, or an ensemble file with
    every member) with a calibration fitted on K images of this site (one patient-grouped
    draw) on top of its own (Calibration.refitted: for an ensemble, one calibration on a
    shared set instead of the mean of the members' own). Returns the line that says what
    it wrote."""
    groups = site_patients(y, groups)
    fit_rows = site_partitions(groups, y, k, np.random.default_rng(seed))[0]
    site, _ = recalibrated_scores(y, network.logit(p), fit_rows, fit_rows, groups, seed)
    cal = cal_in.refitted(site, f"{len(fit_rows)} labelled images of {source} (visualize_results.py)")
    adapted_on = source if adapted else None
    if len(members) > 1:
        checkpoints.save_ensemble(path, members, cal, {
            "built_from": [{"path": str(q), "sha256": runtime.sha256_file(q)} for q in model_paths],
            "adapted_on": adapted_on})
    else:
        model, meta = members[0]
        meta = dict(meta, calibration=cal.to_dict(), recalibrated_from=meta.get("calibration"),
                    adapted_on=adapted_on)
        checkpoints.save_checkpoint(path, model.state_dict(), meta, getattr(model, "typicality", None))
    return (f"Saved {runtime.display_name(path)}: " + ("the ensemble " if len(members) > 1 else "")
            + f"calibration fitted on {len(fit_rows)} images of {source}"
            + (" with BatchNorm statistics adapted to it" if adapted else "")
            + f"; referral rule: {cal.rule_words(short=True)}"
            + f" (use: predict.py --model {runtime.display_name(path)})")
