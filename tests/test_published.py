"""The published real-size architectures build, belong to a family lvr knows, and have their size."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from lvr.models.family import FAMILIES, family_of
from lvr.models.published import PUBLISHED


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_architecture_builds_as_its_family(name: str) -> None:
    real = PUBLISHED[name]
    with torch.device("meta"):  # real sizes, no memory
        model = AutoModelForImageTextToText.from_config(real.config())
    assert real.model_type in FAMILIES
    assert family_of(model).name == real.model_type
    assert model.config.get_text_config().hidden_size == real.text["hidden_size"]
    if real.params is not None:
        unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings once
        assert sum(p.numel() for p in unique) == pytest.approx(real.params, rel=0.01)
