"""Assemble a LLaVA model from a pretrained vision encoder, a fresh projector and a pretrained LLM.

`assemble(spec, out_dir)` loads the parts, initialises the projector, and writes an ordinary HF folder
(config.json with our metadata under "llava", model.safetensors, tokenizer, processor, chat_template.jinja) that
`LlavaForConditionalGeneration.from_pretrained` (or `LlavaNextForConditionalGeneration` for anyres) loads as is.

Flow of one image: processor (pad/resize/crop/anyres) -> vision encoder hidden_states[layer] (CLS dropped or kept)
-> projector -> LLM embeddings at the `<image>` positions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    Dinov2Model,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    SiglipVisionModel,
)

from llava.config import META_KEY, AssemblySpec, LlavaMeta
from llava.images import CLIP_MEAN, CLIP_STD, ImageProcessing, num_image_tokens
from llava.parts import cached_gguf_dir, is_shipped, shipped_dir
from llava.projector import STANDARD_PROJECTOR, LlavaVariantConfig, LlavaVariantForConditionalGeneration, has_rowcol
from llava.templates import IMAGE_PLACEHOLDER, get_template, to_jinja

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class AssemblyError(ValueError):
    """The parts cannot be joined as asked (unknown encoder family, bad size, incompatible projector...)."""


@dataclass(frozen=True)
class VisionFamily:
    model_cls: type
    num_prefix_tokens: int  # CLS-like tokens before the patches
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resizable: bool  # position embeddings interpolate, so any multiple of the patch size works


VISION_FAMILIES: dict[str, VisionFamily] = {
    "clip_vision_model": VisionFamily(CLIPVisionModel, 1, CLIP_MEAN, CLIP_STD, False),
    "siglip_vision_model": VisionFamily(SiglipVisionModel, 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    "dinov2": VisionFamily(Dinov2Model, 1, IMAGENET_MEAN, IMAGENET_STD, True),
}
_FULL_TO_VISION = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def resolve_part(name: str) -> str:
    """A shipped:* name -> its built folder; a .gguf file -> a converted HF folder; anything else unchanged."""
    if is_shipped(name):
        return str(shipped_dir(name))
    if name.endswith(".gguf"):
        src = Path(name).resolve()
        if not src.is_file():
            raise AssemblyError(f"GGUF file not found: {name}")
        return str(cached_gguf_dir(src))
    return name


def load_vision_encoder(name: str):
    """Returns (vision model, its config, family, preprocessor mean/std) for a CLIP / SigLIP / DINOv2 checkpoint."""
    path = resolve_part(name)
    config = AutoConfig.from_pretrained(path)
    model_type = _FULL_TO_VISION.get(config.model_type, config.model_type)
    if model_type not in VISION_FAMILIES:
        raise AssemblyError(
            f"vision encoder {name!r} has model_type {config.model_type!r}; supported: clip, siglip, dinov2 "
            f"({', '.join(VISION_FAMILIES)})"
        )
    family = VISION_FAMILIES[model_type]
    model = family.model_cls.from_pretrained(path, dtype=torch.float32)
    mean, std = family.mean, family.std
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        d = json.loads(pre.read_text())
        mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
    return model, model.config, family, (mean, std)


def load_llm(name: str):
    """Returns (causal LM in float32, tokenizer) from an HF folder / hub id, a .gguf file, or a shipped part."""
    path = resolve_part(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def ensure_special_tokens(tokenizer, workdir: Path):
    """Give the tokenizer an `<image>` token (tokenizer.image_token) and a pad token; returns the new tokenizer."""
    has_image = getattr(tokenizer, "image_token", None) is not None
    if has_image and tokenizer.pad_token is not None:
        return tokenizer
    image_token = tokenizer.image_token if has_image else IMAGE_PLACEHOLDER
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    # Reload so `image_token` becomes a named attribute that survives save/load (transformers 5 API).
    tokenizer.save_pretrained(workdir)
    return AutoTokenizer.from_pretrained(workdir, image_token=image_token)


def image_processing_for(spec: AssemblySpec, vision_config, family: VisionFamily, mean, std) -> ImageProcessing:
    native = vision_config.image_size
    size = spec.image_size or native
    patch = vision_config.patch_size
    if size % patch:
        raise AssemblyError(f"image_size {size} is not a multiple of the encoder's patch size {patch}")
    if size != native and not family.resizable:
        raise AssemblyError(
            f"image_size {size} differs from the encoder's native {native}; only DINOv2 interpolates its "
            f"position embeddings (use image_size={native})"
        )
    if spec.image_mode == "anyres" and not spec.grid_pinpoints:
        raise AssemblyError("image_mode 'anyres' needs grid_pinpoints, e.g. [[336, 672], [672, 336], [672, 672]]")
    return ImageProcessing(
        mode=spec.image_mode,
        size=size,
        patch_size=patch,
        mean=tuple(mean),
        std=tuple(std),
        num_prefix_tokens=family.num_prefix_tokens,
        keep_cls=spec.vision_feature_select_strategy == "full" and family.num_prefix_tokens > 0,
        grid_pinpoints=tuple(tuple(p) for p in spec.grid_pinpoints) if spec.grid_pinpoints else None,
        reading_orders=2 if has_rowcol(spec.projector) else 1,
    )


def hf_image_processor(proc: ImageProcessing):
    """The transformers image processor that reproduces `proc` (saved beside the model for other engines)."""
    common = dict(image_mean=list(proc.mean), image_std=list(proc.std), do_convert_rgb=True)
    if proc.mode == "anyres":
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": proc.size}, crop_size={"height": proc.size, "width": proc.size},
            image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints], do_pad=True, **common,
        )
    if proc.mode == "crop":
        return LlavaImageProcessorPil(
            size={"shortest_edge": proc.size}, crop_size={"height": proc.size, "width": proc.size},
            do_center_crop=True, do_pad=False, **common,
        )
    return LlavaImageProcessorPil(
        size={"height": proc.size, "width": proc.size}, do_center_crop=False, do_pad=proc.mode == "pad", **common
    )


def build_config(spec: AssemblySpec, vision_config, text_config, proc: ImageProcessing, image_token_id: int):
    strategy = "full" if proc.keep_cls or proc.num_prefix_tokens == 0 else "default"
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    if proc.mode == "anyres":
        if spec.projector != STANDARD_PROJECTOR:
            raise AssemblyError(f"anyres (LlavaNext) supports projector {STANDARD_PROJECTOR!r} only, got {spec.projector!r}")
        return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in proc.grid_pinpoints], **common), LlavaNextForConditionalGeneration
    common["image_seq_length"] = num_image_tokens(proc, (proc.size, proc.size))
    if spec.projector == STANDARD_PROJECTOR:
        return LlavaConfig(**common), LlavaForConditionalGeneration
    return LlavaVariantConfig(projector_type=spec.projector, **common), LlavaVariantForConditionalGeneration


def build_model(spec: AssemblySpec, workdir: Path):
    """Load the parts and join them; returns (model, tokenizer, image processing)."""
    get_template(spec.template)  # fail fast on an unknown template, before loading anything
    vision, vision_config, family, (mean, std) = load_vision_encoder(spec.vision_encoder)
    llm, tokenizer = load_llm(spec.llm)
    tokenizer = ensure_special_tokens(tokenizer, workdir / "tokenizer")
    torch.manual_seed(spec.seed)  # mean-resizing samples the new token rows; the projector init below too
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    proc = image_processing_for(spec, vision_config, family, mean, std)
    config, model_cls = build_config(spec, vision_config, llm.config, proc, tokenizer.image_token_id)

    model = model_cls(config)  # random init everywhere; the pretrained parts are copied in below
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    setattr(model.config, META_KEY, LlavaMeta(
        template=spec.template,
        image_processing=proc.to_dict(),
        projector=spec.projector,
        parts={"vision_encoder": spec.vision_encoder, "llm": spec.llm},
    ).model_dump())
    return model.eval(), tokenizer, proc


def save_checkpoint(model, tokenizer, proc: ImageProcessing, template: str, out_dir: Path) -> Path:
    """Write an HF llava folder atomically (built in a temp dir, then renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        chat_template = to_jinja(template)
        tokenizer.chat_template = chat_template
        model.save_pretrained(tmp, safe_serialization=True)
        processor_cls = LlavaNextProcessor if proc.mode == "anyres" else LlavaProcessor
        kwargs = dict(
            image_processor=hf_image_processor(proc),
            tokenizer=tokenizer,
            patch_size=proc.patch_size,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            chat_template=chat_template,
            # LlavaProcessor counts (size / patch)^2 + this (less the CLS under "default"); a second reading order
            # of the grid adds (size / patch)^2 more
            num_additional_image_tokens=proc.num_prefix_tokens + (proc.reading_orders - 1) * (proc.size // proc.patch_size) ** 2,
        )
        processor_cls(**kwargs).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def assemble(spec: AssemblySpec, out_dir: str | os.PathLike) -> Path:
    """Assemble the parts named by `spec` and save an HF llava checkpoint at `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="llava-assemble-") as work:
        model, tokenizer, proc = build_model(spec, Path(work))
        return save_checkpoint(model, tokenizer, proc, spec.template, Path(out_dir))
