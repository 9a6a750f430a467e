"""``sarl protocol`` in process: seeds, both selections (validation / test), the tables and the plots."""

import json

import numpy as np
import pytest

from sarl.model.config import ConfigError
from sarl.model.data import load_mask
from sarl.platform.protocol import merge_protocol, run_protocol, summarise, write_runs, write_table

SMALL = ["data.options.num_images=96", "train.batch_size=16", "train.eval_batch_size=64", "train.progress=false",
         "model.rank=8", "train.epochs=3", "data.known_proportion=0.5"]


def test_in_process_protocol_reports_both_selections_over_seeds(tmp_path):
    out = tmp_path / "protocol"
    table = run_protocol("jobs/demo.yaml", ["sarl", "global"], [0.5], out, SMALL, seeds=[0, 1], in_process=True,
                         log=lambda *_: None)
    runs = json.loads((out / "runs.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in runs) == [("global", 0), ("global", 1), ("sarl", 0), ("sarl", 1)]
    for r in runs:
        assert len(r["curve_val_mAP"]) == 3 and len(r["curve_test_mAP"]) == 3
        assert r["val_mAP"] == max(r["curve_val_mAP"])  # selected on validation ...
        assert r["test_mAP"] == pytest.approx(r["curve_test_mAP"][r["best_epoch"] - 1], abs=1e-4)
        assert r["test_selected_mAP"] == max(r["curve_test_mAP"])  # ... the peers' number on test
    for method in ("sarl", "global"):
        values = [r["test_mAP"] for r in runs if r["method"] == method]
        assert table[method][0.5] == pytest.approx(np.mean(values))
    masks = {(r["method"], r["seed"]): load_mask(f"{r['checkpoint']}/../partial_labels.npz")[0] for r in runs}
    assert np.array_equal(masks["sarl", 0], masks["global", 0])  # same seed, same mask for every method
    assert not np.array_equal(masks["sarl", 0], masks["sarl", 1])
    markdown = (out / "table.md").read_text()
    assert "validation-selected (ours), 2 seed(s)" in markdown and "test-selected (as the peers report)" in markdown
    assert " ± " in markdown
    assert (out / "map_vs_proportion.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


def test_table_gives_mean_and_sample_standard_deviation(tmp_path):
    records = [{"method": "m", "proportion": 0.1, "test_mAP": v, "test_selected_mAP": v + 1} for v in (60.0, 64.0)]
    summary = summarise(records)
    assert summary["val"]["m"][0.1] == pytest.approx((62.0, 2.8284271))  # sd of (60, 64) with n - 1
    assert summary["test"]["m"][0.1] == pytest.approx((63.0, 2.8284271))
    markdown = write_table(summary, [0.1], tmp_path, n_seeds=2)
    assert "| m | 62.00 ± 2.83 | 62.00 |" in markdown and "| m | 63.00 ± 2.83 | 63.00 |" in markdown
    assert (tmp_path / "table.csv").read_text().splitlines()[1] == "val,m,62.00,62.00,2"


def test_a_rerun_continues_and_parts_run_apart_merge_into_one_table(tmp_path):
    one_epoch = [*SMALL, "train.epochs=1"]
    logs: list[str] = []
    a, b = tmp_path / "a", tmp_path / "b"
    run_protocol("jobs/demo.yaml", ["sarl"], [0.5], a, one_epoch, seeds=[0], in_process=True, log=logs.append)
    [first] = json.loads((a / "runs.json").read_text())
    logs.clear()
    run_protocol("jobs/demo.yaml", ["sarl", "global"], [0.5], a, one_epoch, seeds=[0], in_process=True,
                 log=logs.append)
    trained = [line for line in logs if line.startswith("== ") and ": run " in line]
    assert len(trained) == 1 and "global" in trained[0]  # sarl seed 0 was in runs.json: not trained again
    assert json.loads((a / "runs.json").read_text())[0] == first
    run_protocol("jobs/demo.yaml", ["sarl", "global"], [0.5], b, one_epoch, seeds=[1], in_process=True,
                 log=lambda *_: None)
    summary = merge_protocol([a, b], tmp_path / "all")
    merged = json.loads((tmp_path / "all" / "runs.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in merged) == [("global", 0), ("global", 1), ("sarl", 0), ("sarl", 1)]
    for method in ("sarl", "global"):
        values = [r["test_mAP"] for r in merged if r["method"] == method]
        assert summary["val"][method][0.5] == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    assert "2 seed(s)" in (tmp_path / "all" / "table.md").read_text()
    logs.clear()  # another job under the same name is trained again, not taken from runs.json
    run_protocol("jobs/demo.yaml", ["sarl"], [0.5], a, [*one_epoch, "optim.lr=0.01"], seeds=[0], in_process=True,
                 log=logs.append)
    assert any(line.startswith("== sarl") and ": run " in line for line in logs)


def test_merging_refuses_other_jobs_for_the_same_run_and_uneven_seeds(tmp_path):
    def record(method, seed, digest="d0"):
        return {"method": method, "proportion": 0.5, "seed": seed, "job_digest": digest, "test_mAP": 50.0 + seed,
                "test_selected_mAP": 51.0 + seed, "curve_val_mAP": [1.0], "curve_test_mAP": [1.0]}

    for name, records in {"a": [record("sarl", 0)], "b": [record("sarl", 0, "d1")],
                          "c": [record("sarl", 1), record("global", 0)]}.items():
        (tmp_path / name).mkdir()
        write_runs(tmp_path / name, records)
    with pytest.raises(ConfigError, match="ran another job"):
        merge_protocol([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(ConfigError, match="uneven seeds: global at 50% \\(1\\)"):
        merge_protocol([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
    with pytest.raises(ConfigError, match="holds no runs"):
        merge_protocol([tmp_path / "missing"], tmp_path / "out")
