"""``DatagenConfig``: one dataclass per section (input, shards, segment, caption, qa, filter).

A *domain* is a YAML file of this config (clip lengths, frames per caption, caption prompt,
question categories with instructions and target shares, formats, model endpoints); see
``configs/datagen/*.yaml`` and ``docs/datagen.md``. Every key can be overridden on the command
line: ``--set caption.options.base_url=http://gpu1:8000/v1``.

Stage modules import this one, never the reverse (the filter's knobs live here too), so a config
is built and checked before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lvr.datagen.shots import ShotParams
from lvr.datagen.sources import InputConfig

# The paper's categories and shares (LongVideo-Reason: temporal 36%, goal 36%, plot 24%, spatial 4%):
# the qa stage's target shares and the filter's caps.
PAPER_SHARES: dict[str, float] = {"temporal": 0.36, "goal": 0.36, "plot": 0.24, "spatial": 0.04}
_INSTRUCTIONS: dict[str, str] = {
    "temporal": (
        "Ask about the order, timing or duration of events across different parts of the "
        "video, so that answering needs events from at least two separate time ranges."
    ),
    "goal": (
        "Ask about the intention or purpose behind what someone does, which must be inferred "
        "by connecting actions and their consequences across the video."
    ),
    "plot": (
        "Ask about the storyline: causes and effects, how a situation develops, or why the "
        "video ends the way it does, combining several moments of the video."
    ),
    "spatial": (
        "Ask about where people or objects are relative to each other or to the scene, and "
        "how these positions change over the video."
    ),
}


_DEFAULT_CAPTION_PROMPT = "caption_v1"


@dataclass
class CategoryConfig:
    """One question category (section item of ``qa.categories``).

    Attributes:
        name: Stored in the ``category`` column (temporal, goal, plot, spatial or your own).
        instruction: What this category asks about; inserted into the QA prompt.
        share: Target share of questions (shares are normalized over all categories).
    """

    name: str = "temporal"
    instruction: str = ""
    share: float = 1.0

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("a category needs a name")
        if self.share < 0:
            raise ValueError(f"category {self.name}: share must be >= 0, got {self.share}")


@dataclass
class ShardsConfig:
    """Work units (section ``shards``); a crash costs at most the shard in flight.

    Videos are sorted by id and cut into shards of ``videos_per_shard``; caption and qa shard ``k``
    cover the clips and videos of segment shard ``k``, so ``--shard i --num-shards n`` (machine
    ``i`` runs shards ``k % n == i``) lets every machine run the whole chain on its own share.
    Model calls are cached per request, so redoing a shard after a crash costs decoding, not calls.
    """

    videos_per_shard: int = 16

    def __post_init__(self) -> None:
        if self.videos_per_shard < 1:
            raise ValueError("shards.videos_per_shard must be >= 1")


@dataclass
class SegmentConfig:
    """How videos are cut into clips (section ``segment``).

    Attributes:
        method: ``stride`` (fixed ``stride_s`` clips, the paper's 10 s) or ``shots`` (cuts found by
            :mod:`lvr.datagen.shots`, merged/split into ``[min_clip_s, max_clip_s]``).
        stride_s: Clip length for ``stride``.
        min_clip_s: Shortest clip (shorter shots merge; a short stride remainder joins the last clip).
        max_clip_s: Longest clip for ``shots`` (longer shots are split evenly).
        shots: Shot detector thresholds.
        verify_decode: Decode every frame of every video once (the shot detector's fast scan), so
            that clips never cover time that does not decode: a video that stops decoding part-way
            gets clips up to there and an error row for the rest. ``shots`` always decodes.
        write_clips: Also write each clip as a file (``clip_path``): by stream copy where it keeps
            every frame (the file starts at the keyframe at or before the clip start; ``.mp4``,
            ``.webm`` for VP8, ``.mkv`` or ``.mov`` by codec), else re-encoded losslessly to
            exactly the clip's frames (``.lossless.mp4``/``.mkv``). See
            :mod:`lvr.datagen.clip_files`.
        clip_dir: Folder for clip files (default ``<run>/clip_files``).
        id_threads: Threads that hash files into video ids (I/O bound).
        workers: Processes that decode videos in parallel for ``shots``/``verify_decode``/``write_clips`` (0 = one
            per core). The shot detector decodes with one thread, its most efficient setting.
    """

    method: Literal["stride", "shots"] = "stride"
    stride_s: float = 10.0
    min_clip_s: float = 2.0
    max_clip_s: float = 10.0
    shots: ShotParams = field(default_factory=ShotParams)
    verify_decode: bool = True
    write_clips: bool = False
    clip_dir: str = ""
    id_threads: int = 8
    workers: int = 1

    def __post_init__(self) -> None:
        if self.stride_s <= 0 or self.min_clip_s < 0 or self.max_clip_s <= 0:
            raise ValueError("stride_s and max_clip_s must be > 0, min_clip_s >= 0")
        if self.method == "shots" and 2 * self.min_clip_s > self.max_clip_s:
            raise ValueError(
                f"segment.max_clip_s ({self.max_clip_s}) must be >= 2 * segment.min_clip_s "
                f"({self.min_clip_s}), or split shots could end up shorter than the minimum"
            )


@dataclass
class CaptionConfig:
    """How clips are captioned (section ``caption``).

    Attributes:
        backend: ``openai`` (any OpenAI-compatible server: vLLM, SGLang, hosted APIs), ``hf``
            (local transformers model) or ``annotations`` (import existing captions).
        model: Served model name (openai) or hub id / local folder (hf).
        options: Backend options passed to ``lvr.backends.make_backend`` (base_url, concurrency,
            max_requests_per_minute, timeout_s, ...).
        frames: Frames sampled per clip (``lvr.media`` rule: centers of equal segments).
        max_pixels: Frames are downscaled (aspect kept) to at most this many pixels (0 = as decoded).
        prompt: Built-in prompt name (``caption_v1``) or a path to a prompt YAML file (its
            templates may use no placeholder: ``$$`` is a literal ``$``).
        prompt_text: Inline user prompt (a domain's own wording, taken literally); needs
            ``prompt_version``; replaces ``prompt``, so set one of the two.
        prompt_version: Version label of ``prompt_text`` (part of the request cache key).
        max_tokens: Caption length budget.
        temperature: Sampling temperature (0 = greedy).
        annotations: For ``annotations``: a file (JSON/JSONL/CSV/Parquet) or folder of them, or
            ``sidecar`` to read the ``<video>.json`` sidecars next to the videos.
        annotation_key: How annotation rows name their video: ``auto`` tries id, path, file name
            and stem in that order.
        min_overlap_s: An annotation segment belongs to a clip when they overlap by more than this.
    """

    backend: Literal["openai", "hf", "annotations"] = "openai"
    model: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    frames: int = 8
    max_pixels: int = 448 * 448
    prompt: str = _DEFAULT_CAPTION_PROMPT
    prompt_text: str = ""
    prompt_version: str = ""
    max_tokens: int = 512
    temperature: float = 0.0
    annotations: str = ""
    annotation_key: Literal["auto", "id", "path", "name", "stem"] = "auto"
    min_overlap_s: float = 0.0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"caption.frames must be >= 1, got {self.frames}")
        if self.prompt_text and not self.prompt_version:
            raise ValueError("caption.prompt_text needs caption.prompt_version (a cache-key label)")
        if self.prompt_text and self.prompt != _DEFAULT_CAPTION_PROMPT:
            # Both name the prompt; prompt_text would win and the file would be silently unused.
            raise ValueError(
                f"caption.prompt ({self.prompt}) and caption.prompt_text are both set; keep one "
                "(prompt_text is the inline prompt, prompt a built-in name or a YAML file)"
            )
        if self.backend == "annotations" and not self.annotations:
            raise ValueError(
                "caption.backend=annotations needs caption.annotations (path or sidecar)"
            )


@dataclass
class QAConfig:
    """How questions are written (section ``qa``).

    Attributes:
        backend: ``openai`` / ``hf`` (an LLM reads the timestamped captions) or ``template``
            (checkable questions from sidecar facts or structured captions, no model).
        model: Served model name (openai) or hub id / local folder (hf).
        options: Backend options for ``lvr.backends.make_backend``.
        prompt: Built-in prompt name (``qa_v1``) or a path to a prompt YAML file.
        categories: Question categories with instructions and target shares.
        format_shares: Shares of ``mc`` (4 options) and ``open`` questions.
        questions_per_video: Questions per video (each one call: one category, one format).
        max_tokens: Budget per question (reasoning models need room).
        temperature: The paper used 0.6 with DeepSeek-R1.
        min_captions: Videos with fewer captioned clips get an error row instead of questions.
        rewrite: Second pass that rewrites the reasoning into natural chain of thought.
        rewrite_prompt: Prompt of that pass.
        rewrite_model: Model of that pass (default: ``model``).
        template_source: Facts for ``template``: ``sidecar`` (synthetic ground truth) or
            ``captions`` (color/shape mentions parsed from the captions).
        template_kinds: Only these question kinds of ``template`` (``[]``: every kind).
        template_palette: Colors offered, in this order, by the ``first_color`` kind.
        seed: Salt of the category/format allocation and the template's choices.
    """

    backend: Literal["openai", "hf", "template"] = "openai"
    model: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    prompt: str = "qa_v1"
    categories: list[CategoryConfig] = field(
        default_factory=lambda: [
            CategoryConfig(name, _INSTRUCTIONS[name], share) for name, share in PAPER_SHARES.items()
        ]
    )
    format_shares: dict[str, float] = field(default_factory=lambda: {"mc": 0.5, "open": 0.5})
    questions_per_video: int = 4
    max_tokens: int = 4096
    temperature: float = 0.6
    min_captions: int = 1
    rewrite: bool = False
    rewrite_prompt: str = "rewrite_v1"
    rewrite_model: str = ""
    template_source: Literal["sidecar", "captions"] = "sidecar"
    template_kinds: list[str] = field(default_factory=list)  # only these kinds ([] = all)
    # Fixed options of the `first_color` kind, in order (e.g. [red, green, blue, yellow]).
    template_palette: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        names = [c.name for c in self.categories]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"qa.categories must be non-empty with unique names, got {names}")
        if sum(c.share for c in self.categories) <= 0:
            raise ValueError("qa.categories: at least one share must be > 0")
        unknown = set(self.format_shares) - {"mc", "open"}
        if unknown or not self.format_shares or sum(self.format_shares.values()) <= 0:
            raise ValueError(
                f"qa.format_shares keys must be mc/open with a positive sum, got {self.format_shares}"
            )
        if self.questions_per_video < 1:
            raise ValueError("qa.questions_per_video must be >= 1")


@dataclass
class FilterConfig:
    """Knobs of the filter policy (section ``filter``; :mod:`lvr.datagen.filter` runs it).

    Every scalar key is visible in the policy SQL as ``getvariable('key')``.
    """

    policy: Path | None = None  # own .sql policy file; None = the built-in filter.sql
    # rule 2: schema
    mc_num_options: int = 4
    # rule 4: length bounds, in characters as stored (blank text is caught separately)
    min_question_chars: int = 10
    max_question_chars: int = 2000
    min_option_chars: int = 1
    max_option_chars: int = 500
    max_open_answer_chars: int = 500
    min_reasoning_chars: int = 20  # CoT-SFT needs a reasoning text
    max_reasoning_chars: int = 10000
    # rule 5: leaks
    leak_check_open: bool = True
    leak_min_chars: int = 3  # open answers shorter than this (normalized) are not leak-checked
    # rule 6: duplicates
    dedup_across_videos: bool = False
    near_dup_jaccard: float | None = 0.8  # token-set Jaccard of normalized questions; None = off
    embed_threshold: float | None = None  # cosine with all-MiniLM-L6-v2 (extra `embed`); None = off
    embed_batch_size: int = 256
    # rule 7: difficulty (only with a pass_rates table); keep pass_rate_min < rate < pass_rate_max
    pass_rate_min: float = 0.0
    pass_rate_max: float = 1.0
    missing_pass_rate: Literal["keep", "reject"] = "keep"
    pass_rate_model: str | None = None  # required when the table holds several models
    # rule 8: caps
    max_per_video: int | None = 50
    category_shares: dict[str, float] = field(default_factory=lambda: dict(PAPER_SHARES))
    category_share_tolerance: float = 0.1  # a share may exceed its target by this fraction of it
    # rule 9: video-disjoint splits. "hash": fractions of videos (must sum to 1) by a salted hash
    # of video_id (a video keeps its split whatever else is in the run; a small run may leave a
    # split empty); "rank": the videos ordered by that hash and cut at the fractions (as exact as
    # the video count allows: a split with a share >= 1/n videos is never empty; adding videos can
    # move others); "folder": the folder holding the video file names its split (sft, rl or eval;
    # e.g. a dataset's own train/test videos), other videos are rejected with the reason.
    split_by: Literal["hash", "rank", "folder"] = "hash"
    split_sft: float = 0.30
    split_rl: float = 0.60
    split_eval: float = 0.10
    seed: str = "lvr"  # salt of every hash-based choice (caps, splits)
    shard_rows: int = 50000

    def __post_init__(self) -> None:
        fractions = (self.split_sft, self.split_rl, self.split_eval)
        if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"split_sft + split_rl + split_eval must be 1 (each >= 0); got {fractions}"
            )
        if not 0.0 <= self.pass_rate_min < self.pass_rate_max <= 1.0:
            raise ValueError("need 0 <= pass_rate_min < pass_rate_max <= 1")
        for key in ("near_dup_jaccard", "embed_threshold"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{key} must be in (0, 1] or null; got {value}")
        if any(not isinstance(v, int | float) or v < 0 for v in self.category_shares.values()):
            raise ValueError(
                f"category_shares values must be numbers >= 0; got {self.category_shares}"
            )
        if self.category_share_tolerance < 0:
            raise ValueError("category_share_tolerance must be >= 0")
        if self.max_per_video is not None and self.max_per_video < 1:
            raise ValueError("max_per_video must be >= 1 or null")
        if self.shard_rows < 1 or not 2 <= self.mc_num_options <= 26:
            raise ValueError("shard_rows must be >= 1 and mc_num_options in [2, 26] (letters A-Z)")


@dataclass
class DatagenConfig:
    """Every setting of ``lvr datagen`` (print with ``--show-config``).

    Attributes:
        prices: Optional price table, model name -> ``{prompt_per_1m: .., completion_per_1m: ..}``
            (money per million prompt / completion tokens, in your currency). Stage manifests and
            ``lvr inspect`` turn token usage into cost with it; models without a price get none.
    """

    input: InputConfig = field(default_factory=InputConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    prices: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lvr.backends.usage import check_prices  # light; here so the CLI fails before work

        check_prices(self.prices)
        shares = self.filter.category_shares
        # A share of 0 rejects the category as surely as a missing entry (filter.sql rule 8b),
        # after every one of its questions was paid for.
        missing = [
            c.name
            for c in self.qa.categories
            if c.share > 0 and shares and not shares.get(c.name, 0) > 0
        ]
        if missing:
            raise ValueError(
                f"qa.categories {missing} have no filter.category_shares entry above 0, so the filter "
                f"would reject all their questions; add e.g. filter.category_shares.{missing[0]}=0.1 "
                "(or set filter.category_shares={} to disable category caps)"
            )


def category_shares(cfg: QAConfig) -> dict[str, float]:
    """Normalized target shares of the configured categories."""
    total = sum(c.share for c in cfg.categories)
    return {c.name: c.share / total for c in cfg.categories}
