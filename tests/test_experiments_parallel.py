"""Trials on Ray (:mod:`gradleak.experiments.parallel`): the same results, in the same order, as a serial run."""
import csv
import functools
import sys
import time

import pytest

from gradleak.cli import build_parser, main
from gradleak.experiments import batch, dp, label_recovery, local_steps, noise
from gradleak.experiments.parallel import map_trials

pytestmark = pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")   # Ray's own

SWEEP = dict(dataset="cifar10", network="lenet", formats=("smoothing", "mixup", "hard"),
             methods=("exact", "exact-head", "pso-quick", "idlg"), samples=3, seed=7)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (it takes 10-30 s to start); map_trials uses a session it finds as it is."""
    ray = pytest.importorskip("ray")
    # the workers cannot import this file (tests/ is no package): its functions travel by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def sample_rows(folder, name="samples.csv"):
    """A results CSV in file order, without ``time_ms`` (a measurement: it differs between any two runs)."""
    with open(folder / name, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "time_ms"} for row in csv.DictReader(handle)]


def late_square(delays, item):
    """``item ** 2`` after ``delays[item]`` seconds: later items finish first when the delays decrease."""
    time.sleep(delays[item])
    return item ** 2


def test_map_trials_keeps_the_order_of_the_items(local_ray):
    items = list(range(6))
    square = functools.partial(late_square, [0.05 * (len(items) - i) for i in items])
    serial = list(map_trials(square, items, progress=False))
    assert serial == [i ** 2 for i in items]
    assert list(map_trials(square, items, ray_address="local", progress=False)) == serial
    assert local_ray.is_initialized()   # a session it did not start is left running


def test_ray_sweep_writes_the_serial_csv(local_ray, tmp_path):
    serial = label_recovery.run(**SWEEP, out=tmp_path / "serial", progress=False)
    spread = label_recovery.run(**SWEEP, out=tmp_path / "ray", progress=False, ray="local")
    rows = sample_rows(tmp_path / "serial")
    assert len(rows) == serial["new_rows"] == spread["new_rows"] == 3 * 3 * 4
    assert sample_rows(tmp_path / "ray") == rows   # every other column exactly, row for row
    assert any(r["method"] == "pso-quick" and r["evaluations"] != "0" for r in rows)   # a seeded search ran

    # the command line's --ray, on a folder holding a third of the rows: it resumes with the rest, in order
    resumed = tmp_path / "cli"
    resumed.mkdir()
    with open(tmp_path / "serial" / "samples.csv") as handle:
        lines = handle.readlines()
    (resumed / "samples.csv").write_text("".join(lines[:1 + 12]))
    argv = ["experiment", "label-recovery", "--dataset", "cifar10", "--network", "lenet", "--formats",
            *SWEEP["formats"], "--methods", *SWEEP["methods"], "--samples", "3", "--seed", "7", "--out",
            str(resumed), "--quiet", "--ray"]
    assert main(argv) == 0
    assert sample_rows(resumed) == rows


@pytest.mark.parametrize("experiment, grid, name", [
    (local_steps, dict(steps=(1, 2), lrs=(0.1,)), "local_steps.csv"),
    (dp, dict(clips=(0.5,), noise_multipliers=(0.0, 0.1)), "dp.csv"),   # Opacus' noise: seeded per sample
    (noise, dict(formats=("smoothing", "mixup"), noises=("gaussian",), stds=(0.0, 1e-3), methods=("exact", "idlg")),
     "noise.csv"),   # the added noise: seeded per sample, kind, level and format
], ids=["local-steps", "dp", "noise"])
def test_other_sweeps_on_ray_write_the_serial_csv(local_ray, tmp_path, experiment, grid, name):
    if experiment is dp:
        pytest.importorskip("opacus")
    options = dict(network="lenet", samples=1, seed=3, progress=False, figure=False, **grid)
    experiment.run(**options, out=tmp_path / "serial")
    experiment.run(**options, out=tmp_path / "ray", ray="local")
    rows = sample_rows(tmp_path / "serial", name)
    assert len(rows) == 2 * 2 * 2   # formats x (K or noise levels) x (scales or methods)
    assert sample_rows(tmp_path / "ray", name) == rows


def test_a_batch_sweep_on_ray_writes_the_serial_csv(local_ray, tmp_path):
    """One batch per task, each rebuilt from its seeds in the worker: the same rows, split examples included."""
    options = dict(network="fcn4", formats=("smoothing", "mixup"), methods=("gradleak", "ilrg"), batch_sizes=(1, 4, 32),
                   samples=2, seed=5, progress=False)
    batch.run(**options, out=tmp_path / "serial")
    batch.run(**options, out=tmp_path / "ray", ray="local")
    rows = sample_rows(tmp_path / "serial")
    assert len(rows) == 2 * 3 * 2 * 2
    assert any(r["examples_success"] == "True" and r["batch_size"] == "4" for r in rows)   # a batch was split
    assert sample_rows(tmp_path / "ray") == rows


def test_a_missing_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install \"ray\[default\]\""):
        list(map_trials(abs, [1], ray_address="local", progress=False))


def test_ray_option_defaults_to_a_local_cluster():
    parser = build_parser()
    assert parser.parse_args(["experiment", "label-recovery", "--ray"]).ray == "local"
    assert parser.parse_args(["experiment", "label-recovery", "--ray", "auto"]).ray == "auto"
    assert parser.parse_args(["experiment", "label-recovery"]).ray is None
