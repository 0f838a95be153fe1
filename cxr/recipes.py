"""The training recipes as data: the reference and improved recipes, the probe (the
classifier head alone, on frozen ImageNet features), the ablations (the improved recipe
minus one part), the augmentations by name, and the recipe in words.

Every field is read by the training code, and the text stored in the checkpoint is
generated from the fields (describe()).
"""

from __future__ import annotations

import copy

from torchvision.transforms import v2

from cxr import calib

RECIPES = {
    # The published reference run, unchanged.
    "reference": dict(
        epochs=8, batch_size=16, optimizer="adam", lr=1e-4, weight_decay=0.0,
        schedule="plateau", augment=["flip", "rotate10", "brightness0.1"],
        intensity="none", class_weights=False, label_smoothing=0.0,
        select="val_f1", select_mode="max", calibrate=False, pretrained=True, train="all"),
    # What fixes the normal-recall collapse: see README, "Beating the reference".
    "improved": dict(
        epochs=8, batch_size=32, optimizer="adamw", lr=3e-4, weight_decay=0.01,
        schedule="warmup_cosine",
        augment=["resized_crop", "flip", "rotate10", "brightness_contrast0.3"],
        intensity="equalize", class_weights=True, label_smoothing=0.1,
        select="val_loss", select_mode="min", calibrate=True, pretrained=True, train="all"),
    # The lab's recipe (minutes on a CPU): the ImageNet backbone frozen, its pooled features
    # of the training and validation images computed once (engine.train_head), and the
    # classifier head alone trained on them: a logistic regression, with the improved
    # recipe's preprocessing, loss, selection and calibration. Features computed once
    # cannot be augmented.
    "probe": dict(
        epochs=20, batch_size=32, optimizer="adamw", lr=1e-3, weight_decay=0.01,
        schedule="warmup_cosine", augment=[], intensity="equalize", class_weights=True,
        label_smoothing=0.1, select="val_loss", select_mode="min", calibrate=True,
        pretrained=True, train="head"),
}
# --ablate X: the improved recipe minus one part, replaced by the reference's choice
# (pretrained: random initial weights instead of ImageNet's).
ABLATIONS = {
    "equalize": {"intensity": "none"},
    "augment": {"augment": RECIPES["reference"]["augment"]},
    "loss": {"class_weights": False, "label_smoothing": 0.0},
    "pretrained": {"pretrained": False},
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
        "augment": ", ".join(AUGMENTATIONS[a][0] for a in recipe["augment"]) or "none",
        "intensity": recipe["intensity"],
        "initial_weights": "ImageNet" if recipe.get("pretrained", True) else "random",
        "training": {"all": "all layers",
                     "head": "the classifier head alone, on the pooled features of the frozen "
                             "backbone (computed once)"}[recipe.get("train", "all")],
        "loss": "CrossEntropyLoss" + (f"({', '.join(loss)})" if loss else ""),
        "selection": f"{'best' if recipe['select_mode'] == 'max' else 'lowest'} {select}",
        "calibration": (calib.CALIBRATION_RULE if recipe["calibrate"]
                        else "none: argmax (threshold 0.5), temperature 1"),
    }


def recipe_changes(name: str, ablate) -> list[str]:
    """What each --ablate changes, in the words describe() gives the fields."""
    base = describe(RECIPES[name])
    lines = []
    for part in ablate:
        changed = describe(recipe_for(name, [part]))
        diff = "; ".join(f"{k} = {v}" for k, v in changed.items() if v != base[k])
        lines.append(f"Ablation ({part}): {diff}")
    return lines
