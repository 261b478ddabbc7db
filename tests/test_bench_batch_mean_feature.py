"""benchmarks/bench_batch_mean_feature.py: its three estimates of a batch's eps, checked against the truth and
against recover_batch."""
import csv

import pytest
from scripts import load_benchmark


def test_the_exact_predictions_give_eps_and_the_estimated_mean_is_recover_batchs(tmp_path, monkeypatch, capsys):
    """From every example's own prediction eps comes back to rounding (an independent check of the lattice fit
    the benchmark uses), and with the head's estimate of the mean feature the counts-held fit settles where
    ``recover_batch`` does whenever that finds the true counts (the same model, reached by its own route)."""
    bench = load_benchmark("bench_batch_mean_feature")
    out = tmp_path / "rows.csv"
    monkeypatch.setattr("sys.argv", ["bench_batch_mean_feature.py", "--network", "lenet", "--batch-sizes", "16",
                                     "--samples", "2", "--out", str(out)])
    bench.main()
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and "| 16 |" in capsys.readouterr().out
    assert any(row["counts_exact"] == "True" for row in rows)
    for row in rows:
        assert float(row["error_exact"]) < 1e-6
        if row["counts_exact"] == "True":
            assert float(row["error_estimated_mean"]) == pytest.approx(float(row["error_recover_batch"]), abs=1e-6)
