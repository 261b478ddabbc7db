"""``LeakageAudit``: a Flower strategy wrapper that measures what every client update leaks to the server.

It sits where Flower's own differential-privacy wrappers sit, around any Message-API strategy::

    from flwr.serverapp.strategy import FedAvg
    from gradleak.fl import LeakageAudit

    strategy = LeakageAudit(FedAvg(...), model=Net(), out="audit/")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), train_config=ConfigRecord({"lr": 0.05}))

and delegates everything to the wrapped strategy. On the way it remembers the arrays (and train config) it sent
each node in ``configure_train``, and in ``aggregate_train`` reads each reply against them with
:func:`gradleak.fl.audit.read_update` BEFORE handing the replies, untouched, to the wrapped strategy: what is
aggregated never changes. Every conclusion is appended to ``out/records.jsonl`` as soon as it is made; a
malformed reply (a client error, missing or extra arrays, wrong shapes, NaN) becomes a record with ``error`` set,
never an exception in the server.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from numbers import Real
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from .audit import RECONSTRUCTIONS, RESERVED_OPTIONS, load_arrays, read_update
from .records import RECONSTRUCTIONS_DIR, RECORDS_FILE, AuditRecord, append_jsonl

PathLike = Union[str, Path]
_log = logging.getLogger("flwr")


def _single(records: Mapping[str, object], what: str, kind: str):
    """The one record of a RecordDict's ``array_records`` / ``config_records`` (``kind`` names them), or a
    ValueError saying how many there are."""
    if len(records) != 1:
        raise ValueError(f"{what} carries {len(records)} {kind}s ({sorted(records)}); the audit reads exactly one")
    return next(iter(records.values()))


def _positive(value: object) -> Optional[float]:
    """``value`` as a learning rate if it is a positive finite number, else None (the scale stays unknown)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


class LeakageAudit(Strategy):
    """Wrap a Flower Message-API strategy and record what each client update leaks (label, scale, batch, input).

    Args:
        strategy: the strategy that really runs the federation (FedAvg, FedProx, a DP wrapper, ...).
        model: the network the federation trains (its architecture: the audit loads the sent weights into its own
            copy, in ``eval()`` mode).
        out: folder for ``records.jsonl`` (appended to) and ``reconstructions/``.
        lr_key, local_steps_key: the train-config keys that tell the clients their learning rate and local SGD
            steps. When the config the server sends has them, the audit reads updates with that scale first;
            None, or a config without them, leaves the scale unknown (it is then recovered).
        input_shape: one input's shape, e.g. ``(3, 32, 32)``, for the reconstructions.
        reconstruct: "auto" (analytic inversion for fully connected ReLU nets), "analytic", "matching" (gradient
            matching, any network; slow) or "none".
        matching_iterations: the gradient-matching budget per update.
        on_record: called with every :class:`AuditRecord` once it is written (e.g. a progress bar's update).
        **recovery_options: passed to :func:`gradleak.recover_from_update` (``label_format``, ``method``, ``head``,
            ``weight_decay``, ...); ``rank_one_tol`` defaults to None so that batches are diagnosed, not refused.
    """

    def __init__(self, strategy: Strategy, *, model: nn.Module, out: PathLike, lr_key: Optional[str] = "lr",
                 local_steps_key: Optional[str] = "local-steps", input_shape: Optional[Sequence[int]] = None,
                 reconstruct: str = "auto", matching_iterations: int = 300,
                 on_record: Optional[Callable[[AuditRecord], None]] = None, **recovery_options) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"LeakageAudit wraps a Message-API strategy (flwr.serverapp.strategy.Strategy), got "
                            f"{type(strategy).__name__}; the legacy flwr.server.strategy API is not supported")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if reconstruct not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruct must be one of {RECONSTRUCTIONS}, got {reconstruct!r}")
        reserved = RESERVED_OPTIONS & set(recovery_options)
        if reserved:
            raise TypeError(f"{sorted(reserved)} come from the train config the server sends (lr_key, "
                            "local_steps_key), not from recovery_options")
        self.strategy = strategy
        self.out = Path(out)
        self.records_path = self.out / RECORDS_FILE
        self.lr_key, self.local_steps_key = lr_key, local_steps_key
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.reconstruct, self.matching_iterations = reconstruct, matching_iterations
        self.on_record = on_record
        self.recovery_options = recovery_options
        self._model = copy.deepcopy(model).eval()
        self._loaded: Optional[ArrayRecord] = None  # the sent ArrayRecord whose weights self._model holds
        # {round: {node id: (ArrayRecord sent, ConfigRecord sent) or the reason it cannot be read}}
        self._sent: Dict[int, Dict[int, Union[Tuple[ArrayRecord, ConfigRecord], str]]] = {}
        self.out.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LeakageAudit({self.strategy!r}, out={str(self.out)!r})"

    def summary(self) -> None:
        """Log the audit's settings, then the wrapped strategy's summary."""
        _log.info("\t├──> gradleak leakage audit: records to %s (lr from config key %r, reconstruct=%s)",
                  self.records_path, self.lr_key, self.reconstruct)
        self.strategy.summary()

    # ---------------------------------------------------------------- training: remember, read, pass through
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, unchanged; the arrays and config each node gets are remembered."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent: Dict[int, Union[Tuple[ArrayRecord, ConfigRecord], str]] = {}
        for message in messages:
            try:
                sent[message.metadata.dst_node_id] = (
                    _single(message.content.array_records, "the message the server sent", "ArrayRecord"),
                    _single(message.content.config_records, "the message the server sent", "ConfigRecord"))
            except ValueError as error:
                sent[message.metadata.dst_node_id] = str(error)
        self._sent = {r: nodes for r, nodes in self._sent.items() if r >= server_round - 1}
        self._sent[server_round] = sent
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Audit every reply (records appended as made), then aggregate the very same replies with the wrapped
        strategy."""
        replies = list(replies)
        for reply in replies:
            record = self._audit(server_round, reply)
            append_jsonl(self.records_path, record)
            if self.on_record is not None:
                self.on_record(record)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ---------------------------------------------------------------- one reply
    def _arrays(self, record: ArrayRecord) -> Union[Dict[str, np.ndarray], List[np.ndarray]]:
        """Named after the model's ``state_dict()`` when the record's keys are its names, else in record order."""
        state = self._model.state_dict()
        if all(key in state for key in record.keys()):
            return {key: record[key].numpy() for key in record.keys()}
        return [record[key].numpy() for key in record.keys()]

    def _schedule(self, config: ConfigRecord) -> Tuple[Optional[float], int]:
        """``(lr, local steps)`` as the train config the server sent says (None: unknown)."""
        lr = _positive(config.get(self.lr_key)) if self.lr_key else None
        steps = config.get(self.local_steps_key) if self.local_steps_key else None
        return lr, (steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 else 1)

    def _audit(self, server_round: int, reply: Message) -> AuditRecord:
        started = time.perf_counter()
        node = int(reply.metadata.src_node_id)
        lr, steps = None, None
        try:
            if reply.has_error():
                raise RuntimeError(f"the client replied with an error (code {reply.error.code}): "
                                   f"{reply.error.reason}")
            sent = self._sent.get(server_round, {}).get(node)
            if sent is None:
                raise LookupError(f"no training message was sent to node {node} in round {server_round}")
            if isinstance(sent, str):
                raise ValueError(sent)
            sent_arrays, config = sent
            lr, steps = self._schedule(config)
            received = _single(reply.content.array_records, "the reply", "ArrayRecord")
            if list(received.keys()) != list(sent_arrays.keys()):
                missing = [k for k in sent_arrays.keys() if k not in received]
                extra = [k for k in received.keys() if k not in sent_arrays]
                raise ValueError(f"the reply's arrays are not the ones sent: missing {missing[:5]}, unexpected "
                                 f"{extra[:5]}" + ("" if missing or extra else ", or in another order"))
            if self._loaded is not sent_arrays:
                self._loaded = None
                load_arrays(self._model, self._arrays(sent_arrays))
                self._loaded = sent_arrays
            reading = read_update(self._model, self._arrays(received), lr=lr, local_steps=steps,
                                  input_shape=self.input_shape, reconstruct=self.reconstruct,
                                  matching_iterations=self.matching_iterations, **self.recovery_options)
        except Exception as error:  # a malformed reply is a finding to record, never a reason to stop the server
            return AuditRecord(round=server_round, client=node, error=f"{type(error).__name__}: {error}", lr=lr,
                               local_steps=steps, seconds=time.perf_counter() - started)
        result = reading.result
        saved = None
        if reading.reconstruction is not None:
            folder = self.out / RECONSTRUCTIONS_DIR
            folder.mkdir(exist_ok=True)
            saved = f"{RECONSTRUCTIONS_DIR}/round{server_round}-client{node}.npy"
            np.save(self.out / saved, reading.reconstruction.detach().float().cpu().numpy())
        return AuditRecord(
            round=server_round, client=node, determined=reading.determined, label_format=result.label_format,
            classes=[int(c) for c in result.classes], eps=float(result.eps),
            lam=None if result.lam is None else float(result.lam), label=result.label.double().tolist(),
            gradient_scale=float(result.gradient_scale), scale_source=reading.scale_source, lr=lr,
            local_steps=steps, batch_size_estimate=reading.batch_size_estimate, rank_limit=reading.rank_limit,
            rank_one_ratio=float(result.rank_one_ratio), residual=float(result.residual), method=result.method,
            update_norm=reading.update_norm, reconstruction=saved, reconstruction_method=reading.reconstruction_method,
            message=reading.message, seconds=time.perf_counter() - started)
