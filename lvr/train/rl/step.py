"""One RL step of `lvr rl`, top to bottom: the whole GRPO computation in one place.

`rl_step` reads in the order the data flows:

    questions -> decode frames -> encode each video ONCE (MR-SP stage 1, cached embeddings)
      -> G rollouts per prompt from the cached embeddings -> rewards
      -> group-relative advantages -> old-policy and reference log-probs (MR-SP stage 2 prefill)
      -> mini-batch updates: clipped surrogate + KL, gradients summed over the world

The helpers below it do one thing each, in the same order. Shapes: P prompts of this DP group
(P_global over all groups), G rollouts each, R response tokens (padded), D hidden size.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lvr.artifacts import content_id
from lvr.models import family
from lvr.mrsp.batch import PromptInput, pack_batch, prompt_from_sample
from lvr.mrsp.comm import sp_rank, sp_size, sync_sp_grads
from lvr.mrsp.encode import VideoKey
from lvr.mrsp.engines import needs_sync, sync_weights
from lvr.mrsp.prefill import PrefillOutput, sp_prefill_logprobs
from lvr.mrsp.topology import dp_gather, dp_sum, share
from lvr.train.algos import (
    DynamicSampling,
    aggregate,
    compute_advantages,
    dynamic_sampling,
    kl_penalty,
    policy_loss,
)
from lvr.train.common import SKIPPED_FILE, Stopwatch, TrainError, uses_bf16
from lvr.train.data import FrameSpec, LoadedSample, QARow, load_sample
from lvr.train.rewards import compute_rewards
from lvr.train.rl.state import Group, Prompt, RLRun, merged_weights

Row = tuple[Prompt, torch.Tensor]  # (prompt, response ids [R_i]): one sequence of the update


@dataclass
class Rollouts:
    """The sequences of an update and what the loss needs of each, aligned by index."""

    rows: list[Row]  # P*G (prompt, response) pairs, prompt-major
    advantages: torch.Tensor  # [P*G] group-relative advantages
    old: list[torch.Tensor]  # P*G x [R_i] log-probs under the policy that sampled
    ref: list[torch.Tensor] | None  # P*G x [R_i] reference log-probs (None without KL)

    def select(self, ids: list[int]) -> Rollouts:
        """The rows `ids` (a micro-batch)."""
        ref = [self.ref[i] for i in ids] if self.ref is not None else None
        return Rollouts([self.rows[i] for i in ids], self.advantages[ids],
                        [self.old[i] for i in ids], ref)  # fmt: skip


def rl_step(run: RLRun, step: int) -> dict[str, float]:
    """One RL step: collect scored groups, compute advantages, update the policy. Its metrics."""
    cfg, watch = run.cfg, Stopwatch()
    start, encodes_before, opt_before = time.time(), run.cache.encodes, run.opt_steps

    # 1-4. questions -> frames -> embeddings (once per video) -> G rollouts -> rewards.
    #      DAPO's dynamic sampling drops all-equal groups and draws further questions to refill.
    groups, sampling = collect_groups(run, step, watch)
    # What every DP group holds, gathered: the decisions below are the same on every rank.
    summary = [s for part in dp_gather(run.topo, [_summary(run, g) for g in groups]) for s in part]
    metrics = {"groups": float(len(summary)), "gen_rounds": float(sampling.rounds),
               "groups_dropped": float(sampling.dropped)}  # fmt: skip
    if not summary:  # no decodable question at all, or DAPO dropped every group
        run.count("no_signal_steps" if sampling.dropped else "steps_skipped")
        return {**metrics, "skipped_step": 1.0, **run.counters()}
    metrics.update(reward_metrics(summary))

    # 5. Advantages, per group of G. An all-equal group has advantage 0 under every estimator;
    #    a step whose groups are ALL equal leaves the policy, Adam and the schedule untouched.
    signal = [len(set(s["rewards"])) > 1 for s in summary]  # [P_global]
    if not any(signal):
        run.count("no_signal_steps")
        metrics.update(no_signal=1.0, opt_steps=float(run.opt_steps), lr=_lr(run))
        metrics.update({k: round(v, 4) for k, v in watch.seconds.items()})
        return {**metrics, "step_s": round(time.time() - start, 4), **run.counters()}
    rewards = torch.tensor([r for g in groups for r in g.rewards])  # [P*G], prompt-major
    advantages = compute_advantages(rewards, cfg.rollout.n, cfg.algo.advantage)  # [P*G]
    rows = [(g.prompt, response) for g in groups for response in g.responses]  # P*G rows
    lengths = [n for s in summary for n in s["lengths"]]  # [P_global*G] response tokens

    # 6. Log-probs of the sampled tokens under the policy that sampled them (old) and the
    #    reference: sequence-parallel prefills that reuse the cached video embeddings.
    with watch("prefill_s"):
        old = prefill_logprobs(run, rows, run.model)  # P*G x [R_i]
        ref = reference_logprobs(run, rows)

    # 7. Update: `update_epochs` passes of mini-batches of `update_batch` prompts; clipped
    #    surrogate + KL per token, aggregated over the whole mini-batch; world-summed gradients.
    with watch("update_s"):
        batch = Rollouts(rows, advantages, old, ref)
        metrics.update(update_policy(run, batch, step, lengths, signal))

    # 8. A rollout engine that keeps its own copy of the weights (vLLM) gets the new ones.
    with watch("sync_s"):
        if run.opt_steps > opt_before and needs_sync(run.sampler):
            sync_weights(run.sampler, merged_weights(run) or run.model)  # LoRA merged
            run.count("weight_syncs")
    metrics.update({k: round(v, 4) for k, v in watch.seconds.items()})
    metrics["encodes"] = dp_sum(run.topo, {"e": float(run.cache.encodes - encodes_before)})["e"]
    metrics.update(step_s=round(time.time() - start, 4), lr=_lr(run))
    return {**metrics, **run.counters()}


def _lr(run: RLRun) -> float:
    return float(run.scheduler.get_last_lr()[0])


# ---------------------------------------------------------------------------------------------
# 1-4. Collect: questions -> frames -> embeddings -> rollouts -> rewards
# ---------------------------------------------------------------------------------------------


def collect_groups(run: RLRun, step: int, watch: Stopwatch) -> tuple[list[Group], DynamicSampling]:
    """This DP group's scored groups for one step (refilled by dynamic sampling when enabled)."""
    cfg = run.cfg
    run.cache.new_step()

    def draw(round_: int) -> list[tuple[Group, list[float]]]:
        with watch("data_s"):
            samples = draw_questions(run, cfg.rollout_batch)
        with watch("encode_s"):
            prompts = [encode(run, s) for s in samples]
        with watch("rollout_s"):
            groups = rollout_and_score(run, prompts, step, round_, watch)
        return [(g, g.rewards) for g in groups]

    if cfg.algo.dynamic_sampling:
        result = dynamic_sampling(draw, cfg.rollout_batch, cfg.algo.max_gen_batches)
        return result.groups, result
    drawn = draw(0)
    return [g for g, _ in drawn], DynamicSampling(groups=[], rounds=1, drawn=len(drawn))


def draw_questions(run: RLRun, k: int) -> list[LoadedSample]:
    """This DP group's share of the next `k` usable questions in the seeded order, as samples.

    The order and the cursor are global: the DP groups try disjoint slices of the next
    candidates, share which ones failed (decode error, too long), and draw again until `k`
    worked, so the union over groups is what one process takes. DP group d then owns the usable
    questions `[d*k/dp, (d+1)*k/dp)`; a question another group loaded is loaded again here.
    """
    questions, topo = run.questions, run.topo
    loaded: dict[int, LoadedSample] = {}  # candidate position -> sample (this group's tries)
    good: list[int] = []  # positions that worked, in draw order (all groups)
    budget = k + len(questions.rows)  # a table of broken videos cannot loop forever
    while len(good) < k and budget > 0:
        candidates = list(range(questions.cursor, questions.cursor + min(k - len(good), budget)))
        questions.cursor += len(candidates)
        budget -= len(candidates)
        tries = {pos: _load(run, questions.at(pos)) for pos in share(topo, candidates)}
        loaded.update({pos: s for pos, s in tries.items() if s.error is None})
        reasons = {pos: s.error for pos, s in tries.items() if s.error is not None}
        failed = {p: r for part in dp_gather(topo, reasons) for p, r in part.items()}
        for pos in candidates:
            if pos in failed:
                _skip(run, questions.at(pos), failed[pos])
            else:
                good.append(pos)
    run.count("questions_used", len(good))  # global: every rank saw every group's failures
    per = k // topo.dp_size
    mine = good[topo.dp_rank * per : (topo.dp_rank + 1) * per]
    out = []
    for pos in mine:
        sample = loaded.get(pos) or _load(run, questions.at(pos))
        if sample.error is not None:  # loaded there but not here: SP collectives must align
            raise TrainError(f"video loaded on another DP group but not here: {sample.error}")
        out.append(sample)
    return out


def _load(run: RLRun, row: QARow) -> LoadedSample:
    """The prompt of a question (frames + chat template), without a target; room is left for
    `max_new_tokens` of response inside `data.max_seq_len`."""
    data = run.cfg.data
    spec = FrameSpec(data.frames, data.fps, data.min_frames, data.max_pixels)
    budget = data.max_seq_len - run.cfg.rollout.max_new_tokens
    return load_sample(run.processor, row, spec, budget, data.mode, target=False)


def _skip(run: RLRun, row: QARow, reason: str) -> None:
    """Count a dropped question and append why to `rl/skipped.jsonl` (every rank counts every
    DP group's drops, so the counters are global; the main rank writes)."""
    run.count("skipped_decode" if reason.startswith("decode") else "skipped_too_long")
    run.skip_reasons.append(reason)
    if run.info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        line = {"qa_id": row.qa_id, "video_path": row.video_path, "reason": reason}
        with (run.out_dir / SKIPPED_FILE).open("a") as fh:
            fh.write(json.dumps(line) + "\n")


def encode(run: RLRun, sample: LoadedSample) -> Prompt:
    """Encode a question's video once (a collective over the SP group): its `Prompt`."""
    inputs = sample.inputs
    assert inputs is not None  # draw_questions returns loaded samples only
    grid = family.video_grid(inputs)  # [3]
    # Patch rows [t*h*w, C*2*p*p] (Qwen) or frames [1, F, C, H, W] (LLaVA-OneVision).
    pixels = inputs["pixel_values_videos"].to(run.info.device)
    # The vision tower's rotary table is built from the grid: it must sit with the pixels.
    grid_on_device = grid.to(run.info.device)
    key = VideoKey(content_id(sample.row.video_path), tuple(sample.frame_indices),
                   tuple(sample.frame_shape))  # fmt: skip
    embeds = run.cache.get(
        key, pixels, grid_on_device
    )  # [N_video_tokens, D] (+ DeepStack), once per step
    prompt = prompt_from_sample(inputs, embeds, key=sample.row.qa_id)
    return Prompt(sample.row, prompt, pixels, key)


def reencoded(run: RLRun, p: Prompt) -> PromptInput:
    """`p.inputs`, or with `reuse_embeddings=False` a copy whose video is encoded again (the
    no-reuse baseline of the MR-SP benchmark)."""
    if run.cfg.reuse_embeddings:
        return p.inputs
    run.cache.new_step()  # forget: the next get runs the vision tower again
    embeds = run.cache.get(p.key, p.pixels, p.inputs.video_grid_thw.to(p.pixels.device))
    return dataclasses.replace(p.inputs, video_embeds=embeds)


def rollout_and_score(
    run: RLRun, prompts: list[Prompt], step: int, round_: int, watch: Stopwatch
) -> list[Group]:
    """G responses per prompt (the SP leader samples and scores, its SP group receives them)."""
    cfg, g = run.cfg, run.cfg.rollout.n
    # Prompt i is sampled with seed + i, i its GLOBAL index: the same samples whatever the DP split.
    seed = ((cfg.seed * 100_003 + step) * 16 + round_) * 1_000_000
    seed += run.topo.dp_rank * (cfg.rollout_batch // run.topo.dp_size)
    if not cfg.reuse_embeddings:  # baseline: the tower runs again for every rollout
        for p in prompts:
            for _ in range(g - 1):
                reencoded(run, p)
    payload: list[Any] = [None]
    if sp_rank(run.topo.sp_group) == 0 and prompts:
        r = cfg.rollout
        out = run.sampler.generate(
            [p.inputs for p in prompts], n=g, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_new_tokens, seed=seed,
        )  # fmt: skip
        with watch("reward_s"):
            total, parts = score(run, prompts, out.response_ids)
        payload = [(out.response_ids, total, parts)]
    if sp_size(run.topo.sp_group) > 1:  # src is a global rank
        torch.distributed.broadcast_object_list(
            payload, src=run.topo.leader, group=run.topo.sp_group
        )
    if payload[0] is None:
        return []
    responses, total, parts = payload[0]
    return [
        Group(p, responses[i * g : (i + 1) * g], total[i * g : (i + 1) * g],
              {k: v[i * g : (i + 1) * g] for k, v in parts.items()})
        for i, p in enumerate(prompts)
    ]  # fmt: skip


def score(
    run: RLRun, prompts: list[Prompt], responses: list[torch.Tensor]
) -> tuple[list[float], dict[str, list[float]]]:
    """Decode the responses (prompt-major) and apply the weighted rewards."""
    g = run.cfg.rollout.n
    texts = [run.processor.tokenizer.decode(_without_eos(r, run.eos_ids)) for r in responses]
    rows = [p.row for p in prompts for _ in range(g)]
    columns = {
        "answer": [r.answer for r in rows],
        "options": [list(r.options) for r in rows],
        "format": [r.format for r in rows],
        "question": [r.question for r in rows],
        "qa_id": [r.qa_id for r in rows],
        "video_path": [r.video_path for r in rows],
    }
    return compute_rewards(run.rewards, texts, columns)


def _without_eos(ids: torch.Tensor, eos_ids: list[int]) -> list[int]:
    out = ids.tolist()
    return out[:-1] if out and out[-1] in eos_ids else out


def _summary(run: RLRun, g: Group) -> dict[str, Any]:
    """What the step's decisions, metrics and loss normalisers need of a group (small)."""
    return {
        "rewards": g.rewards, "parts": g.parts,
        "lengths": [int(r.numel()) for r in g.responses],
        "ended": [bool(r.numel()) and int(r[-1]) in run.eos_ids for r in g.responses],
    }  # fmt: skip


def reward_metrics(summary: list[dict[str, Any]]) -> dict[str, float]:
    """Reward mean/std overall and per component, accuracy, format rate, response lengths, over
    the groups of the whole (global) batch."""
    rewards = torch.tensor([r for s in summary for r in s["rewards"]])
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False))}
    for name in summary[0]["parts"]:
        values = torch.tensor([v for s in summary for v in s["parts"][name]])
        out[f"reward/{name}/mean"] = float(values.mean())
        out[f"reward/{name}/std"] = float(values.std(unbiased=False))
    for name, key in (("accuracy", "accuracy"), ("format", "format_rate")):
        if f"reward/{name}/mean" in out:
            out[key] = out[f"reward/{name}/mean"]
    lengths = torch.tensor([float(n) for s in summary for n in s["lengths"]])
    ended = [e for s in summary for e in s["ended"]]
    out["response_len/mean"] = float(lengths.mean())
    out["response_len/max"] = float(lengths.max())
    out["truncated_rate"] = 1.0 - sum(ended) / len(ended)
    out["identical_groups"] = float(sum(len(set(s["rewards"])) <= 1 for s in summary))
    return out


# ---------------------------------------------------------------------------------------------
# 6. Log-probs: the MR-SP prefill over packed rows
# ---------------------------------------------------------------------------------------------


def _prefill(run: RLRun, model: torch.nn.Module, rows: list[Row]) -> PrefillOutput:
    """Logprobs/entropy/mask `[b, R]` of a micro-batch of rows (sequence-parallel prefill)."""
    inputs = [reencoded(run, p) for p, _ in rows]
    batch = pack_batch(model, inputs, [r for _, r in rows], run.pad_id)
    device = run.info.device
    moved = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}  # fmt: skip
    batch = dataclasses.replace(batch, **moved)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if uses_bf16(run.cfg.precision, device)
        else nullcontext()
    )
    with amp:
        return sp_prefill_logprobs(
            model, batch, run.topo.sp_group, temperature=run.cfg.rollout.temperature
        )


@torch.no_grad()
def prefill_logprobs(run: RLRun, rows: list[Row], model: torch.nn.Module) -> list[torch.Tensor]:
    """Per-row `[R_i]` log-probs of every row under `model` (no grad), in micro-batches."""
    out = []
    mb = run.cfg.micro_batch
    for i in range(0, len(rows), mb):
        res = _prefill(run, model, rows[i : i + mb])
        for b, (_, response) in enumerate(rows[i : i + mb]):
            out.append(res.logprobs[b, : response.numel()].float().cpu())
    return out


def reference_logprobs(run: RLRun, rows: list[Row]) -> list[torch.Tensor] | None:
    """Reference log-probs: the frozen copy, or the LoRA policy with its adapters disabled."""
    if run.cfg.algo.kl == "none" or run.cfg.algo.kl_coef <= 0:
        return None
    if run.reference is not None:
        return prefill_logprobs(run, rows, run.reference)
    with run.policy.disable_adapter():
        return prefill_logprobs(run, rows, run.model)


def _padded(values: list[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    """Stack `[R_i]` tensors into `[b, length]`, zero-padded."""
    out = torch.zeros(len(values), length)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v
    return out.to(device)


# ---------------------------------------------------------------------------------------------
# 7. The policy update
# ---------------------------------------------------------------------------------------------


def update_policy(
    run: RLRun, batch: Rollouts, step: int, lengths: list[int], signal: list[bool]
) -> dict[str, float]:
    """`update_epochs` passes over shuffled mini-batches of `update_batch` prompts (whole groups).

    The mini-batches are drawn from the GLOBAL batch (`lengths`: response tokens of every row of
    every DP group, prompt-major in DP order); each DP group runs the rows of the mini-batch it
    holds, with the mini-batch's global normalisers, and the gradients are summed over the world.
    So the update is the single-process one whatever dp is (the price: a mini-batch's rows are
    not spread evenly over the DP groups).

    A mini-batch whose groups all lack a learning signal (`signal`, per global prompt) is not
    run: its only gradient would be the KL / entropy terms' (zero at the reference, noise
    otherwise), which Adam would blow up to a full `lr`-sized step.
    """
    cfg, g = run.cfg, run.cfg.rollout.n
    order_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    sums: dict[str, float] = {}
    norms = []
    n_prompts = len(lengths) // g
    first = run.topo.dp_rank * (cfg.rollout_batch // run.topo.dp_size)  # global index of ours
    held = range(first, first + len(batch.rows) // g)
    for _ in range(cfg.algo.update_epochs):
        order = torch.randperm(n_prompts, generator=order_rng).tolist()
        for s in range(0, n_prompts, cfg.update_batch):
            mini = order[s : s + cfg.update_batch]
            if not any(signal[p] for p in mini):  # the same decision on every rank
                run.count("no_signal_updates")
                continue
            n_seq = len(mini) * g  # global normalisers of this mini-batch
            n_tok = sum(lengths[p * g + j] for p in mini for j in range(g))
            ids = [(p - first) * g + j for p in mini if p in held for j in range(g)]
            for m in range(0, len(ids), cfg.micro_batch):
                micro_step(run, batch.select(ids[m : m + cfg.micro_batch]), n_tok, n_seq, sums)
            norms.append(optimizer_step(run))
    sums = dp_sum(run.topo, sums)  # token sums of the statistics over the whole batch
    tokens = max(sums.pop("tokens", 1.0), 1.0)
    out = {k: v / tokens for k, v in sums.items()}
    if norms:
        out["grad_norm"] = float(sum(norms) / len(norms))
    out["opt_steps"] = float(run.opt_steps)
    return out


def micro_step(run: RLRun, micro: Rollouts, n_tok: int, n_seq: int, sums: dict[str, float]) -> None:
    """Forward + backward of one micro-batch of b rows; adds token sums of its statistics."""
    algo = run.cfg.algo
    out = _prefill(run, run.model, micro.rows)  # logprobs / entropy / mask: [b, R]
    logp, mask = out.logprobs, out.mask
    length, device = logp.shape[1], logp.device
    old_logp = _padded(micro.old, length, device)  # [b, R]
    advantages, ref = micro.advantages, micro.ref
    # Clipped surrogate per token: max(-A * ratio, -A * clip(ratio, 1-eps_low, 1+eps_high)),
    # dual clip for A < 0; ratio = exp(logp - old_logp).
    pg = policy_loss(logp, old_logp, advantages.to(device), algo.clip_low, algo.clip_high,
                     algo.dual_clip or None)  # fmt: skip
    per_token = pg.loss  # [b, R]
    kl = None
    if ref is not None:  # + beta * KL(policy || reference), k3 by default
        kl = kl_penalty(logp, _padded(ref, length, device), algo.kl)  # [b, R]
        per_token = per_token + algo.kl_coef * kl
    if algo.entropy_coef:
        per_token = per_token - algo.entropy_coef * out.entropy
    # Normalised by the WHOLE mini-batch's tokens/sequences: micro-batch losses sum to its loss.
    aggregate(per_token, mask, algo.loss_agg, num_tokens=n_tok, num_seqs=n_seq).backward()
    m = mask.detach()
    stats = {
        "pg_loss": pg.loss.detach(), "entropy": out.entropy.detach(),
        "clip_frac/low": pg.clipped_low.float(), "clip_frac/high": pg.clipped_high.float(),
        "clip_frac/dual": pg.dual_clipped.float(), "ratio/mean": pg.ratio,
    }  # fmt: skip
    if kl is not None:
        stats["kl"] = kl.detach()
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float((v * m).sum())
    sums["tokens"] = sums.get("tokens", 0.0) + float(m.sum())


def optimizer_step(run: RLRun) -> float:
    """Sum gradients over the world, clip, and step unless the gradient is not finite (skipped,
    counted). Returns the gradient norm.

    Summing over the world is the SP sum (each SP rank holds the gradient of its shard) and the DP
    sum (each DP group holds its rows' share of the globally normalised loss) in one all-reduce.
    """
    params = [p for p in run.policy.parameters() if p.requires_grad]
    sync_sp_grads(params, torch.distributed.group.WORLD if run.info.distributed else None)
    clip = run.cfg.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if not torch.isfinite(norm):
        run.count("skipped_nonfinite")
    else:
        run.optimizer.step()
        run.scheduler.step()
        run.opt_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)
