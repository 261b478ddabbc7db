"""gradleak.fl: the Flower strategy wrapper, the simulated audit (Ray), and what they conclude.

Two real Flower simulations on Ray (slow to start: ~40 s each on 2 cores): the CLI's quick preset with 2 clients
for 1 round (shared by the tests through a module fixture), and the wrapper inside a user-written ServerApp.
Everything else calls the same ClientApp and LeakageAudit in-process, with hand-built Flower messages.
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.serverapp.strategy import FedAvg, Strategy  # noqa: E402

from gradleak.fl import LeakageAudit, load_records, load_truth  # noqa: E402
from gradleak.fl.audit import apparent_batch_size  # noqa: E402
from gradleak.fl.records import AuditRecord, append_jsonl, read_jsonl  # noqa: E402
from gradleak.fl.simulation import (build_network, client_app, deal_settings, make_plan, prepare_output,  # noqa: E402
                                    split_dirichlet, split_iid)

REQUIRED_RECORD_KEYS = {"round", "client", "error", "determined", "label_format", "label", "gradient_scale",
                        "batch_size_estimate"}
REQUIRED_TRUTH_KEYS = {"round", "client", "batch_size", "labels", "lr", "local_steps", "clip_factor"}


def _max_error(record, truth) -> float:
    return float(np.max(np.abs(np.asarray(record.label) - np.asarray(truth.labels[0]))))


def _joined(folder: Path):
    truths = {(t.round, t.client): t for t in load_truth(folder / "truth.jsonl")}
    return [(r, truths[(r.round, r.client)]) for r in load_records(folder / "records.jsonl")]


# ---------------------------------------------------------------------------------------------- in-process Flower
def _metadata(src: int, dst: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"{src}-{dst}-{time.monotonic_ns()}", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")


class _Scripted(Strategy):
    """A wrapped strategy that sends prepared messages and remembers the replies it was asked to aggregate."""

    def __init__(self, messages):
        self.messages, self.aggregated = messages, None

    def configure_train(self, server_round, arrays, config, grid):
        return self.messages

    def aggregate_train(self, server_round, replies):
        self.aggregated = list(replies)
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        pass


def _train_round(plan, *, lr=0.1, server_round=1):
    """One round of the simulation's ClientApp, called in-process: ``(global arrays, sent messages, replies)``."""
    model = build_network(plan)
    arrays = ArrayRecord(model.state_dict())
    config = {"lr": lr, "local-steps": plan.local_steps, "server-round": server_round}
    sent = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), metadata=_metadata(0, 100 + i))
            for i in range(plan.num_clients)]
    app = client_app(plan)
    replies = []
    for i in range(plan.num_clients):
        incoming = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(config)}),
                           metadata=_metadata(0, 100 + i))
        context = Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions":
                                                                  plan.num_clients}, state=RecordDict(), run_config={})
        replies.append(app(incoming, context))
    return model, arrays, sent, replies


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """18 clients, every recipe (augmentation x batch 1/1/4 x clipping on/off), audited in-process: 12 batch-1
    updates, 6 batches."""
    out = tmp_path_factory.mktemp("in-process")
    plan = make_plan(out=str(out), num_clients=18, rounds=1, batch_sizes=[1, 1, 4],
                     augmentations=["none", "smoothing", "mixup"], clips=[None, 0.5], seed=3)
    prepare_output(plan)
    model, arrays, sent, replies = _train_round(plan)
    scripted = _Scripted(sent)
    audit = LeakageAudit(scripted, model=model, out=out, input_shape=plan.input_shape)
    audit.configure_train(1, arrays, ConfigRecord(), None)
    audit.aggregate_train(1, replies)
    return out, plan, replies, scripted


def test_single_example_updates_leak_their_exact_labels(in_process):
    out, _, _, _ = in_process
    single = [(r, t) for r, t in _joined(out) if t.batch_size == 1]
    assert len(single) == 12
    exact = [r.determined and _max_error(r, t) < 1e-3 for r, t in single]
    assert sum(exact) >= 0.99 * len(single)
    assert not [r for r, t in single if r.determined and _max_error(r, t) >= 1e-3]  # never confidently wrong
    clipped = [r for r, t in single if t.clip is not None and t.clip_factor < 1]
    assert clipped and all(r.scale_source == "recovered" for r in clipped)
    for record, truth in single:
        true_scale = -truth.lr * truth.clip_factor
        assert record.gradient_scale == pytest.approx(true_scale, rel=1e-3)
        assert record.batch_size_estimate == 1
        assert record.reconstruction is not None  # a fully connected net: the input comes back analytically
        rebuilt = np.load(out / record.reconstruction)
        assert np.abs(rebuilt - np.load(out / truth.inputs)[0]).max() < 1e-2


def test_batches_are_reported_as_batches(in_process):
    out, _, _, _ = in_process
    batches = [(r, t) for r, t in _joined(out) if t.batch_size > 1]
    assert len(batches) == 6
    for record, _ in batches:
        assert record.determined is False
        assert record.batch_size_estimate > 1
        assert "rank" in record.message
        assert record.reconstruction is None


def test_records_hold_only_what_the_server_sees(in_process):
    out, _, _, _ = in_process
    lines = list(read_jsonl(out / "records.jsonl"))
    assert len(lines) == 18
    for line in lines:
        assert REQUIRED_RECORD_KEYS <= set(line)
        assert not {"labels", "batch_size", "partition", "augmentation", "clip_factor"} & set(line)
        assert line["error"] is None
        assert len(line["label"]) == 10


def test_replies_reach_the_wrapped_strategy_untouched(in_process):
    _, _, replies, scripted = in_process
    assert len(scripted.aggregated) == len(replies)
    assert all(a is b for a, b in zip(scripted.aggregated, replies))


def test_aggregate_is_what_the_strategy_alone_gives(tmp_path):
    plan = make_plan(out=str(tmp_path), num_clients=3, rounds=1, batch_sizes=[1, 2], clips=[None, 0.5])
    prepare_output(plan)
    model, arrays, sent, replies = _train_round(plan)
    plain, _ = FedAvg().aggregate_train(1, replies)
    audit = LeakageAudit(FedAvg(), model=model, out=tmp_path / "audit")
    audit.strategy.configure_train = lambda *args: sent
    audit.configure_train(1, arrays, ConfigRecord(), None)
    audited, _ = audit.aggregate_train(1, replies)
    assert list(audited.keys()) == list(plain.keys())
    for key in plain.keys():
        np.testing.assert_array_equal(audited[key].numpy(), plain[key].numpy())


def test_malformed_replies_become_error_records(tmp_path):
    plan = make_plan(out=str(tmp_path), num_clients=1, rounds=1)
    prepare_output(plan)
    model, arrays, sent, replies = _train_round(plan)
    good = replies[0].content["arrays"]
    keys = list(good.keys())

    def reply(content, node=100):
        return Message(content, metadata=_metadata(node, 0))

    def with_arrays(arrays_dict):
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays_dict.items()}),
                           "metrics": MetricRecord({"num-examples": 1})})

    numpy = {k: good[k].numpy() for k in keys}
    nan = dict(numpy, **{keys[0]: np.full_like(numpy[keys[0]], np.nan)})
    wide = dict(numpy, **{keys[0]: np.zeros((3, 3), dtype=np.float32)})
    two = RecordDict({"a": ArrayRecord(list(numpy.values())), "b": ArrayRecord(list(numpy.values())),
                      "metrics": MetricRecord({"num-examples": 1})})
    cases = {
        "missing": reply(with_arrays({k: v for k, v in numpy.items() if k != keys[-1]})),
        "shape": reply(with_arrays(wide)),
        "nan": reply(with_arrays(nan)),
        "no arrays": reply(RecordDict({"metrics": MetricRecord({"num-examples": 1})})),
        "two records": reply(two),
        "client error": Message(error=Error(code=0, reason="out of memory"), metadata=_metadata(100, 0)),
        "stranger": reply(with_arrays(numpy), node=999),
    }
    scripted = _Scripted(sent)
    audit = LeakageAudit(scripted, model=model, out=tmp_path / "audit")
    audit.configure_train(1, arrays, ConfigRecord(), None)
    audit.aggregate_train(1, list(cases.values()))  # must not raise
    records = load_records(tmp_path / "audit" / "records.jsonl")
    assert len(records) == len(cases) and len(scripted.aggregated) == len(cases)
    errors = dict(zip(cases, (r.error for r in records)))
    assert all(errors.values()), errors
    assert keys[-1] in errors["missing"]
    assert "(3, 3)" in errors["shape"]
    assert "NaN" in errors["nan"]
    assert "0 ArrayRecords" in errors["no arrays"] and "2 ArrayRecords" in errors["two records"]
    assert "out of memory" in errors["client error"]
    assert "node 999" in errors["stranger"]


def test_without_the_lr_the_scale_is_recovered(tmp_path):
    plan = make_plan(out=str(tmp_path), num_clients=3, rounds=1, augmentations=["none", "smoothing", "mixup"])
    prepare_output(plan)
    model, arrays, sent, replies = _train_round(plan)
    audit = LeakageAudit(_Scripted(sent), model=model, out=tmp_path, lr_key=None)
    audit.configure_train(1, arrays, ConfigRecord(), None)
    audit.aggregate_train(1, replies)
    for record, truth in _joined(tmp_path):
        assert record.determined and record.scale_source == "recovered" and record.lr is None
        assert record.gradient_scale == pytest.approx(-0.1, rel=1e-3) and _max_error(record, truth) < 1e-3


def test_gradient_matching_reconstructs_cnn_inputs_when_asked(tmp_path):
    plan = make_plan(out=str(tmp_path), num_clients=1, rounds=1, network="lenet", augmentations=["smoothing"])
    prepare_output(plan)
    model, arrays, sent, replies = _train_round(plan)
    audit = LeakageAudit(_Scripted(sent), model=model, out=tmp_path, input_shape=plan.input_shape,
                         reconstruct="matching", matching_iterations=5)
    audit.configure_train(1, arrays, ConfigRecord(), None)
    audit.aggregate_train(1, replies)
    (record, _), = _joined(tmp_path)
    assert record.determined and record.reconstruction_method == "matching"
    assert np.load(tmp_path / record.reconstruction).shape == (3, 32, 32)


def test_wrapper_refuses_what_it_cannot_wrap(tmp_path):
    model = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match="Message-API"):
        LeakageAudit(object(), model=model, out=tmp_path)
    with pytest.raises(TypeError, match="train config"):
        LeakageAudit(FedAvg(), model=model, out=tmp_path, lr=0.1)


# ---------------------------------------------------------------------------------------------- pieces
def test_apparent_batch_size_counts_examples():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 64, generator=generator)
    for batch in (1, 2, 5, 10):
        deltas = torch.randn(batch, 10, generator=generator)
        features = torch.rand(batch, 64, generator=generator)
        update = -0.05 * torch.einsum("bc,bd->cd", deltas, features) / batch
        new = (weight + update).float()  # a float32 server: rounding on the new weights
        assert apparent_batch_size(new - weight.float(), weight.float()) == batch
    assert apparent_batch_size(torch.zeros(10, 64), weight) == 0


def test_partitions_cover_the_pool():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    pool = np.tile(np.arange(200), 2)
    iid = split_iid(pool, 7, rng)
    assert sorted(np.concatenate(iid).tolist()) == sorted(pool.tolist())
    dirichlet = split_dirichlet(pool, labels, 30, 0.1, 3, rng)
    assert sorted(np.concatenate(dirichlet).tolist()) == sorted(pool.tolist())
    assert min(len(part) for part in dirichlet) >= 3
    dealt = deal_settings(12, ["none", "smoothing", "mixup"], [1, 4], [None, 0.5])
    assert len(set(dealt)) == 12


def test_plan_checks_its_settings(tmp_path):
    with pytest.raises(ValueError, match="noise needs clipping"):
        make_plan(out=str(tmp_path), num_clients=2, rounds=1, noise=0.1)
    with pytest.raises(ValueError, match="unknown network"):
        make_plan(out=str(tmp_path), num_clients=2, rounds=1, network="vgg")
    plan = make_plan(out=str(tmp_path), num_clients=30, rounds=1, batch_sizes=[4])
    assert plan.copies > 1 and all(len(c.indices) >= 4 for c in plan.clients)  # 20 CIFAR-10 images, shared


def _append_many(path: str, worker: int) -> None:
    for i in range(50):
        append_jsonl(path, AuditRecord(round=i, client=worker, message="x" * 2000))


def test_concurrent_appends_never_interleave(tmp_path):
    path = str(tmp_path / "records.jsonl")
    context = multiprocessing.get_context("fork")  # spawn would re-import torch and Flower per worker
    workers = [context.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    lines = list(read_jsonl(path))
    assert len(lines) == 200 and {line["client"] for line in lines} == {0, 1, 2, 3}


def test_the_package_imports_without_flwr():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import gradleak.fl, gradleak.fl.cli, gradleak.cli\n"
            "args = gradleak.cli.build_parser().parse_args(['audit', '--quick', '--out', 'x'])\n"
            "assert args.handler(args) == 2\n"
            "try:\n    gradleak.fl.LeakageAudit\nexcept ImportError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install gradleak[fl]" in done.stdout
    assert "pip install gradleak[fl]" in done.stderr  # what `gradleak audit` says


# ---------------------------------------------------------------------------------------------- real simulations
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """`gradleak audit --quick` with 2 clients for 1 round on Flower's Ray simulation engine: client 0 trains on one
    example, client 1 on a batch of 4 (label smoothing)."""
    from gradleak.cli import main

    out = tmp_path_factory.mktemp("audit")
    started = time.perf_counter()
    code = main(["audit", "--quick", "--num-clients", "2", "--rounds", "1", "--batch-size", "1", "4",
                 "--augmentation", "smoothing", "--out", str(out), "--quiet"])
    assert code == 0
    return out, time.perf_counter() - started


def test_simulation_writes_records_truth_and_report(simulated):
    out, seconds = simulated
    assert seconds < 180
    for name in ("report.html", "records.jsonl", "truth.jsonl", "records.csv", "summary.json", "config.json"):
        assert (out / name).is_file(), name
    records, truths = list(read_jsonl(out / "records.jsonl")), list(read_jsonl(out / "truth.jsonl"))
    assert len(records) == len(truths) == 2
    assert all(REQUIRED_RECORD_KEYS <= set(r) for r in records)
    assert all(REQUIRED_TRUTH_KEYS <= set(t) for t in truths)
    assert {(r["round"], r["client"]) for r in records} == {(t["round"], t["client"]) for t in truths}
    assert 'id="summary"' in (out / "report.html").read_text()


def test_simulation_conclusions_against_the_truth(simulated):
    out, _ = simulated
    joined = {t.batch_size: (r, t) for r, t in _joined(out)}
    record, truth = joined[1]
    assert record.error is None and record.determined
    assert record.label_format == "smoothing" and _max_error(record, truth) < 1e-3
    assert record.gradient_scale == pytest.approx(-0.1)
    batch, _ = joined[4]
    assert batch.determined is False and batch.batch_size_estimate > 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["single_example"]["leak_rate"] == 1.0 and summary["all"]["confident wrong"] == 0


def test_report_rebuilds_from_the_files(simulated):
    from gradleak.cli import main

    out, _ = simulated
    (out / "report.html").unlink()
    assert main(["audit", "report", str(out)]) == 0
    assert (out / "report.html").stat().st_size > 10_000


def test_wrapper_inside_a_user_written_server_app(tmp_path):
    """A user's own ServerApp and ClientApp (no gradleak code on the clients) with the strategy wrapped."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from gradleak.labels import smooth_label

    def net() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 6))

    def train_one_example(state, partition: int):
        model = net()
        model.load_state_dict(state)
        x = torch.linspace(-1, 1, 12).reshape(1, 3, 4) * (partition + 1)
        target = smooth_label(2 + partition, 6, 0.2, dtype=torch.float32).unsqueeze(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loss = -(target * torch.log_softmax(model(x.unsqueeze(0)), -1)).sum()
        loss.backward()
        optimizer.step()
        return model.state_dict()

    clients = ClientApp()

    @clients.train()
    def train(message: Message, context: Context) -> Message:
        state = train_one_example(message.content["arrays"].to_torch_state_dict(),
                                  int(context.node_config["partition-id"]))
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=message)

    outcome = {}
    server = ServerApp()

    @server.main()
    def main(grid, context: Context) -> None:
        strategy = LeakageAudit(FedAvg(fraction_evaluate=0.0), model=net(), out=tmp_path / "audit")
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()), num_rounds=1,
                                train_config=ConfigRecord({"lr": 0.05}))
        outcome["arrays"] = result.arrays

    run_simulation(server, clients, num_supernodes=2, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "object_store_memory": 200 * 1024 ** 2, "log_to_driver": False}})
    records = load_records(tmp_path / "audit" / "records.jsonl")
    assert len(records) == 2
    found = sorted(tuple(r.classes) for r in records)
    assert all(r.error is None and r.determined and r.label_format == "smoothing" for r in records)
    assert found == [(2,), (3,)]
    assert all(r.eps == pytest.approx(0.2, abs=1e-4) for r in records)
    # what FedAvg aggregated is the plain mean of the clients' weights: the audit changed nothing
    expected = [train_one_example(net().state_dict(), p) for p in (0, 1)]
    for key, value in outcome["arrays"].items():
        np.testing.assert_allclose(value.numpy(), ((expected[0][key] + expected[1][key]) / 2).numpy(), atol=1e-6)
