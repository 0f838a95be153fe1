"""The training candidates of issue 10 part 4 (--add equalize-last, freeze-early, lp-ft):
each does what its name says, on real images, and is recorded when a run uses it."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY, run_script, train_args
from torch.utils.data import DataLoader

import cxr_common as cc
import cxr_io as cio
import train_cxray as tc

SIZE = 64


def films(n=8):
    paths = (cio.list_images(TINY / "train" / "NORMAL")[: n // 2]
             + cio.list_images(TINY / "train" / "PNEUMONIA")[: n // 2])
    return np.stack([cc.load_image_array(p, SIZE) for p in paths]), np.array([0] * (n // 2)
                                                                             + [1] * (n // 2))


def run_transform(transform, x, seed):
    torch.manual_seed(seed)
    return transform(x)


def test_equalize_last_equalises_the_augmented_image_not_the_other_way_round():
    """With the same random draws, equalize-last must be equalize(augment(x)) and the
    recipe's order augment(equalize(x)); a transform that ignored the field, or put
    equalisation on the wrong side, fails one of the two."""
    images, _ = films(4)
    augment_only = tc.train_transform(dict(tc.recipe_for("improved"), intensity="none"), SIZE)
    first = tc.train_transform(tc.recipe_for("improved"), SIZE)
    last = tc.train_transform(tc.recipe_for("improved", add=["equalize-last"]), SIZE)
    differs = 0
    for seed, image in enumerate(images):
        x = torch.from_numpy(image).unsqueeze(0)
        out_last, out_first = run_transform(last, x, seed), run_transform(first, x, seed)
        assert torch.equal(out_last, cc.equalize(run_transform(augment_only, x, seed)))
        assert torch.equal(out_first, run_transform(augment_only, cc.equalize(x), seed))
        differs += not torch.equal(out_last, out_first)
    assert differs >= 3  # the two orders really give different training inputs


def one_epoch(model, recipe, epoch, lr=1e-3):
    """One real epoch on 8 tiny films, as main() runs it; returns the state before it."""
    images, labels = films()
    loader = DataLoader(tc.XrayArrays(images, labels), batch_size=4, shuffle=False)
    criterion, optimizer, scheduler = tc.make_optimisation(recipe, model, labels, len(loader),
                                                           lr, recipe["epochs"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = tc.freeze(model, tc.frozen_blocks(recipe, epoch))
    tc.train_one_epoch(model, loader, criterion, optimizer, torch.device("cpu"), False, 1,
                       epoch, recipe["epochs"], scheduler, frozen)
    return before


def changed_blocks(model, before) -> set:
    """Indices of model.features blocks whose weights or BatchNorm statistics changed,
    plus 'classifier'."""
    after = model.state_dict()
    out = set()
    for k in before:
        if not torch.equal(before[k], after[k]):
            parts = k.split(".")
            out.add(int(parts[1]) if parts[0] == "features" else parts[0])
    return out


def test_freeze_early_keeps_the_first_seven_blocks_weights_and_statistics():
    """Guards against freezing the weights but letting the frozen blocks' BatchNorm
    statistics drift in train mode, or freezing the wrong end of the network."""
    torch.manual_seed(0)
    model, _ = cc.build_model(pretrained=False)
    recipe = tc.recipe_for("improved", add=["freeze-early"])
    changed = changed_blocks(model, one_epoch(model, recipe, epoch=1))
    assert not changed & set(range(7))
    assert set(range(7, len(model.features))) <= changed and "classifier" in changed


def test_lp_ft_trains_the_classifier_alone_then_everything_more_gently():
    """Epochs 1-2: only the classifier moves (weights and statistics of every feature
    block fixed); from epoch 3 all layers train, at the schedule times 1/3."""
    recipe = tc.recipe_for("improved", add=["lp-ft"])
    torch.manual_seed(0)
    model, _ = cc.build_model(pretrained=False)
    assert changed_blocks(model, one_epoch(model, recipe, epoch=2)) == {"classifier"}
    changed = changed_blocks(model, one_epoch(model, recipe, epoch=3))
    assert set(range(len(model.features))) <= changed
    # the learning rate: the improved schedule, times 1/3 after the 2 probe epochs
    steps, lr = 4, 0.3
    _, optimizer, scheduler = tc.make_optimisation(recipe, torch.nn.Linear(2, 2),
                                                   np.array([0, 1]), steps, lr, 8)
    schedule = tc.warmup_cosine(steps, steps * 8)
    for step in range(steps * 8):
        expected = lr * schedule(step) * (1 if step < 2 * steps else 1 / 3)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
        optimizer.step()
        scheduler.step()
    assert not math.isclose(1 / 3, 1)  # the factor is not a no-op


@pytest.mark.slow
def test_candidates_are_recorded_in_words_and_never_read_test(tmp_path):
    proc = run_script("train_cxray.py", *train_args(
        tmp_path, "--epochs", 3, "--recipe", "improved", "--add", "equalize-last",
        "--add", "freeze-early", "--add", "lp-ft"))
    assert "Candidate addition (equalize-last): intensity = equalize (after the " \
           "augmentations)" in proc.stdout
    assert "Candidate addition (freeze-early): training = features[:7] frozen" in proc.stdout
    assert "Candidate addition (lp-ft): training = the classifier only for 2 epoch(s)" \
        in proc.stdout
    assert "Test split not read" in proc.stdout
    (run_dir,) = list(tmp_path.iterdir())
    meta = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)["meta"]
    assert meta["add"] == ["equalize-last", "freeze-early", "lp-ft"]
    assert meta["recipe_fields"]["frozen_blocks"] == 7
    assert meta["recipe_details"]["training"].startswith("the classifier only for 2 epoch(s)")
    assert "features[:7] frozen" in meta["recipe_details"]["training"]
