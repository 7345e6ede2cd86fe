"""torch.distributed as the recorder sees it: rank, world size, sharded parameters, and the
one exchange at construction that lets rank 0 prepare the run directory first.

Each rank records to its own part files (numbered in its own block, see ``PartWriter``) and
rank 0 alone writes ``meta.json``, so no two ranks ever write the same file. Nothing here
runs a collective after construction: a rank that fails or finishes early never leaves the
others waiting on the recorder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NestedRunError, RunExistsError, RunLockedError


def _group() -> Any:
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank: from the process group, else torchrun's ``RANK``, else 0."""
    dist = _group()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks: from the process group, else torchrun's ``WORLD_SIZE``, else 1."""
    dist = _group()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", 1))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (FSDP2 parameters, their gradients and optimizer
    state); any other tensor as it is (an FSDP1 parameter is its shard already). Statistics
    of shards need no communication."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, not of this rank's shard: a DTensor counts its global
    shape already; an FSDP1 ``FlatParameter`` holds a padded shard of its unsharded size."""
    unsharded = getattr(param, "_unpadded_unsharded_size", None)  # FSDP1's FlatParameter
    return unsharded.numel() if isinstance(unsharded, torch.Size) else param.numel()


def is_sharded(params: list[nn.Parameter]) -> bool:
    """Whether any parameter is a DTensor with a sharded placement (FSDP2 ``fully_shard``)."""
    return any(
        any(p.is_shard() for p in getattr(t, "placements", ()))
        for t in params
        if callable(getattr(t, "to_local", None))
    )


def fsdp1_shards(model: nn.Module) -> bool:
    """Whether FSDP1 (``FullyShardedDataParallel``) splits parameters of ``model`` across
    ranks: a wrapper in it with a sharding strategy other than NO_SHARD over several ranks.
    Its parameters (``FlatParameter``s, or views of them) are then plain tensors that hold
    this rank's shard, as a DTensor's local tensor does."""
    for module in model.modules():  # the root first: one look where the root is sharded
        strategy = getattr(module, "sharding_strategy", None)
        if type(module).__name__ != "FullyShardedDataParallel" or strategy is None:
            continue
        if getattr(strategy, "name", "NO_SHARD") != "NO_SHARD" and module.world_size > 1:
            return True
    return False


def distributed_info(model: nn.Module, params: list[nn.Parameter]) -> dict[str, Any]:
    """The ``distributed`` entry of meta.json."""
    dist = _group()
    return {
        "world_size": world_size(),
        "backend": str(dist.get_backend()) if dist is not None else None,
        "wrapper": type(model).__name__,
        "sharded": is_sharded(params) or fsdp1_shards(model),
    }


def prepare_on_rank0(out: str | os.PathLike[str], prepare: Callable[[], Path]) -> Path:
    """Run ``prepare`` (create or refuse the run directory) on rank 0 only.

    With an initialised process group of several ranks, every rank waits here for rank 0
    (through the process group's store: the Recorder must be created on every rank) and
    raises rank 0's error too: no rank writes a part before the directory is ready, and a
    refused directory stops every rank instead of leaving the others waiting in their first
    collective. Without a process group the ranks do not wait for each other.
    """
    error: OSError | None = None
    path = Path(out)
    if rank() == 0:
        try:
            path = prepare()
        except OSError as err:  # RunExistsError, RunLockedError, PermissionError, a failed mkdir
            error = err
    dist = _group()
    if dist is not None and dist.get_world_size() > 1:
        sent = None if error is None else (type(error).__name__, str(error))
        got = answer_from_rank0(dist, sent, os.path.abspath(out))
        if error is None and got is not None:
            kind, message = got
            error = _rebuilt(kind, f"rank 0: {message}")
    if error is not None:
        raise error
    return path


#: How many answers rank 0 has given in this process, per run directory: the store's keys.
_ANSWERS: dict[str, int] = {}

#: Backends whose process group holds a placeholder store (MPI's, the fake one's): no keys.
_NO_STORE_BACKENDS = ("mpi", "fake")


def answer_from_rank0(dist: Any, value: Any, topic: str) -> Any:
    """Rank 0's ``value`` about ``topic`` (small, JSON-serialisable: a tuple arrives as a
    list) on every rank, through the process group's key-value store: rank 0 sets a key,
    each other rank reads it and sets its own acknowledgement, and rank 0 waits for all of
    them (so it never leaves, nor ends a process that serves the store, before every rank
    has its answer; a Recorder made on some ranks only waits as a collective would), then
    deletes the keys.

    Why not a collective: a broadcast's tensors are Python's, and a gloo work still held by
    gloo's thread when the interpreter exits (the process refused a run and ended) frees
    them there, taking the GIL during finalization, which aborts the process ("terminate
    called without an active exception"; 4 of 50 two-rank runs under load, and again with
    the tensors kept in a module global, which finalization clears too). A store has no
    tensors and no device. Without a usable store, ``broadcast_object_list``."""
    # The key names the run directory (every rank records into the same one) and how many
    # times this process asked about it, so a Recorder made on rank 0 only, for another
    # directory, is never taken for the next one every rank makes.
    count = _ANSWERS[topic] = _ANSWERS.get(topic, -1) + 1
    key = f"stabscope/run-dir/{topic}/{count}"
    store = _default_store(dist)
    if store is None or str(dist.get_backend()) in _NO_STORE_BACKENDS:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    rank, world = dist.get_rank(), dist.get_world_size()
    acks = [f"{key}/read/{r}" for r in range(1, world)]
    if rank == 0:
        store.set(key, json.dumps(value))
        store.wait(acks)  # the store's timeout, as the process group's own collectives
        for done in (key, *acks):
            try:
                store.delete_key(done)
            except Exception:  # a store without deletion keeps a few bytes: no harm
                break
        return value
    got = json.loads(store.get(key))
    store.set(f"{key}/read/{rank}", "1")
    return got


def _default_store(dist: Any) -> Any:
    """The default process group's store (torch's own accessor: private, so any failure
    to reach it means no store)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # an older or newer torch without it, a group torch set up otherwise
        return None


def _rebuilt(kind: str, message: str) -> OSError:
    types: dict[str, type[OSError]] = {
        "RunExistsError": RunExistsError,
        "RunLockedError": RunLockedError,
        "NestedRunError": NestedRunError,
        "PermissionError": PermissionError,
    }
    return types.get(kind, OSError)(message)
