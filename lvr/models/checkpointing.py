"""Activation checkpointing on a transformers model, under either name transformers has used."""

from __future__ import annotations

import torch


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant), or stop.

    A transformers 5 release renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable``: the old names warn at every run and go in v6, and the
    earlier 5.x releases have only them.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
    else:
        model.gradient_checkpointing_disable()


# Non-reentrant checkpointing needs no input that requires grad (LoRA freezes the embeddings).
NON_REENTRANT = {"use_reentrant": False}
