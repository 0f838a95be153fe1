"""Model selection: the checkpoint holds the weights of the epoch the selection rule marks
as best, not the last epoch's.

Which epoch a real run finds best depends on its floating-point trajectory, which differs
between machines. So the rule is tested on given histories, and the script is tested on a
real run whose validation scores are injected: the weights are trained for real, only the
scores the selection reads are set by the test.
"""

import json

import pytest
import torch
from conftest import train_args

import train_cxray
from cxr import engine


def best_epoch(scores, mode="max"):
    """The epoch (1-based) the training loop keeps, folding its rule over a history."""
    best, kept = float("-inf") if mode == "max" else float("inf"), None
    for epoch, score in enumerate(scores, 1):
        if engine.is_better(score, best, mode):
            best, kept = score, epoch
    return kept


@pytest.mark.parametrize("scores, mode, kept", [
    ([0.889, 0.889, 0.800], "max", 1),  # a tie keeps the earlier epoch
    ([0.80, 0.90, 0.90], "max", 2),
    ([0.70, 0.80, 0.95], "max", 3),
    ([0.30, 0.30, 0.40], "min", 1),  # validation loss: lower is better, ties keep the earlier
    ([0.50, 0.20, 0.30], "min", 2),
])
def test_the_selection_rule_on_given_histories(scores, mode, kept):
    """Guards against '>=' (a later tie replaces the best) and a reversed comparison."""
    assert best_epoch(scores, mode) == kept


INJECTED_F1 = [0.9, 0.9, 0.8]  # best: epoch 1, tied by epoch 2, not the last


@pytest.fixture(scope="module")
def injected_run(tmp_path_factory):
    """A real 3-epoch reference run on the tiny data, in this process, whose per-epoch
    validation F1 is replaced by INJECTED_F1; the weights of every evaluation (the epochs',
    then the final validation and test) are recorded."""
    out = tmp_path_factory.mktemp("selection")
    snapshots, real_evaluate = [], train_cxray.evaluate

    def scripted_evaluate(model, *args, **kwargs):
        result = real_evaluate(model, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if len(snapshots) <= len(INJECTED_F1):  # the epoch loop's validations come first
            result["val_f1"] = INJECTED_F1[len(snapshots) - 1]
        return result

    mp = pytest.MonkeyPatch()
    mp.setattr(train_cxray, "evaluate", scripted_evaluate)
    try:
        assert train_cxray.main([str(a) for a in train_args(out, "--epochs", 3, "--seed", 6)]) == 0
    finally:
        mp.undo()
    (run_dir,) = list(out.iterdir())
    return run_dir, snapshots


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_saved_weights_are_the_best_epochs_not_the_last(injected_run):
    """Guards against saving the last epoch's weights, the model as it ends training, or a
    later epoch that only ties the best: the saved tensors are epoch 1's, exactly."""
    run_dir, snapshots = injected_run
    # the premise, true on any machine: training moves the weights every epoch
    assert not same_weights(snapshots[0], snapshots[1])
    assert not same_weights(snapshots[0], snapshots[2])
    payload = torch.load(run_dir / "mobilenet_cxr.pth", weights_only=True)
    assert payload["meta"]["metrics"]["best_epoch"] == 1
    assert same_weights(payload["state_dict"], snapshots[0])


@pytest.mark.slow
def test_the_final_figures_are_the_best_epochs(injected_run):
    """Guards against reporting validation and test figures of the last weights: every
    evaluation after the epochs (final validation, the test split) runs on epoch 1's."""
    _, snapshots = injected_run
    after = snapshots[len(INJECTED_F1):]
    assert len(after) == 2  # the final validation and the test split
    assert all(same_weights(s, snapshots[0]) for s in after)


@pytest.mark.slow
def test_the_history_records_what_the_selection_read(injected_run):
    run_dir, _ = injected_run
    (history_file,) = run_dir.glob("training_history_*.json")
    history = json.loads(history_file.read_text())["history"]
    assert [h["val_f1"] for h in history] == INJECTED_F1
