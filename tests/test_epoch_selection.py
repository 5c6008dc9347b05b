"""Best-epoch selection and the plateau stop of from-scratch training (train_cam.select_best,
patience), on hand-made score sequences."""

from __future__ import annotations

import torch

from pipeline.train.common import EpochSelection


def _run(scores: list[float], patience: int | None) -> tuple[EpochSelection, int]:
    """Feed ``scores`` epoch by epoch (the model's weight = the epoch); the epoch training stopped at."""
    selection, model = EpochSelection({}, patience), torch.nn.Linear(1, 1, bias=False)
    for epoch, score in enumerate(scores):
        model.weight.data.fill_(epoch)
        if selection.add(epoch, score, model, {"epoch": epoch}):
            return selection, epoch
    return selection, len(scores) - 1


def test_the_best_epochs_weights_are_kept_and_ties_prefer_the_later_epoch():
    selection, stopped = _run([0.5, 0.8, 0.7, 0.8, 0.6], patience=None)
    assert stopped == 4 and selection.best["best_epoch"] == 3 and selection.best["best_score"] == 0.8
    assert selection.best["best_model"]["weight"].item() == 3 and selection.best["best_metrics"] == {"epoch": 3}


def test_a_plateau_counts_from_the_last_strictly_better_score():
    # A saturated score (1.0 from epoch 2) stops patience epochs later, exporting the last tie.
    selection, stopped = _run([0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], patience=3)
    assert stopped == 5 and selection.best["best_epoch"] == 5 and selection.best["improved_epoch"] == 2
    _, stopped = _run([0.6, 0.7, 0.65, 0.8, 0.7, 0.7, 0.7, 0.7], patience=3)
    assert stopped == 6


def test_selection_resumes_from_a_checkpoints_record():
    first, _ = _run([0.5, 0.9], patience=2)
    resumed = EpochSelection({k: first.best[k] for k in EpochSelection.KEYS}, patience=2)
    model = torch.nn.Linear(1, 1, bias=False)
    assert not resumed.add(2, 0.9, model, {}) and resumed.add(3, 0.8, model, {})
    assert resumed.best["best_epoch"] == 2 and resumed.best["improved_epoch"] == 1
