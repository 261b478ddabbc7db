"""benchmarks/bench_official.py: skipped without the official code; one sample against it when
GRADLEAK_OFFICIAL points at a checkout of github.com/ybwang119/label_recovery."""
import csv
import os
import sys

import pytest

from scripts import load_benchmark

OFFICIAL = os.environ.get("GRADLEAK_OFFICIAL")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_official")


def test_without_official_code_it_says_so_and_exits_0(bench, capsys):
    assert bench.main([]) == 0
    assert "skipped: no --official PATH" in capsys.readouterr().out


def test_a_folder_without_recovering_py_is_a_usage_error(bench, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--official", str(tmp_path)])
    assert exit_info.value.code == 2


def test_torchvision_stand_ins_raise_on_use_and_leave_no_trace(bench):
    before = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models", "torchvision.transforms")}
    with bench._torchvision_for_import():
        import torchvision
        if torchvision.__version__ == "stand-in":
            from torchvision import transforms
            with pytest.raises(RuntimeError, match="stand-in"):
                transforms.Compose([])
    assert {name: sys.modules.get(name) for name in before} == before


@pytest.mark.skipif(not OFFICIAL, reason="set GRADLEAK_OFFICIAL to a checkout of the official label_recovery code")
def test_one_sample_against_the_official_code(bench, tmp_path, capsys):
    out = tmp_path / "official.csv"
    assert bench.main(["--official", OFFICIAL, "--samples", "1", "--networks", "lenet", "--formats", "smoothing",
                       "--repeats", "1", "--official-repeats", "1", "--csv", str(out)]) == 0
    assert "median ratio" in capsys.readouterr().out
    [row] = list(csv.DictReader(out.open()))
    assert row["network"] == "lenet" and row["format"] == "smoothing"
    assert row["gradleak_success"] == "True"  # untrained LeNet, label smoothing: both sides recover it
    assert row["official_success"] == "True"
    assert float(row["ratio"]) > 1.0
    assert float(row["batched_difference"]) == 0.0  # recover_labels gives each example the bits of its single call
    # the official modules' generic names are not left behind for other imports to collide with
    assert not any(name in sys.modules for name in ("recovering", "model", "resnet"))
