"""Ulysses sequence parallelism for gated delta-net layers (Qwen3.5's linear attention).

A gated delta-net layer mixes tokens in two places, both per head and causal along the sequence:
a depthwise causal convolution over the q/k/v channels and the gated delta rule's recurrence. The
projections around them are position-wise. So the Ulysses split that works for softmax attention
works here too: each rank projects its own tokens, one all-to-all gives every rank ALL tokens of
`1/sp` of the heads (key heads and the value heads that read them), the convolution and the
recurrence run there over the whole sequence, and a second all-to-all brings every rank its own
tokens of all heads back for the gated norm and the output projection.

Exact, not an approximation: the sequence is right-padded (the layout pad and the batch's right
padding come after every real token), so causal operators never let padding reach a real token.
The computations are the library's own (`causal_conv1d_fn`, `torch_chunk_gated_delta_rule`), so
SP=1 through this path equals the layer's forward (checked in the tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as functional
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    causal_conv1d_fn,
    torch_chunk_gated_delta_rule,
)

from lvr.mrsp.comm import MrspError, sp_rank, sp_size
from lvr.mrsp.ulysses import StridedLayout, heads_to_seq, seq_to_heads


def _to_seq(
    x: torch.Tensor, layout: StridedLayout, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """[B, n, h, d] (local tokens, all heads) -> [B, Lp, h/sp, d] (all tokens, local heads)."""
    if sp_size(group) == 1:
        return x
    return heads_to_seq(x.transpose(1, 2), layout, group).transpose(1, 2)


def _to_tokens(
    x: torch.Tensor, layout: StridedLayout, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """[B, Lp, h/sp, d] -> [B, n, h, d] (the inverse of `_to_seq`)."""
    if sp_size(group) == 1:
        return x
    return seq_to_heads(x.transpose(1, 2), layout, group)


def _local_channels(module: torch.nn.Module, rank: int, sp: int) -> torch.Tensor:
    """Conv channels of this rank's heads: its q, k (key heads) and v (value heads) slices."""
    kd, vd = module.head_k_dim, module.head_v_dim
    hk, hv = module.num_k_heads // sp, module.num_v_heads // sp
    q = torch.arange(rank * hk * kd, (rank + 1) * hk * kd)
    k = q + module.key_dim
    v = torch.arange(rank * hv * vd, (rank + 1) * hv * vd) + 2 * module.key_dim
    return torch.cat([q, k, v])


def gated_delta_net(
    module: torch.nn.Module,
    hidden: torch.Tensor,
    group: dist.ProcessGroup | None,
    layout: StridedLayout,
) -> torch.Tensor:
    """A gated delta-net token mixer (`layer.linear_attn`) on this rank's tokens, SP over `group`.

    Args:
        module: The `...GatedDeltaNet` module.
        hidden: `[B, n, D]` normalized hidden states of the owned positions (`layout`).
        group: The SP group (None = one rank).
        layout: The sequence layout of the prefill.

    Returns:
        `[B, n, D]` the mixer's output at the owned positions.

    Raises:
        MrspError: When the SP degree does not divide the key heads.
    """
    sp, rank = sp_size(group), sp_rank(group)
    if module.num_k_heads % sp:
        raise MrspError(
            f"{module.num_k_heads} linear-attention key heads cannot be split over SP={sp}; "
            "pick SP | heads"
        )
    b, n, _ = hidden.shape
    kd, vd = module.head_k_dim, module.head_v_dim
    q, k, v = module.in_proj_qkv(hidden).split(
        [module.key_dim, module.key_dim, module.value_dim], -1
    )
    z = module.in_proj_z(hidden).reshape(b, n, -1, vd)  # [B, n, Hv, dv]
    beta = module.in_proj_b(hidden).sigmoid()  # [B, n, Hv]
    a = module.in_proj_a(hidden)  # [B, n, Hv]
    q, k = (_to_seq(x.reshape(b, n, -1, kd), layout, group) for x in (q, k))  # [B, Lp, Hk/sp, dk]
    v = _to_seq(v.reshape(b, n, -1, vd), layout, group)  # [B, Lp, Hv/sp, dv]
    beta, a = (_to_seq(x[..., None], layout, group)[..., 0] for x in (beta, a))  # [B, Lp, Hv/sp]
    length, hk, hv = q.shape[1], q.shape[2], v.shape[2]
    # Depthwise causal convolution along the full sequence, with this rank's channels.
    channels = _local_channels(module, rank, sp).to(hidden.device)
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1).transpose(1, 2)  # [B, C, Lp]
    bias = module.conv1d.bias[channels] if module.conv1d.bias is not None else None
    weight = module.conv1d.weight.squeeze(1)[channels]  # [C, K]
    mixed = causal_conv1d_fn(mixed, weight, bias, activation=module.activation).transpose(1, 2)
    q, k, v = mixed.split([hk * kd, hk * kd, hv * vd], -1)
    heads = slice(rank * hv, (rank + 1) * hv)
    g = -module.A_log[heads].float().exp() * functional.softplus(a.float() + module.dt_bias[heads])
    out, _ = torch_chunk_gated_delta_rule(
        q.reshape(b, length, hk, kd), k.reshape(b, length, hk, kd), v.reshape(b, length, hv, vd),
        g=g, beta=beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip  # [B, Lp, Hv/sp, dv]
    out = _to_tokens(out, layout, group)  # [B, n, Hv, dv]
    out = module.norm(out.reshape(-1, vd), z.reshape(-1, vd)).reshape(b, n, -1)
    return module.out_proj(out)


def linear_decoder_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    group: dist.ProcessGroup | None,
    layout: StridedLayout,
) -> torch.Tensor:
    """One hybrid decoder layer whose token mixer is a gated delta-net (`layer.linear_attn`):
    pre-norm residual mixer, then pre-norm residual MLP, as the layer's own forward.

    Args:
        layer: The decoder layer.
        hidden: `[B, n, D]` owned positions.
        group: The SP group.
        layout: The sequence layout.

    Returns:
        `[B, n, D]`.
    """
    mixed = gated_delta_net(layer.linear_attn, layer.input_layernorm(hidden), group, layout)
    hidden = hidden + mixed
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
