"""ASHA for ``sarl tune``: on the reported epoch, with rungs that survive a resumed sweep.

Two things go wrong with Tune's stock ``ASHAScheduler(time_attr="training_iteration")`` when a sweep is resumed
(``Tuner.restore``):

- a trial that is resumed starts a fresh trial function, whose Tune iteration counts from 1 again, while its
  TorchTrainer resumes its Train run at epoch k+1; the iteration would compare an epoch-(k+1) metric with the
  rung-1 milestone. The reported ``epoch`` is the time here.
- Tune saves the search algorithm's state but not the scheduler's, so a restored sweep starts with empty rungs:
  the trials that finished before the interruption no longer count, and a resumed trial would be judged against
  nothing. ``on_trial_add`` (called for every trial of a restored sweep, finished ones included) replays each
  trial's Train history (``<train_storage>/<trial id>/history.jsonl``, one row per epoch whose checkpoint was
  persisted) into its bracket, so the rungs hold what they held before.

The module imports Ray Tune; ``sarl.platform.tune`` imports it only when a sweep with ASHA is built.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler

from .runs import Run

TIME_ATTR = "epoch"


def train_history(train_storage: str, trial_id: str) -> list[dict[str, Any]]:
    """The epochs a trial's Train run reported (a repeated epoch keeps its last row), in order."""
    return Run(train_storage, trial_id).history()


class EpochASHA(ASHAScheduler):
    """``ASHAScheduler`` on ``time_attr="epoch"`` whose brackets are refilled from the trials' histories."""

    def __init__(self, train_storage: str, **kwargs: Any) -> None:
        super().__init__(time_attr=TIME_ATTR, **kwargs)
        self.train_storage = train_storage

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for row in train_history(self.train_storage, trial.trial_id):
            if self._metric in row:  # records the rungs it passed; the decisions were taken before
                bracket.on_result(trial, row[TIME_ATTR], self._metric_op * row[self._metric])


__all__ = ["EpochASHA", "TIME_ATTR", "train_history"]
