"""The sweep's trial records (``tune._trials``), from results shaped as Tune's ``ResultGrid`` hands them."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from sarl.model.config import from_dict
from sarl.platform.tune import SweepConfig, _trials


def result(config, curve, error=None, path="sweep/run_trial_x"):
    frame = None if curve is None else pd.DataFrame({"val_mAP": curve, "trial_id": ["t"] * len(curve)})
    return SimpleNamespace(config=config, metrics_dataframe=frame, error=error, path=path,
                           metrics={} if curve is None else {"trial_id": path.rsplit("/", 1)[-1]})


def test_a_trial_that_failed_before_it_reported_is_listed_last_with_its_error():
    """Tune gives ``config=None`` and no metrics for a trial whose actor never ran (seen on a two-node cluster)."""
    sweep = from_dict(SweepConfig, {"space": {"loss.name": {"grid": ["asl", "an"]},
                                              "loss.gamma_neg": {"choice": [2, 4], "when": {"loss.name": "asl"}}}})
    grid = [result(None, None, error=RuntimeError("The actor never ran"), path="sweep/run_trial_a"),
            result({"loss.name": "an", "loss.gamma_neg": 4}, [40.0, 55.0], path="sweep/run_trial_b"),
            result({"loss.name": "asl", "loss.gamma_neg": 2}, [50.0], path="sweep/run_trial_c")]
    trials = _trials(grid, sweep, max_epochs=2)
    assert [t["trial_id"] for t in trials] == ["run_trial_b", "run_trial_c", "run_trial_a"]
    assert [t["status"] for t in trials] == ["completed", "stopped early", "error"]
    assert trials[0]["params"] == {"loss.name": "an"}  # gamma_neg applies to asl only
    assert trials[2]["params"] == {} and trials[2]["best"] is None and "never ran" in trials[2]["error"]


def test_the_curve_comes_from_the_trials_train_history_when_tune_missed_an_epoch(tmp_path):
    """An interrupted sweep: Train committed epoch 2, whose report never reached Tune; the resumed trial went on
    at epoch 3. Tune's table has epochs 1 and 3, the trial's history.jsonl all three."""
    import json

    sweep = from_dict(SweepConfig, {"space": {"loss.name": {"grid": ["asl"]}}})
    tune_rows = result({"loss.name": "asl"}, [40.0, 60.0], path="sweep/run_trial_t")
    tune_rows.metrics = {"trial_id": "t"}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "history.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "val_mAP": v, "cache_hits": 1}) + "\n"
                for e, v in ((1, 40.0), (2, 70.0), (3, 60.0))))
    [trial] = _trials([tune_rows], sweep, max_epochs=3, train_storage=str(tmp_path))
    assert trial["curve"] == [40.0, 70.0, 60.0] and trial["best"] == 70.0 and trial["status"] == "completed"
    assert trial["cache_hits"] == [1, 1, 1]


def test_a_trial_asha_stopped_is_stopped_early_though_train_ran_on_to_the_end(tmp_path):
    """Tune took epoch 1 and stopped the trial there; its Train run had reported epochs 2 and 3 meanwhile."""
    import json

    sweep = from_dict(SweepConfig, {"space": {"loss.name": {"grid": ["asl"]}}})
    stopped = result({"loss.name": "asl"}, [40.0], path="sweep/run_trial_s")
    stopped.metrics_dataframe["epoch"] = [1]
    stopped.metrics = {"trial_id": "s"}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "history.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "val_mAP": v}) + "\n" for e, v in ((1, 40.0), (2, 45.0), (3, 50.0))))
    [trial] = _trials([stopped], sweep, max_epochs=3, train_storage=str(tmp_path))
    assert (trial["status"], trial["stopped_at"], trial["epochs"]) == ("stopped early", 1, 3)
