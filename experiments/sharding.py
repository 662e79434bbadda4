"""Data-parallel (and optional FSDP) sharding over all local devices with one `data` mesh axis."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when launched as several processes.

    A launcher sets `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES`
    and `JAX_PROCESS_ID`; under SLURM or Open MPI, `JAX_DISTRIBUTED=1` lets jax read all three
    from the cluster's own variables. Every process then runs the same command.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address and os.environ.get("JAX_DISTRIBUTED") != "1":
        return
    num, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    if address and (num is None) != (pid is None):
        raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, under SLURM)")
    try:
        jax.distributed.initialize(address, int(num) if num else None, int(pid) if pid else None)
    except (ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"jax.distributed.initialize failed ({first}); a multi-process launch needs "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or JAX_DISTRIBUTED=1 "
            "under SLURM/Open MPI"
        ) from error


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: the leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P("data"))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = 2**12) -> P:
    """Shards the largest axis divisible by the number of devices; small arrays stay replicated."""
    if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = "data"
            return P(*spec)
    return P()


def state_shardings(state, mesh: Mesh, *, fsdp: bool):
    """Shardings for a pytree of arrays: replicated, or FSDP-sharded over `data`."""
    n = mesh.devices.size

    def sharding(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), n) if fsdp else P())

    return jax.tree.map(sharding, state)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host batch -> global jax arrays sharded over `data`.

    Every process builds the same global batch (a pure function of seed and step) and hands
    over only its own rows, so single- and multi-process runs see identical data.
    """
    n = jax.process_count()
    out = {}
    for name, value in batch.items():
        rows = value.shape[0] // n
        local = value[jax.process_index() * rows : (jax.process_index() + 1) * rows]
        out[name] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out
