"""Independent trials run one after another or spread over a Ray cluster: :func:`map_trials`.

An experiment's trials do not depend on each other: each carries its own seeded draw (:func:`common.draw_trials`)
and per-sample seeds, and rebuilds the network the same way wherever it runs (:func:`common.shared_setup`). So
the results cannot depend on where or in which order the trials ran, and :func:`map_trials` hands them back in
the order of the trials either way: an experiment appends them to its CSV as they come and writes the same rows
in the same order as a serial run (only the measured ``time_ms`` differs, as it does between two serial runs).

Ray is imported only when a cluster is asked for; it is not one of gradleak's own requirements. On a cluster of
several machines, every node needs gradleak (and what the experiment uses, e.g. Opacus) installed, and a
checkpoint given as ``weights`` at the same path (a shared file system): the trials carry the checkpoint's path,
not the network.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

import torch
from tqdm.auto import tqdm

__all__ = ["map_trials", "RAY_MISSING", "LOCAL_OBJECT_STORE_BYTES"]

Item = TypeVar("Item")
Result = TypeVar("Result")

RAY_MISSING = 'running trials on Ray needs Ray: pip install "ray[default]" (or gradleak[fl], which brings it)'
#: A local Ray's object store: the trials exchange rows, not tensors, so a small one is plenty (Ray's default,
#: 30 % of the memory, warns on machines with a small /dev/shm).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 ** 2


def map_trials(function: Callable[[Item], Result], items: Iterable[Item], *, ray_address: Optional[str] = None,
               progress: bool = True, desc: Optional[str] = None) -> Iterator[Result]:
    """``function(item)`` for every item, yielded in the order of ``items``, with a tqdm bar over the items.

    Args:
        function: what one trial does; for Ray it must pickle (a module-level function, or a
            ``functools.partial`` of one holding the experiment's settings) and be importable on every node.
        items: the trials (each carries everything ``function`` needs; small: they travel to the workers).
        ray_address: None runs the items here, one after another. "local" (or "") starts a local Ray with this
            machine's cores; any other value is passed to ``ray.init(address=...)`` ("auto", "ray://host:10001").
            When this process is already connected to Ray, that session is used as it is; a session started here
            stays up for the next sweeps of the process (``ray.shutdown()`` ends it). Every item is one Ray task of
            one CPU, running torch on one thread.
        progress: show the bar (it counts items as they finish, in any order).
        desc: the bar's label.

    Yields:
        ``function(item)`` per item, in the order of ``items``: a result that finishes early waits for those
        before it, so the caller's output does not depend on the scheduling.
    """
    items = list(items)
    with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        if ray_address is None:
            for item in items:
                result = function(item)
                bar.update()
                yield result
        elif items:   # nothing left to do (a finished sweep resumed) starts no Ray
            yield from _map_on_ray(function, items, ray_address, bar)


def _one_thread(function: Callable[[Item], Result], item: Item) -> Result:
    """A Ray task's body: torch on one thread, since Ray gives every task one core and a worker's default of one
    thread per core of the machine oversubscribes it (spinning OpenMP threads slow every task down)."""
    torch.set_num_threads(1)
    return function(item)


def _map_on_ray(function: Callable[[Item], Result], items: List[Item], address: str, bar: tqdm) -> Iterator[Result]:
    try:
        import ray
    except ImportError as error:
        raise ImportError(RAY_MISSING) from error

    if not ray.is_initialized():
        if address in ("local", ""):
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            ray.init(address=address, include_dashboard=False)
    task = ray.remote(num_cpus=1)(_one_thread)
    shipped = ray.put(function)   # sent to the object store once, not with every task
    index_of = {task.remote(shipped, item): index for index, item in enumerate(items)}
    waiting = list(index_of)
    finished: Dict[int, Any] = {}
    next_index = 0
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            finished[index_of[ready[0]]] = ray.get(ready[0])
            bar.update()
            while next_index in finished:
                yield finished.pop(next_index)
                next_index += 1
    finally:   # the caller stopped early (an error, Ctrl-C): the cluster need not finish the sweep
        for ref in waiting:
            ray.cancel(ref)
