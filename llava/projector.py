"""Projectors: the small trained bridge from vision features to LLM embeddings.

Registry keyed by exact name: `identity`, `linear`, `mlp{N}x_gelu` (N >= 1 Linear layers with GELU between,
as in LLaVA: Linear, then (GELU, Linear) x (N-1)), each optionally with suffixes:
- `_rowcol`: the projected tokens of an image's patch grid, row after row, are followed by the same tokens column
  after column (twice the tokens per image, no new weights). The LLM reads image tokens as one sequence and learns
  a token's place along that order only: shown rows alone it learns which row an object is in but hardly which
  column (issue 14: left/right halves at chance, top/bottom at 73-82 %); reading both orders, both axes are learned.
- `_pos2d`: a trained embedding per image token position (`position_embedding`, [image_seq_length, LLM width]:
  zero at init so adding it changes nothing) is added to the projected tokens (after `_rowcol`'s copy). It gives
  every token its row and column in its own content; measured, that alone did not teach the LLM the column.
Suffixes combine in this order: `mlp2x_gelu_rowcol_pos2d`. `mlp2x_gelu` is exactly transformers'
`LlavaMultiModalProjector` (linear_1, act, linear_2), so checkpoints with it are plain `LlavaForConditionalGeneration`
folders any engine loads. Other types need the smallest extension that can express them: `LlavaVariantConfig`
(model_type `llava_variant`, one extra field `projector_type`) and `LlavaVariantForConditionalGeneration`, which only
swaps the projector module. Parameter names stay `linear_1`, `linear_2`, ... so conversions are uniform.
"""

from __future__ import annotations

import math
import re

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.activations import ACT2FN

STANDARD_PROJECTOR = "mlp2x_gelu"
_MLP = re.compile(r"^mlp(\d+)x_gelu$")
POS2D = "_pos2d"
ROWCOL = "_rowcol"


class ProjectorError(ValueError):
    """Unknown projector type or one that cannot join these dimensions."""


def projector_depth(name: str) -> int:
    """Number of Linear layers of a projector type (0 for identity). Unknown names list the valid forms."""
    name = name.removesuffix(POS2D).removesuffix(ROWCOL)
    if name == "identity":
        return 0
    if name == "linear":
        return 1
    m = _MLP.match(name)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ProjectorError(f"unknown projector type {name!r}; valid: 'identity', 'linear', 'mlp{{N}}x_gelu' (e.g. 'mlp2x_gelu'), "
                         f"each optionally ending in {ROWCOL!r}, {POS2D!r} or both (in that order)")


def has_pos2d(name: str) -> bool:
    """True for projector types that add a trained 2-D position embedding (`..._pos2d`)."""
    return name.endswith(POS2D)


def has_rowcol(name: str) -> bool:
    """True for projector types that append the column-major copy of an image's tokens (`..._rowcol[_pos2d]`)."""
    return name.removesuffix(POS2D).endswith(ROWCOL)


def column_major(h: torch.Tensor) -> torch.Tensor:
    """[B, g*g, D] tokens of a g x g patch grid, row after row -> the same tokens column after column."""
    b, t, d = h.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ProjectorError(f"a {ROWCOL!r} projector needs a square patch grid per image, got {t} tokens "
                             f"(a kept CLS token or AnyRes tiles?)")
    return h.reshape(b, g, g, d).transpose(1, 2).reshape(b, t, d)


class Projector(nn.Module):
    """[B, T, in_dim] -> [B, T, out_dim]: Linear, then (act, Linear) x (depth-1); identity when depth is 0.
    `_rowcol` types return [B, 2T, out_dim]: the T tokens row by row, then column by column (T a square grid).
    `_pos2d` types then add `position_embedding[t]` to token t (`tokens`: the tokens per image they output)."""

    def __init__(self, name: str, in_dim: int, out_dim: int, bias: bool = True, act: str = "gelu",
                 tokens: int | None = None):
        super().__init__()
        depth = projector_depth(name)
        self.position_embedding = None
        if has_pos2d(name):
            if not tokens:
                raise ProjectorError(f"projector {name!r} needs the number of tokens per image (image_seq_length)")
            self.position_embedding = nn.Parameter(torch.zeros(tokens, out_dim))
        if depth == 0 and in_dim != out_dim:
            raise ProjectorError(f"identity projector needs equal widths, got vision {in_dim} vs LLM {out_dim}")
        self.depth = depth
        self.rowcol = has_rowcol(name)
        self.act = ACT2FN[act]
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(in_dim if i == 0 else out_dim, out_dim, bias=bias))

    def forward(self, image_features):
        h = image_features
        for i in range(self.depth):
            if i:
                h = self.act(h)
            h = getattr(self, f"linear_{i + 1}")(h)
        if self.rowcol:
            h = torch.cat([h, column_major(h)], dim=-2)
        pos = self.position_embedding
        if pos is None:
            return h
        if h.shape[0] == 0:  # no images (a text-only training batch): still a (zero) gradient for the embedding
            return h + 0 * pos.sum()
        if h.shape[-2] != pos.shape[0]:
            raise ProjectorError(f"this projector adds a position embedding for {pos.shape[0]} tokens per image but "
                                 f"got {h.shape[-2]} (another image size or AnyRes tiles?)")
        return h + pos.to(h.dtype)


def sincos_2d(grid: int, dim: int, rms: float) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine/cosine codes (half the width for the row, half for the column, as in MAE),
    scaled to root-mean-square `rms`: a start for `position_embedding` that already tells every cell apart."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    idx = torch.arange(grid, dtype=torch.float32)
    ang = idx[:, None] * freqs[None]  # [grid, quarter]
    code = torch.cat([ang.sin(), ang.cos()], dim=1)  # [grid, 2*quarter]
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    out = torch.zeros(grid, grid, dim)
    out[..., : 4 * quarter] = torch.cat([rows, cols], dim=-1)
    out = out.reshape(grid * grid, dim)
    return out * (rms / out.pow(2).mean().sqrt())


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
            tokens=config.image_seq_length,
        )
        self.post_init()


AutoConfig.register("llava_variant", LlavaVariantConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaVariantConfig, LlavaVariantForConditionalGeneration, exist_ok=True)
