"""Projectors: the small trained bridge from vision features to LLM embeddings.

Registry keyed by exact name: `identity`, `linear`, `mlp{N}x_gelu` (N >= 1 Linear layers with GELU between,
as in LLaVA: Linear, then (GELU, Linear) x (N-1)). `mlp2x_gelu` is exactly transformers'
`LlavaMultiModalProjector` (linear_1, act, linear_2), so checkpoints with it are plain `LlavaForConditionalGeneration`
folders any engine loads. Other types need the smallest extension that can express them: `LlavaVariantConfig`
(model_type `llava_variant`, one extra field `projector_type`) and `LlavaVariantForConditionalGeneration`, which only
swaps the projector module. Parameter names stay `linear_1`, `linear_2`, ... so conversions are uniform.
"""

from __future__ import annotations

import re

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.activations import ACT2FN

STANDARD_PROJECTOR = "mlp2x_gelu"
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class ProjectorError(ValueError):
    """Unknown projector type or one that cannot join these dimensions."""


def projector_depth(name: str) -> int:
    """Number of Linear layers of a projector type (0 for identity). Unknown names list the valid forms."""
    if name == "identity":
        return 0
    if name == "linear":
        return 1
    m = _MLP.match(name)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ProjectorError(f"unknown projector type {name!r}; valid: 'identity', 'linear', 'mlp{{N}}x_gelu' (e.g. 'mlp2x_gelu')")


class Projector(nn.Module):
    """[B, T, in_dim] -> [B, T, out_dim]: Linear, then (act, Linear) x (depth-1); identity when depth is 0."""

    def __init__(self, name: str, in_dim: int, out_dim: int, bias: bool = True, act: str = "gelu"):
        super().__init__()
        depth = projector_depth(name)
        if depth == 0 and in_dim != out_dim:
            raise ProjectorError(f"identity projector needs equal widths, got vision {in_dim} vs LLM {out_dim}")
        self.depth = depth
        self.act = ACT2FN[act]
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(in_dim if i == 0 else out_dim, out_dim, bias=bias))

    def forward(self, image_features):
        h = image_features
        for i in range(self.depth):
            if i:
                h = self.act(h)
            h = getattr(self, f"linear_{i + 1}")(h)
        return h


@strict
class LlavaVariantConfig(LlavaConfig):
    """LlavaConfig plus the projector type, for projectors transformers' class cannot express."""

    model_type = "llava_variant"
    projector_type: str = STANDARD_PROJECTOR


class LlavaVariantForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration with the projector chosen by `config.projector_type`."""

    config_class = LlavaVariantConfig

    def __init__(self, config: LlavaVariantConfig):
        super().__init__(config)
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        self.model.multi_modal_projector = Projector(
            config.projector_type,
            config.vision_config.hidden_size * layers,
            config.text_config.hidden_size,
            bias=config.multimodal_projector_bias,
            act=config.projector_hidden_act,
        )
        self.post_init()


AutoConfig.register("llava_variant", LlavaVariantConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaVariantConfig, LlavaVariantForConditionalGeneration, exist_ok=True)
