"""``sarl protocol`` in process: seeds, both selections (validation / test), the tables and the plots."""

import json

import numpy as np
import pytest

from sarl.model.data import load_mask
from sarl.platform.protocol import run_protocol, summarise, write_table

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
