"""Data parallelism across MR-SP groups for `lvr rl`: the world is split as dp x sp.

Each sequence-parallel group (contiguous ranks) holds one replica's samples; the dp groups take
disjoint slices of every step's prompts. These helpers build the groups and move the small
per-step records (decode failures, reward summaries, loss statistics) between DP groups; the
recipe (`lvr/train/rl.py`) decides what is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lvr.train import common as C
from lvr.train.rl_config import RLConfig


@dataclass
class Topology:
    """Where this rank sits in world = dp x sp: one MR-SP group per data-parallel replica."""

    dp_group: Any = None  # ranks at the same SP position in every SP group (None when dp == 1)
    dp_rank: int = 0  # which SP group this rank is in (= which slice of the step's prompts)
    dp_size: int = 1
    leader: int = 0  # global rank of SP rank 0 of this group (samples, scores, broadcasts)


def check_topology(cfg: RLConfig, world: int) -> None:
    """world = dp x sp: the split must be exact, and dp > 1 must avoid what only works with dp 1."""
    sp = cfg.sp_size or world
    if sp < 0 or world % sp:
        raise C.TrainError(f"sp_size ({cfg.sp_size}) must divide the world size ({world})")
    dp = world // sp
    if dp == 1:
        return
    if cfg.rollout_batch % dp or cfg.update_batch % dp:
        raise C.TrainError(
            f"rollout_batch ({cfg.rollout_batch}) and update_batch ({cfg.update_batch}) must be "
            f"multiples of the data-parallel size {dp} (world {world} / sp_size {sp})"
        )
    if cfg.algo.dynamic_sampling:  # refills would draw different prompt counts per DP group
        raise C.TrainError("algo.dynamic_sampling needs one SP group (sp_size 0 or = world size)")
    if cfg.rollout.engine == "vllm":  # the engine runs on global rank 0 only
        raise C.TrainError("rollout.engine=vllm needs one SP group (sp_size 0 or = world size)")


def topology(cfg: RLConfig, info: C.DistInfo) -> tuple[Any, Topology]:
    """This rank's SP group and its place among the DP replicas (contiguous SP groups).

    `new_group` is collective over the whole world: every rank creates every group, in the same
    order, even the ones it is not in.
    """
    import torch.distributed as dist

    if not info.distributed:
        return None, Topology()
    world = info.world_size
    sp = cfg.sp_size or world
    dp = world // sp
    if dp == 1:
        return dist.group.WORLD, Topology()
    sp_groups = [dist.new_group(list(range(k * sp, (k + 1) * sp))) for k in range(dp)]
    dp_groups = [dist.new_group(list(range(j, world, sp))) for j in range(sp)]
    k, j = divmod(info.rank, sp)
    return sp_groups[k], Topology(dp_groups[j], k, dp, k * sp)


def share(topo: Topology, items: list[int]) -> list[int]:
    """This DP group's contiguous slice of `items` (the first groups take one more if uneven)."""
    dp, d = topo.dp_size, topo.dp_rank
    per, extra = divmod(len(items), dp)
    lo = d * per + min(d, extra)
    return items[lo : lo + per + (d < extra)]


def dp_gather(topo: Topology, obj: Any) -> list[Any]:
    """`obj` of every DP group, in DP order (SP groups hold the same objects on all their ranks)."""
    if topo.dp_group is None:
        return [obj]
    out: list[Any] = [None] * topo.dp_size
    torch.distributed.all_gather_object(out, obj, group=topo.dp_group)
    return out


def dp_sum(topo: Topology, values: dict[str, float]) -> dict[str, float]:
    """Sum per-key float statistics over the DP groups (keys may be missing on some groups)."""
    parts = dp_gather(topo, values)
    keys = list(dict.fromkeys(k for part in parts for k in part))
    return {k: sum(part.get(k, 0.0) for part in parts) for k in keys}
