"""From a causal LM's last hidden states to its logits, as the model computes them.

The loss runs the LM head on trained positions only (sftcore.loop.TrainedTokenLoss): it must then
apply what the model's own forward applies to the head's output. Some architectures scale the logits
(Granite divides them by ``logits_scaling``, 8 in the Granite-3 configs; Cohere multiplies them by
``logit_scale``) or soft-cap them (Gemma-2: ``cap * tanh(logits / cap)``). Those are read here per
model type; each type listed is checked against transformers' own loss in tests/test_zoo.py. A model
type not listed (a new architecture, remote code) gets None: the loss then takes the model's full
logits, which is exact for any model, at the memory of length x vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What the model applies to its LM head's output: a scale, then soft-capping."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _plain(config: Any) -> LogitTransform:
    return LogitTransform()


def _softcapped(config: Any) -> LogitTransform:
    return LogitTransform(softcap=config.final_logit_softcapping)


def _scaled(config: Any) -> LogitTransform:
    return LogitTransform(scale=config.logit_scale)


def _divided(config: Any) -> LogitTransform:
    return LogitTransform(scale=1 / config.logits_scaling)


_TRANSFORMS: dict[str, Callable[[Any], LogitTransform]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "phi",
            "phi3",
            "gpt_oss",
            "deepseek_v2",
            "deepseek_v3",
            "glm4",
            "glm4_moe",
            "smollm3",
            "olmo2",
            "olmoe",
            "starcoder2",
            "ernie4_5",
            "seed_oss",
            "apertus",
            "hunyuan_v1_dense",
            "exaone4",
        ),
        _plain,
    ),
    **dict.fromkeys(("gemma2", "gemma3_text"), _softcapped),
    **dict.fromkeys(("cohere", "cohere2"), _scaled),
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared"), _divided),
}
CHECKED_MODEL_TYPES = frozenset(_TRANSFORMS)


def logit_transform(config: Any) -> LogitTransform | None:
    """The model's logit post-processing, or None where it is not known (take the full logits)."""
    read = _TRANSFORMS.get(getattr(config, "model_type", None))
    return read(config) if read else None
