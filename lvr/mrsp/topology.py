"""Where a rank sits when the world is split into data-parallel replicas of MR-SP groups.

world = dp x sp: each sequence-parallel group (contiguous ranks) holds one replica's samples and
splits their encoding and prefill; the dp groups take disjoint slices of every step's prompts.
Across nodes (torchrun ``--nnodes``) the SP groups stay inside a node (`check_sp_in_node`); the
DP groups span the nodes.
These helpers build the groups and move small per-step records (decode failures, reward
summaries, loss statistics) between the DP groups; the RL recipe decides what is global.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lvr.mrsp.comm import MrspError


@dataclass
class Topology:
    """This rank's MR-SP group and its place among the data-parallel replicas."""

    sp_group: Any = None  # this rank's SP process group (None in one process)
    dp_group: Any = None  # ranks at the same SP position in every SP group (None when dp == 1)
    dp_rank: int = 0  # which SP group this rank is in (= which slice of the step's prompts)
    dp_size: int = 1
    leader: int = 0  # global rank of SP rank 0 of this group (samples, scores, broadcasts)


def dp_size_for(sp_size: int, world: int) -> int:
    """The number of SP groups (sp_size 0: one group of all ranks).

    Raises:
        MrspError: `sp_size` does not divide the world size.

    >>> dp_size_for(0, 8), dp_size_for(2, 8)
    (1, 4)
    """
    sp = sp_size or world
    if sp < 0 or world % sp:
        raise MrspError(f"sp_size ({sp_size}) must divide the world size ({world})")
    return world // sp


@dataclass(frozen=True)
class Node:
    """This process's node, as torchrun describes it (one node when not launched by torchrun).

    torchrun numbers ranks node by node (``RANK = first + LOCAL_RANK``), so the ranks of a node
    are contiguous and a contiguous SP group stays inside a node exactly when `check_sp_in_node`
    passes.
    """

    local_world: int  # ranks on this node (LOCAL_WORLD_SIZE)
    first_rank: int  # global rank of this node's local rank 0 (RANK - LOCAL_RANK)
    nodes: int  # nodes of the job (GROUP_WORLD_SIZE)

    @classmethod
    def from_env(cls, env: Mapping[str, str], world: int) -> Node:
        """Read the variables torchrun sets (without them: one node holding the whole world)."""
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        first = int(env.get("RANK", "0")) - int(env.get("LOCAL_RANK", "0"))
        nodes = int(env.get("GROUP_WORLD_SIZE", max(1, world // max(local_world, 1))))
        return cls(local_world, first, nodes)


def check_sp_in_node(sp_size: int, world: int, node: Node) -> None:
    """SP groups must stay inside a node: Ulysses attention runs all-to-alls inside the group in
    every layer, which only a node's interconnect carries at speed (data parallelism, one
    gradient all-reduce per step, is what crosses nodes).

    Raises:
        MrspError: A group of this node would hold ranks of another node (one line, with the
            setting that fixes it).

    >>> check_sp_in_node(2, 4, Node(local_world=2, first_rank=2, nodes=2))
    >>> check_sp_in_node(0, 4, Node(local_world=2, first_rank=2, nodes=2))
    Traceback (most recent call last):
    ...
    lvr.mrsp.comm.MrspError: sp_size 0 (one SP group of all 4 ranks) would span nodes (2 nodes, 2 ranks on this one): SP groups must stay inside a node; set sp_size to a divisor of 2, e.g. --set sp_size=2
    """
    sp = sp_size or world
    if node.local_world == world or (node.local_world % sp == 0 and node.first_rank % sp == 0):
        return
    what = f"sp_size {sp_size}" + (f" (one SP group of all {world} ranks)" if not sp_size else "")
    raise MrspError(
        f"{what} would span nodes ({node.nodes} nodes, {node.local_world} ranks on this one): "
        f"SP groups must stay inside a node; set sp_size to a divisor of {node.local_world}, "
        f"e.g. --set sp_size={node.local_world}"
    )


def build_topology(sp_size: int, world: int, rank: int) -> Topology:
    """The SP and DP groups of this rank (contiguous SP groups; one process: no groups).

    `new_group` is collective over the whole world: every rank creates every group, in the same
    order, even the ones it is not in.
    """
    if world == 1:
        return Topology()
    dp = dp_size_for(sp_size, world)
    sp = world // dp
    if dp == 1:
        return Topology(sp_group=dist.group.WORLD)
    sp_groups = [dist.new_group(list(range(k * sp, (k + 1) * sp))) for k in range(dp)]
    dp_groups = [dist.new_group(list(range(j, world, sp))) for j in range(sp)]
    k, j = divmod(rank, sp)
    return Topology(sp_groups[k], dp_groups[j], k, dp, k * sp)


def share(topo: Topology, items: list[int]) -> list[int]:
    """This DP group's contiguous slice of `items` (the first groups take one more if uneven).

    >>> share(Topology(dp_rank=1, dp_size=2), [0, 1, 2, 3, 4])
    [3, 4]
    """
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
