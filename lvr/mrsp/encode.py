"""MR-SP stage 1: paralleled video encoding and the embedding cache.

The Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) never let one temporal patch
(2 frames) see another: attention runs with `cu_seqlens` per temporal patch (and Qwen2.5-VL's
windows sit inside one), and positions are per frame. Encoding whole temporal patches separately
is therefore exactly encoding the video (checked per family in the tests), so the `t` temporal
patches are dealt out in contiguous runs (the first `t % sp` ranks take one more; a rank may get
none when t < sp), each rank encodes its run with the model's own `get_video_features`, and one
variable-size all-gather reassembles the video's `VideoEmbeds` in order: the `[N_video_tokens, D]`
merged tokens and, for Qwen3-VL, one `[N_video_tokens, D]` DeepStack tensor per layer (gathered
side by side in one collective). LLaVA-OneVision's SigLIP tower encodes every frame alone, so its
units are frames; the newline row it appends once per video is kept from the last run only.

`EmbeddingCache` then serves one encode per video per step to the G rollouts and the old-policy,
reference and policy prefills (the public code cached pixels and re-ran the tower every forward).
Keys are (video id, frame indices, resolution, vision-weights version); disk entries are also
named by the vision tower they came from (its config and weights), so a cache folder shared by
two models never serves one model's embeddings to the other.

Frozen vision (the default for RL, as the paper effectively does with cached embeddings): encoding
runs under no_grad and entries may also be written to disk (`cache_dir`) for later steps. Rank 0
writes; a hit needs every rank of the group to see the file (agreed by an all-reduce, so that either
all ranks encode or none), so put `cache_dir` on storage the whole SP group shares.
Trained vision: pass `trainable=True`; encoding records the graph, the all-gather's backward sums
the gradient over the group and slices this rank's rows, bump `weights_version` after every optimizer
step (or call `new_step`), and backpropagate each step's graph once (every rollout/prefill shares it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lvr.artifacts import content_id
from lvr.models import family
from lvr.models.family import FamilyError, VideoEmbeds
from lvr.mrsp.comm import MrspError, gather_rows, sp_rank, sp_size


def split_counts(n: int, parts: int) -> list[int]:
    """Deal `n` items into `parts` contiguous runs, the first `n % parts` one longer.

    >>> split_counts(5, 2)
    [3, 2]
    >>> split_counts(1, 2)
    [1, 0]
    """
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """Return the model's vision tower (where its family keeps it)."""
    try:
        return family.vision_tower(model)
    except FamilyError as exc:
        raise MrspError(str(exc)) from None


def encode_video(
    model: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor
) -> VideoEmbeds:
    """Encode one video (or a run of its units) with the model's vision tower.

    Args:
        model: The VLM.
        pixels: `[t * h * w, C * T_patch * p * p]` patch rows, or `[1, F, C, H, W]` frames
            (`lvr.models.family.encode_video`).
        grid_thw: `[3]` their grid (`lvr.models.family.video_grid`).

    Returns:
        `VideoEmbeds`: one row per video placeholder (+ DeepStack features).
    """
    try:
        return family.encode_video(model, pixels, grid_thw)
    except FamilyError as exc:
        raise MrspError(str(exc)) from None


def encode_video_sp(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    grid_thw: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> VideoEmbeds:
    """Encode one video with its units (temporal patches, or frames) split over the SP group,
    then all-gather.

    Every rank passes the whole video's pixels (cheap) and encodes only its run.

    Args:
        model: The VLM (replicated on every rank).
        pixels: `[t * h * w, C * T_patch * p * p]` patch rows or `[1, F, C, H, W]` frames.
        grid_thw: `[3]` (`lvr.models.family.video_grid`).
        group: SP group (None = encode everything here).

    Returns:
        The `VideoEmbeds` on every rank; differentiable when grad is enabled.

    Raises:
        MrspError: When pixels and grid disagree.
    """
    try:
        family.check_video(model, pixels, grid_thw)
    except FamilyError as exc:
        raise MrspError(str(exc)) from None
    sp, rank = sp_size(group), sp_rank(group)
    if sp == 1:
        return encode_video(model, pixels, grid_thw)
    runs = split_counts(int(grid_thw.reshape(3)[0]), sp)
    run_pixels, run_grid = family.video_units(model, pixels, grid_thw, sum(runs[:rank]), runs[rank])
    local = encode_video(model, run_pixels, run_grid).packed()  # [n_r, (1 + k) * D]
    # Rows the model adds once per video (LLaVA-OneVision's newline): every encoded run ends
    # with them, the video keeps the last run's.
    trailer = family.family_of(model).video_trailer
    last = max(r for r, n in enumerate(runs) if n > 0)
    if trailer and runs[rank] and rank != last:
        local = local[:-trailer]
    trained = torch.is_grad_enabled() and any(
        p.requires_grad for _, p in family.vision_parameters(model)
    )
    if trained and not local.requires_grad:
        # A rank with no frames must still join the gather's backward (an all-reduce).
        local = local.detach().requires_grad_()
    gathered = gather_rows(local, group, grad="sum")  # row counts gathered first
    return VideoEmbeds.unpack(gathered, family.deepstack_layers(model))


def tower_fingerprint(model: torch.nn.Module) -> str:
    """An id of the vision tower's architecture and weights, projectors included (names a disk
    cache entry).

    Sums of each parameter and of its absolute values, in float64, with the tower's config: a
    different model or a retrained tower gives another id.
    """
    visual = vision_tower(model)
    with torch.no_grad():
        sums = [
            (name, round(float(p.double().sum()), 6), round(float(p.double().abs().sum()), 6))
            for name, p in family.vision_parameters(model)
        ]
    return content_id(visual.config.to_json_string(use_diff=False), sums)[:16]


@dataclass(frozen=True)
class VideoKey:
    """What determines a video's embeddings.

    Attributes:
        video_id: Content id of the video file.
        frame_indices: Decoded frame indices (rollout and training must use the same).
        resolution: (height, width) fed to the tower.
        weights_version: Version of the vision weights (bump when they change).
    """

    video_id: str
    frame_indices: tuple[int, ...]
    resolution: tuple[int, int]
    weights_version: int | str = 0

    def digest(self) -> str:
        """Stable id for file names."""
        return content_id(
            self.video_id, list(self.frame_indices), list(self.resolution), self.weights_version
        )


class EmbeddingCache:
    """One encode per video per step, shared by rollouts and prefills; optional disk cache.

    Attributes:
        encodes: How many times the vision tower ran (on this rank's group), for tests/benchmarks.
        disk_hits: How many entries came from `cache_dir`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        group: dist.ProcessGroup | None = None,
        cache_dir: str | Path | None = None,
        trainable: bool = False,
    ) -> None:
        """Create an empty cache.

        Args:
            model: The VLM (its vision tower is used).
            group: SP group for paralleled encoding (None = single process).
            cache_dir: Folder for on-disk entries (frozen vision only).
            trainable: Keep the autograd graph (vision tower being trained).

        Raises:
            MrspError: When a disk cache is asked for a trained tower (entries would go stale).
        """
        if trainable and cache_dir is not None:
            raise MrspError(
                "the on-disk embedding cache needs a frozen vision tower (trainable=False)"
            )
        self.model = model
        self.visual = vision_tower(model)
        self.deepstack = family.deepstack_layers(model)
        self.group = group
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.trainable = trainable
        self.encodes = 0
        self.disk_hits = 0
        self._entries: dict[VideoKey, VideoEmbeds] = {}
        self._tower: str | None = None  # fingerprint of the tower, computed on first disk use

    def new_step(self) -> None:
        """Forget in-memory entries (call once per RL step; disk entries stay)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _path(self, key: VideoKey) -> Path | None:
        if self.cache_dir is None:
            return None
        if self._tower is None:
            self._tower = tower_fingerprint(self.model)
        return self.cache_dir / f"{key.digest()}-{self._tower}.pt"

    def _all_ranks_have(self, path: Path | None, device: torch.device) -> bool:
        """Agree over the group on a disk hit, so that all ranks encode (a collective) or none."""
        hit = torch.tensor([int(path is not None and path.exists())], device=device)
        if sp_size(self.group) > 1:
            dist.all_reduce(hit, op=dist.ReduceOp.MIN, group=self.group)
        return bool(hit.item())

    def _save(self, path: Path, emb: VideoEmbeds) -> None:
        if sp_rank(self.group) != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(emb.detach().packed().cpu(), tmp)  # [N, (1 + k) * D]
        os.replace(tmp, path)  # atomic: readers never see a half-written file

    def get(self, key: VideoKey, pixels: torch.Tensor, grid_thw: torch.Tensor) -> VideoEmbeds:
        """Return the video's embeddings, encoding at most once per key.

        All ranks of the group must call this in the same order with the same key.

        Args:
            key: The cache key.
            pixels: The video (`encode_video_sp`).
            grid_thw: `[3]`.

        Returns:
            The embeddings (same object for every call with this key within a step).
        """
        if key in self._entries:
            return self._entries[key]
        path = self._path(key)
        if self._all_ranks_have(path, pixels.device):
            packed = torch.load(path, map_location=pixels.device, weights_only=True)
            emb = VideoEmbeds.unpack(packed, self.deepstack)
            self.disk_hits += 1
        else:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                emb = encode_video_sp(self.model, pixels, grid_thw, self.group)
            self.encodes += 1
            if path is not None:
                self._save(path, emb)
        self._entries[key] = emb
        return emb

    def get_many(
        self, items: Sequence[tuple[VideoKey, torch.Tensor, torch.Tensor]]
    ) -> list[VideoEmbeds]:
        """`get` for several (key, pixels, grid) triples, in order."""
        return [self.get(k, p, g) for k, p, g in items]
