"""Sharded scoring: ``robometer-score`` under torchrun scores a slice of the episodes per rank, one merged output.

    torchrun --nproc_per_node 4 -m robometer_ros.training.evaluation.score MODEL --bags /fleet/bags --out scores.parquet
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m robometer_ros.training.evaluation.score MODEL --dataset /shared/data --out scores.parquet

* Which episodes a rank takes (``Shard``, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
  LOCAL_WORLD_SIZE): the *units* (dataset episodes, or bags: a bag is read by one rank only) round-robin,
  unit ``i`` on rank ``i % WORLD_SIZE``. ``ShardedEpisodes`` reads only this rank's units and records
  which unit each trajectory came from.
* One merged output: ``merge_on_main`` gathers every rank's ``EpisodeScores`` on rank 0 over
  torch.distributed (gloo: CPU tensors, works between machines; no shared filesystem needed), puts them
  back in single-process order (by unit, then by order within the unit), makes bag episode ids unique
  exactly as ``read_bags`` does, and ranks them over all episodes; rank 0 writes the tables, the other
  ranks write nothing. The merged tables equal a single-process run's.
* GPUs: with several ranks on one machine, ``pin_local_gpu`` gives each rank its own GPU through
  CUDA_VISIBLE_DEVICES before any CUDA library starts, so every backend (TensorRT, ONNX Runtime's
  CUDA / TensorRT providers, torch) uses "device 0" = that rank's GPU.

A rank that fails exits non-zero and torchrun stops the others: no partial output is written.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from robometer_ros.trajectory import Trajectory

T = TypeVar("T")

#: how long rank 0 waits for the slowest rank at the gather (a fleet's bags can take hours per rank)
GATHER_TIMEOUT = datetime.timedelta(hours=24)


class ShardError(ValueError):
    """The torchrun environment is inconsistent (e.g. RANK >= WORLD_SIZE)."""


@dataclass(frozen=True)
class Shard:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that merges and writes."""
        return self.rank == 0

    def indices(self, count: int) -> range:
        """The unit indices (of ``count``) this rank takes: rank, rank + world_size, ..."""
        return range(self.rank, count, self.world_size)


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard:
    """The ``Shard`` torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (unset: 0 of 1)."""
    env = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        value = env.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ShardError(f"{name}={value!r} is not an integer") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local_world = number("LOCAL_WORLD_SIZE", 1)
    local_rank = number("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise ShardError(f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}: need 0 <= LOCAL_RANK < "
                         "LOCAL_WORLD_SIZE")
    return Shard(rank, world, local_rank, local_world)


def _gpu_count() -> int | None:
    """GPUs on this machine per nvidia-smi (None without it): counted without starting CUDA here."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pin_local_gpu(shard: Shard, environ: MutableMapping[str, str] | None = None,
                  gpu_count: Callable[[], int | None] = _gpu_count) -> str | None:
    """Give this rank its own GPU when several ranks share the machine; returns the CUDA_VISIBLE_DEVICES set.

    The rank takes entry ``local_rank % n`` of the visible GPUs (the CUDA_VISIBLE_DEVICES list, else
    0..n-1 from nvidia-smi); with more ranks than GPUs they share. Nothing changes for a single local rank
    or a machine without GPUs. Call it before anything starts CUDA.
    """
    env = os.environ if environ is None else environ
    if shard.local_world_size <= 1:
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        count = gpu_count()
        devices = [str(i) for i in range(count or 0)]
    if not devices:
        return None
    chosen = devices[shard.local_rank % len(devices)]
    env["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


class ShardedEpisodes:
    """The trajectories of this rank's units, in order; ``units[i]`` is read with ``read(units[i])``.

    ``unit_of`` grows as iteration goes: the unit index of each trajectory yielded so far (what
    ``merge_on_main`` needs to restore the single-process order).
    """

    def __init__(self, shard: Shard, units: Sequence[Any], read: Callable[[Any], Iterable[Trajectory]]) -> None:
        self.shard, self.units, self.read = shard, units, read
        self.unit_of: list[int] = []

    def __len__(self) -> int:
        """Units this rank reads (a bag may hold several episodes, or none)."""
        return len(self.shard.indices(len(self.units)))

    def __iter__(self) -> Iterator[Trajectory]:
        for index in self.shard.indices(len(self.units)):
            for trajectory in self.read(self.units[index]):
                self.unit_of.append(index)
                yield trajectory


def gather_on_main(shard: Shard, value: T, timeout: datetime.timedelta = GATHER_TIMEOUT) -> list[T] | None:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the other ranks.

    Uses the job's torch.distributed process group when one is initialised, else starts a gloo group
    from torchrun's environment (MASTER_ADDR / MASTER_PORT) for the gather and ends it afterwards.
    """
    if not shard.distributed:
        return [value]
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world_size, timeout=timeout)
    try:
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        gathered: list[T] | None = [None] * shard.world_size if shard.is_main else None  # type: ignore[list-item]
        dist.gather_object(value, gathered, dst=0, group=group)
    finally:
        if started:
            dist.destroy_process_group()
    return gathered


def merge_on_main(shard: Shard, episodes: Sequence[Any], unit_of: Sequence[int],
                  unit_names: Sequence[str] | None = None) -> list[Any] | None:
    """All ranks' EpisodeScores in single-process order, ranked over all of them, on rank 0 (None elsewhere).

    ``episodes[j]`` came from unit ``unit_of[j]`` (``ShardedEpisodes.unit_of``); see ``merge_gathered``.
    """
    if len(episodes) != len(unit_of):
        raise ValueError(f"{len(episodes)} episodes but {len(unit_of)} unit indices")
    gathered = gather_on_main(shard, (list(unit_of), list(episodes)))
    return None if gathered is None else merge_gathered(gathered, unit_names)


def merge_gathered(gathered: Sequence[tuple[Sequence[int], Sequence[Any]]],
                   unit_names: Sequence[str] | None = None) -> list[Any]:
    """Per rank (unit indices, EpisodeScores) -> one list in single-process order, ids unique, ranks assigned.

    A unit is read by one rank only, so sorting by (unit, position in that rank's list) restores the
    single-process order. ``unit_names``: the bag names, when the units are bags read without unique ids
    (``read_bags(..., unique_ids=False)``): the ids are then made unique in the merged order, exactly as
    one ``read_bags`` over all bags does.
    """
    from robometer_ros.training.data.bags import UniqueEpisodeIds
    from robometer_ros.training.evaluation.score import assign_ranks

    keyed = [(unit, position, episode) for units, scored in gathered
             for position, (unit, episode) in enumerate(zip(units, scored))]
    keyed.sort(key=lambda item: (item[0], item[1]))
    if unit_names is not None:
        ids = UniqueEpisodeIds()
        for unit, _, episode in keyed:
            episode.episode_id = ids.assign(episode.episode_id, unit_names[unit])
    merged = [episode for _, _, episode in keyed]
    assign_ranks(merged)
    return merged


def log_rank(shard: Shard, message: str) -> None:
    """A line on stderr prefixed with the rank (only in a sharded run)."""
    if shard.distributed:
        print(f"[rank {shard.rank}/{shard.world_size}] {message}", file=sys.stderr, flush=True)
