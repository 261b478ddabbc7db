"""``gradleak audit``'s federation: Flower's simulation engine (Ray) with victims whose truth is written down.

The bundled samples are split across N simulated clients (IID or Dirichlet non-IID). Each client has a private
training recipe, dealt from the lists of settings in mixed-radix order (client ``i`` gets augmentation
``i mod A``, batch size ``(i div A) mod B``, clipping ``(i div AB) mod K``, so N = A * B * K clients cover every
combination): its label augmentation (none, label smoothing, mixup), its local batch size, and optionally
Flower's client-side clipping mod (``fixedclipping_mod``; with ``noise > 0``, Flower's ``LocalDpMod``, which clips
and adds Gaussian noise). Every round it draws a batch from its partition, takes ``local_steps`` plain SGD steps
on it with the learning rate of the train config, and replies with its new weights.

Each client also appends what it really trained on to ``truth.jsonl`` (and its inputs to ``truth-inputs/``):
the server side, :class:`gradleak.fl.LeakageAudit`, never reads them; only the report joins the two files.

This module imports Flower at the top: reach it through :mod:`gradleak.fl.cli` (which checks for Flower first).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the config key fixedclipping_mod reads
from torch import nn

from ..client import soft_cross_entropy
from ..data import DATASETS, load_samples
from ..labels import hard_label, mix_inputs, mixup_label, smooth_label
from ..models import MODELS, FullyConnected, build_model, input_options
from .audit import RECONSTRUCTIONS
from .records import (CONFIG_FILE, RECONSTRUCTIONS_DIR, RECORDS_FILE, TRUTH_FILE, TRUTH_INPUTS_DIR, AuditRecord,
                      TruthRecord, append_jsonl)
from .strategy import LeakageAudit

AUGMENTATIONS = ("none", "smoothing", "mixup")
NETWORKS = ("mlp",) + tuple(MODELS)
PARTITIONS = ("iid", "dirichlet")
#: delta of the (epsilon, delta) that LocalDpMod's Gaussian mechanism is calibrated with
DP_DELTA = 1e-5
#: the hidden layers of the "mlp" network
MLP_HIDDEN = (128, 64)
#: files and folders a run writes into its output folder (removed before a new run, nothing else is)
RUN_OUTPUTS = (RECORDS_FILE, TRUTH_FILE, CONFIG_FILE, RECONSTRUCTIONS_DIR, TRUTH_INPUTS_DIR, "report.html",
               "records.csv", "summary.json")


@dataclass(frozen=True)
class ClientSetup:
    """One simulated client's private recipe (the server never sees it).

    Attributes:
        partition: the client's index (Flower's partition id).
        augmentation: "none", "smoothing" or "mixup".
        batch_size: examples per local batch.
        clip: the norm its clipping mod clips its update to, or None (no clipping).
        indices: the dataset indices of its partition.
    """

    partition: int
    augmentation: str
    batch_size: int
    clip: Optional[float]
    indices: Tuple[int, ...]


@dataclass(frozen=True)
class SimulationPlan:
    """Everything a simulated audit run needs; its ``config.json`` (minus the partitions' indices).

    Attributes:
        out: the output folder.
        dataset, image_size: the bundled samples (see :func:`gradleak.data.load_samples`).
        network: "mlp" (``input -> 128 -> 64 -> C``, ReLU, biases, PyTorch's init) or a name of
            :data:`gradleak.models.MODELS`.
        rounds: federated rounds; lr, local_steps: the clients' SGD (sent in the train config).
        eps: the label-smoothing mass of "smoothing" clients; mixup_alpha: mixup's Beta(alpha, alpha).
        noise: local DP noise multiplier of clipping clients (std = noise * clip per entry; 0 = none).
        partitioning: "iid" or "dirichlet"; dirichlet_alpha: the Dirichlet concentration.
        server_knows_lr: whether the train config carries the lr (else each client uses ``lr`` privately).
        reconstruct: the audit's input reconstruction ("auto": analytic for fully connected nets; "matching":
            gradient matching, any network, slow; "none").
        seed: seeds the model, the partitions, the batches and the augmentations.
        clients: one :class:`ClientSetup` per client.
        dataset_size: images in the bundled set (partitions of a small set share images: see ``copies``).
        copies: how many times the set was repeated to give every client its examples (1: a true split).
    """

    out: str
    dataset: str
    image_size: int
    network: str
    rounds: int
    lr: float
    local_steps: int
    eps: float
    mixup_alpha: float
    noise: float
    partitioning: str
    dirichlet_alpha: float
    server_knows_lr: bool
    reconstruct: str
    seed: int
    clients: Tuple[ClientSetup, ...]
    dataset_size: int
    copies: int

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (DATASETS[self.dataset].channels, self.image_size, self.image_size)

    def as_config(self) -> Dict[str, object]:
        """The plan as ``config.json`` holds it: each client's recipe with its partition's size, not its indices."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "clients"}
        config["num_clients"] = self.num_clients
        config["clients"] = [dict(partition=c.partition, augmentation=c.augmentation, batch_size=c.batch_size,
                                  clip=c.clip, examples=len(c.indices)) for c in self.clients]
        return config


def dp_epsilon(noise: float) -> float:
    """The epsilon at :data:`DP_DELTA` that makes LocalDpMod's noise std ``noise * clip`` (sensitivity = clip):
    ``std = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon``."""
    return math.sqrt(2 * math.log(1.25 / DP_DELTA)) / noise


# ------------------------------------------------------------------------------------------------ the plan
def deal_settings(num_clients: int, augmentations: Sequence[str], batch_sizes: Sequence[int],
                  clips: Sequence[Optional[float]]) -> List[Tuple[str, int, Optional[float]]]:
    """``(augmentation, batch size, clip)`` per client, in mixed-radix order (every combination once per
    ``len(augmentations) * len(batch_sizes) * len(clips)`` clients)."""
    a, b = len(augmentations), len(batch_sizes)
    return [(augmentations[i % a], batch_sizes[(i // a) % b], clips[(i // (a * b)) % len(clips)])
            for i in range(num_clients)]


def split_iid(pool: np.ndarray, num_clients: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Shuffle the pool of dataset indices and deal it into ``num_clients`` near-equal parts."""
    return np.array_split(rng.permutation(pool), num_clients)


def split_dirichlet(pool: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float, minimum: int,
                    rng: np.random.Generator) -> List[np.ndarray]:
    """Non-IID parts: each class's indices are shared out in proportions drawn from ``Dirichlet(alpha)``; parts
    left with fewer than ``minimum`` indices then take them from the largest parts.

    Args:
        pool: dataset indices (repeats allowed); labels: ``labels[i]`` is index ``i``'s class.
    """
    parts: List[List[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == cls])
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.extend(chunk.tolist())
    for part in parts:
        while len(part) < minimum:
            donor = max(parts, key=len)
            part.append(donor.pop(int(rng.integers(len(donor)))))
    return [np.array(part, dtype=np.int64) for part in parts]


def make_plan(*, out: str, num_clients: int, rounds: int, dataset: str = "cifar10", image_size: Optional[int] = None,
              network: str = "mlp", batch_sizes: Sequence[int] = (1,), augmentations: Sequence[str] = ("none",),
              clips: Sequence[Optional[float]] = (None,), lr: float = 0.1, local_steps: int = 1, eps: float = 0.1,
              mixup_alpha: float = 1.0, noise: float = 0.0, partitioning: str = "iid", dirichlet_alpha: float = 0.5,
              server_knows_lr: bool = True, reconstruct: str = "auto", seed: int = 0) -> SimulationPlan:
    """Check the settings, deal them to the clients and split the data.

    Every partition gets at least ``max(batch_size, 2)`` distinct images (2: a mixup partner). When the bundled set
    is too small for that (CIFAR-10 ships 20 images), it is repeated first: clients then share images, and the plan
    says so (``copies``).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; choose one of {NETWORKS}")
    if reconstruct not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruct must be one of {RECONSTRUCTIONS}, got {reconstruct!r}")
    if partitioning not in PARTITIONS:
        raise ValueError(f"partitioning must be one of {PARTITIONS}, got {partitioning!r}")
    bad = [a for a in augmentations if a not in AUGMENTATIONS]
    if bad or not augmentations:
        raise ValueError(f"augmentations must be among {AUGMENTATIONS}, got {list(augmentations)}")
    for name, value in (("num_clients", num_clients), ("rounds", rounds), ("local_steps", local_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive ints, got {list(batch_sizes)}")
    if not clips or any(c is not None and not (c > 0 and math.isfinite(c)) for c in clips):
        raise ValueError(f"clipping norms must be positive (None: no clipping), got {list(clips)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= eps < 1:
        raise ValueError(f"the smoothing eps must lie in [0, 1), got {eps}")
    if not (mixup_alpha > 0 and dirichlet_alpha > 0):
        raise ValueError("mixup_alpha and dirichlet_alpha must be positive")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a non-negative multiplier, got {noise}")
    if noise > 0 and all(c is None for c in clips):
        raise ValueError("noise needs clipping: the local DP noise is calibrated to the clipping norm (give --clip)")
    info = DATASETS[dataset]
    size = info.image_size if image_size is None else int(image_size)
    labels = _samples(dataset, size)[1].numpy()
    settings = deal_settings(num_clients, list(augmentations), list(batch_sizes), list(clips))
    need = max(max(b for _, b, _ in settings), 2)
    copies = max(1, -(-num_clients * need // len(labels)))
    pool = np.tile(np.arange(len(labels)), copies)
    rng = np.random.default_rng(seed)
    parts = (split_iid(pool, num_clients, rng) if partitioning == "iid"
             else split_dirichlet(pool, labels, num_clients, dirichlet_alpha, need, rng))
    parts = [_with_distinct(part, need, len(labels), rng) for part in parts]
    clients = tuple(ClientSetup(i, augmentation, batch, clip, tuple(int(k) for k in part))
                    for i, ((augmentation, batch, clip), part) in enumerate(zip(settings, parts)))
    return SimulationPlan(out=str(out), dataset=dataset, image_size=size, network=network, rounds=rounds, lr=float(lr),
                          local_steps=local_steps, eps=float(eps), mixup_alpha=float(mixup_alpha), noise=float(noise),
                          partitioning=partitioning, dirichlet_alpha=float(dirichlet_alpha),
                          server_knows_lr=server_knows_lr, reconstruct=reconstruct, seed=seed, clients=clients,
                          dataset_size=len(labels), copies=copies)


def _with_distinct(part: np.ndarray, minimum: int, num_images: int, rng: np.random.Generator) -> np.ndarray:
    """``part``'s distinct indices, topped up with other random images to ``minimum`` (a repeated set can deal a
    client two copies of one image; a batch of copies would be one example's gradient, not a batch)."""
    distinct = np.unique(part)
    if len(distinct) >= minimum:
        return distinct
    others = rng.permutation(np.setdiff1d(np.arange(num_images), distinct))[:minimum - len(distinct)]
    return np.concatenate([distinct, others])


# ------------------------------------------------------------------------------------------------ the victims
@functools.lru_cache(maxsize=4)
def _samples(dataset: str, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bundled images, normalised, loaded once per process (every Ray worker loads its own)."""
    return load_samples(dataset, size=size)


def build_network(plan: SimulationPlan) -> nn.Module:
    """The federation's network at its seeded initial weights, in ``eval()`` mode (no dropout, BatchNorm's running
    statistics: one example's gradient depends on that example alone)."""
    info = DATASETS[plan.dataset]
    channels = info.channels
    if plan.network == "mlp":
        with torch.random.fork_rng(devices=[]):  # nn.Linear's constructor draws from the global RNG
            sizes = [channels * plan.image_size ** 2, *MLP_HIDDEN, info.num_classes]
            return FullyConnected(sizes, bias=True, generator=torch.Generator().manual_seed(plan.seed)).eval()
    return build_model(plan.network, info.num_classes, seed=plan.seed,
                       **input_options(plan.network, channels=channels, image_size=plan.image_size))


@dataclass
class Batch:
    """One client's local batch: inputs ``(B, *input_shape)`` and soft targets ``(B, C)`` (float32)."""

    inputs: torch.Tensor
    targets: torch.Tensor


def draw_batch(plan: SimulationPlan, setup: ClientSetup, server_round: int) -> Batch:
    """The batch a client trains on in a round: ``batch_size`` examples of its partition (without replacement
    when it has enough), augmented as its recipe says. Mixup mixes each example with a partner of another class
    from the same partition (the label stays hard when there is none), ``lam ~ Beta(alpha, alpha)``."""
    images, labels = _samples(plan.dataset, plan.image_size)
    labels = labels.numpy()
    num_classes = DATASETS[plan.dataset].num_classes
    rng = np.random.default_rng([plan.seed, server_round, setup.partition])
    part = np.asarray(setup.indices)
    chosen = rng.choice(part, size=setup.batch_size, replace=len(part) < setup.batch_size)
    inputs, targets = [], []
    for index in chosen.tolist():
        cls = int(labels[index])
        x = images[index]
        if setup.augmentation == "smoothing":
            y = smooth_label(cls, num_classes, plan.eps)
        elif setup.augmentation == "mixup":
            others = part[labels[part] != cls]
            partner = int(rng.choice(others)) if len(others) else index
            lam = float(rng.beta(plan.mixup_alpha, plan.mixup_alpha))
            x = mix_inputs(x, images[partner], lam)
            partner_cls = int(labels[partner])
            y = mixup_label(cls, partner_cls, lam, num_classes) if partner_cls != cls else hard_label(cls, num_classes)
        else:
            y = hard_label(cls, num_classes)
        inputs.append(x)
        targets.append(y.to(torch.float32))
    return Batch(torch.stack(inputs), torch.stack(targets))


def local_sgd(model: nn.Module, batch: Batch, *, lr: float, steps: int) -> None:
    """``steps`` plain SGD steps (``torch.optim.SGD``, no momentum) on the batch's mean soft-target
    cross-entropy, in place."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        soft_cross_entropy(model(batch.inputs), batch.targets).backward()
        optimizer.step()


@functools.lru_cache(maxsize=2)
def _worker_network(plan: SimulationPlan) -> nn.Module:
    torch.set_num_threads(1)  # several clients share the machine's cores
    return build_network(plan)


def train_client(plan: SimulationPlan, message: Message, context: Context) -> Message:
    """The simulated client's train handler: load the global weights, train, write the truth, reply.

    The truth goes to ``truth.jsonl`` under the node id the server will see as the reply's source.
    """
    setup = plan.clients[int(context.node_config["partition-id"])]
    sent = message.content.array_records["arrays"]
    config = message.content.config_records["config"]
    lr = float(config["lr"]) if "lr" in config else plan.lr
    steps = int(config.get("local-steps", plan.local_steps))
    server_round = int(config["server-round"])
    model = _worker_network(plan)
    model.load_state_dict(sent.to_torch_state_dict())
    old = [p.detach().clone() for p in model.parameters()]
    batch = draw_batch(plan, setup, server_round)
    local_sgd(model, batch, lr=lr, steps=steps)
    norm = math.sqrt(sum(float((p.detach().double() - o.double()).square().sum())
                         for p, o in zip(model.parameters(), old)))
    clip_factor = min(1.0, setup.clip / norm) if setup.clip is not None and norm > 0 else 1.0
    inputs = f"{TRUTH_INPUTS_DIR}/round{server_round}-client{context.node_id}.npy"
    out = Path(plan.out)
    np.save(out / inputs, batch.inputs.numpy())
    append_jsonl(out / TRUTH_FILE, TruthRecord(
        round=server_round, client=int(context.node_id), partition=setup.partition, batch_size=setup.batch_size,
        labels=batch.targets.double().tolist(), lr=lr, local_steps=steps, clip_factor=clip_factor, clip=setup.clip,
        noise_std=plan.noise * setup.clip if setup.clip is not None else 0.0, augmentation=setup.augmentation,
        update_norm=norm, inputs=inputs))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": setup.batch_size})})
    return Message(content, reply_to=message)


def private_update_mod(plan: SimulationPlan) -> Callable[[Message, Context, Callable], Message]:
    """A client mod that applies each client's own privacy setting with Flower's mods: ``fixedclipping_mod``
    (told the client's clipping norm through the config key it reads), or ``LocalDpMod`` (clipping and local
    Gaussian noise of std ``noise * clip``), or nothing."""

    def mod(message: Message, context: Context, call_next: Callable) -> Message:
        setup = plan.clients[int(context.node_config["partition-id"])]
        if setup.clip is None or message.metadata.message_type != MessageType.TRAIN:
            return call_next(message, context)
        if plan.noise > 0:
            local_dp = LocalDpMod(clipping_norm=setup.clip, sensitivity=setup.clip, epsilon=dp_epsilon(plan.noise),
                                  delta=DP_DELTA)
            return local_dp(message, context, call_next)
        message.content.config_records["config"][KEY_CLIPPING_NORM] = setup.clip
        return fixedclipping_mod(message, context, call_next)

    return mod


def client_app(plan: SimulationPlan) -> ClientApp:
    """The simulated clients' ClientApp (train only; the server evaluates nothing)."""
    app = ClientApp()
    app.train(mods=[private_update_mod(plan)])(functools.partial(train_client, plan))
    return app


# ------------------------------------------------------------------------------------------------ the server
def server_app(plan: SimulationPlan, on_record: Optional[Callable[[AuditRecord], None]] = None) -> ServerApp:
    """FedAvg over every client each round, wrapped in :class:`LeakageAudit`: the attacker sees what this server
    sees (the arrays, its own train config, the node ids), nothing of the clients' recipes or truth."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_network(plan)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=plan.num_clients,
                          min_available_nodes=plan.num_clients)
        audit = LeakageAudit(strategy, model=model, out=plan.out, lr_key="lr" if plan.server_knows_lr else None,
                             input_shape=plan.input_shape, reconstruct=plan.reconstruct, on_record=on_record)
        config = {"local-steps": plan.local_steps, **({"lr": plan.lr} if plan.server_knows_lr else {})}
        audit.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=plan.rounds,
                    train_config=ConfigRecord(config))

    return app


def prepare_output(plan: SimulationPlan) -> Path:
    """Create the output folder, remove a previous run's files (only those), write ``config.json``."""
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (out / TRUTH_INPUTS_DIR).mkdir()
    (out / CONFIG_FILE).write_text(json.dumps(plan.as_config(), indent=1))
    return out


def backend_config(num_clients: int, ray_address: Optional[str], verbose: bool) -> Dict[str, object]:
    """Ray settings: one CPU per client actor, no GPU; a local Ray gets the machine's cores, no dashboard and a
    modest object store; ``ray_address`` joins an existing cluster instead (its own resources)."""
    init: Dict[str, object] = {"include_dashboard": False, "log_to_driver": verbose}
    if ray_address:
        init["address"] = ray_address
    else:
        init.update(num_cpus=min(os.cpu_count() or 1, num_clients), object_store_memory=300 * 1024 ** 2)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init}


def simulate(plan: SimulationPlan, *, ray_address: Optional[str] = None, verbose: bool = False,
             on_record: Optional[Callable[[AuditRecord], None]] = None) -> Path:
    """Run the audited federation with ``flwr.simulation.run_simulation`` on Ray; returns the output folder.

    Ray's workers inherit ``OMP_NUM_THREADS=1`` (one thread per client actor); Flower's INFO logs are silenced
    unless ``verbose`` (``on_record`` shows progress instead).
    """
    out = prepare_output(plan)
    flwr_logger = logging.getLogger("flwr")
    saved_level, saved_threads = flwr_logger.level, os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        run_simulation(server_app(plan, on_record), client_app(plan), num_supernodes=plan.num_clients,
                       backend_name="ray", backend_config=backend_config(plan.num_clients, ray_address, verbose))
    finally:
        flwr_logger.setLevel(saved_level)
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
    return out
