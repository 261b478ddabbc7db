"""gradleak experiment batch (gradleak.experiments.batch): its CSVs, its grading, and its figure."""
import csv
import types

import torch

from gradleak.experiments import batch
from gradleak.experiments.batch import _examples_success, run


def test_a_small_run_writes_graded_rows_and_a_figure(tmp_path):
    out = tmp_path / "batch"
    result = run(network="lenet", dataset="cifar10", formats=["smoothing", "mixup-pairs"], methods=["gradleak", "ilrg"],
                 batch_sizes=[1, 4], samples=2, out=out, progress=False)
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 2 * 2 * 2 * 2 and {r["method"] for r in rows} == {"gradleak", "ilrg"}
    ours = [r for r in rows if r["method"] == "gradleak"]
    assert all(r["confident_wrong"] == "False" for r in ours)
    assert all(r["counts_exact"] == "" for r in rows if r["format"] == "mixup-pairs")  # no counts to be exact
    single = [r for r in ours if r["batch_size"] == "1"]
    assert all(r["examples_success"] == "True" for r in single)  # one example: always "split"
    assert {r["format"] for r in result["summary"]} == {"smoothing", "mixup-pairs"}
    assert (out / "summary.md").read_text().startswith("| format") and (out / "batch.png").stat().st_size > 0
    again = run(network="lenet", dataset="cifar10", formats=["smoothing", "mixup-pairs"],
                methods=["gradleak", "ilrg"], batch_sizes=[1, 4], samples=2, out=out, progress=False)
    assert again["summary"] == result["summary"]  # resumed: nothing recomputed, the same table


def test_examples_are_graded_in_any_order_and_every_one_counts():
    generator = torch.Generator().manual_seed(0)
    labels = torch.softmax(torch.randn(5, 10, generator=generator), dim=1)
    features = torch.rand(5, 32, generator=generator)
    truth = dict(labels=labels, features=features)
    order = torch.tensor([3, 0, 4, 1, 2])
    found = [types.SimpleNamespace(label=labels[i], feature=2.0 * features[i]) for i in order]
    assert _examples_success(found, truth)  # order and the feature's scale do not matter
    found[2] = types.SimpleNamespace(label=labels[order[2]] + 2e-3, feature=features[order[2]])
    assert not _examples_success(found, truth)
    assert not _examples_success(found[:4], truth)  # a missing example
    twin = [types.SimpleNamespace(label=labels[0], feature=features[0])] * 5
    assert not _examples_success(twin, truth)  # one true example cannot stand for five
    assert batch.BATCH_SIZES[0] == 1 and batch.BATCH_SIZES[-1] == 256
