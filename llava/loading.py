"""Load any supported checkpoint into one `LoadedModel`: model + tokenizer + template + image processing.

Accepted `path`s (resolved by `llava.convert.resolve_path`):
- `default`: the embedded default model (DINOv2-small + SmolLM2-135M-Instruct + trained pieces in assets/).
- an HF llava / llava_next / llava_variant / llava_onevision folder or hub id (llava-hf/..., incl. LLaVA-OneVision
  and LLaVA-NeXT-Interleave, a plain llava with a SigLIP tower and Qwen2).
- an original LLaVA (liuhaotian-format) checkpoint: converted once into an HF folder in the cache.
- a projector-only folder (mm_projector.*) or a LoRA adapter folder, with `model_base`.
Weights are read from safetensors, or from .bin only through torch.load(weights_only=True). No trust_remote_code.
The template comes from the checkpoint's own metadata, an explicit `template=`, or the model zoo's exact hub id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, BitsAndBytesConfig

import llava.projector  # noqa: F401  (registers llava_variant with the Auto classes)
from llava.checkpoint import LoadError, image_processing_from_hf, read_config, resolve_template
from llava.config import META_KEY, LlavaMeta, LoadOptions
from llava.convert import resolve_path
from llava.hardware import resolve_dtype
from llava.quant import QUANTIZATIONS, QuantizationError, quantize_llm
from llava.images import ImageProcessing, ProcessedImage, ProcessedVideo, load_image, preprocess, preprocess_video
from llava.templates import (
    Rendered, Template, TokenizerError, media_order, normalize_messages, render, videos_as_images,
)
from llava.templates import image_token_id as tokenizer_image_id
from llava.templates import video_token_id as tokenizer_video_id

QUANT_SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
BNB_QUANTIZATIONS = ("8bit", "4bit")
ALL_QUANTIZATIONS = ("auto", "none", *QUANTIZATIONS, *BNB_QUANTIZATIONS)

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A rendered conversation and its media in prompt order, as the engine takes them."""

    rendered: Rendered
    images: list[ProcessedImage]  # with a video's frames when the model reads frames as images
    videos: list[ProcessedVideo]  # models with a video token only

    @property
    def input_ids(self) -> list[int]:
        return self.rendered.input_ids


@dataclass
class LoadedModel:
    """A ready model with everything needed to turn messages + images into inputs."""

    model: Any
    tokenizer: Any
    template: Template
    image_processing: ImageProcessing
    name: str
    path: str
    dtype: torch.dtype = torch.float32
    quantization: str | None = None
    precision_reason: str = ""  # why this dtype / quantization (auto choices say what they found)
    quant_report: dict = field(default_factory=dict)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int | None:
        """The video token of models that have one (LLaVA-OneVision); None: videos are read as frames (images)."""
        return getattr(self.model.config, "video_token_id", None)

    @property
    def default_max_frames(self) -> int:
        """Frames sampled from a video when the caller does not say: 32 for OneVision (what it was trained with
        as 196-token frames), 16 for a model that reads frames as images (each frame costs a full image)."""
        return 32 if self.video_token_id is not None else 16

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def process_images(self, images: Sequence, image_mode: str | None = None) -> list[ProcessedImage]:
        """Decode (with the safety limits of load_image) and preprocess; `image_mode` overrides pad/resize/crop."""
        proc = self.image_processing
        if image_mode and image_mode != "default" and image_mode != proc.mode:
            if "anyres" in (image_mode, proc.mode):
                raise LoadError(f"image mode {image_mode!r} cannot be used with a {proc.mode!r} model")
            proc = ImageProcessing.from_dict({**proc.to_dict(), "mode": image_mode})
        # OneVision reads a lone image at high resolution, each of several at the base view (as its processor)
        multi = len(images) > 1
        return [preprocess(load_image(im), proc, multi) for im in images]

    def process_video(self, frames: Sequence) -> ProcessedVideo | list[ProcessedImage]:
        """Decoded frames (`llava.video.decode_video`) as the model reads a video: a `ProcessedVideo` for a model
        with a video token, else each frame as an image under the model's own image processing."""
        frames = [load_image(f) for f in frames]
        if self.video_token_id is not None:
            return preprocess_video(frames, self.image_processing)
        return [preprocess(f, self.image_processing) for f in frames]

    def render(self, messages, images: Sequence[ProcessedImage] = (), add_generation_prompt: bool = True) -> Rendered:
        """The one renderer, with `<image>` expanded to each image's feature-token count."""
        return self.prompt(messages, images, add_generation_prompt=add_generation_prompt).rendered

    def prompt(self, messages, images: Sequence[ProcessedImage] = (), videos: Sequence = (),
               add_generation_prompt: bool = True) -> Prompt:
        """Render with images and videos (from `process_video`) in the order of their markers."""
        videos = list(videos)
        if videos and self.video_token_id is None:  # frames read as images: <video> becomes one <image> per frame
            order = media_order("".join(m["content"] for m in normalize_messages(messages)))
            messages = videos_as_images(messages, [len(v) for v in videos])
            images, videos = frames_as_images(order, images, videos), []
        rendered = render(
            messages, self.template, self.tokenizer,
            image_token_counts=[im.num_tokens for im in images],
            video_token_counts=[v.num_tokens for v in videos],
            add_generation_prompt=add_generation_prompt,
        )
        return Prompt(rendered, list(images), videos)


def frames_as_images(order: Sequence[str], images: Sequence[ProcessedImage], videos: Sequence) -> list[ProcessedImage]:
    """Images and videos' frames (lists of ProcessedImage) as one image list in prompt `order` ("image" / "video"
    per marker, `llava.templates.media_order`); counts that do not match the markers are left for the renderer's
    count check to name."""
    if order.count("image") != len(images) or order.count("video") != len(videos):
        return list(images)
    its, itv = iter(images), iter(videos)
    return [im for kind in order for im in ([next(its)] if kind == "image" else next(itv))]


def quantization_config(quantization: str | None, compute_dtype: torch.dtype):
    if quantization is None or quantization in QUANTIZATIONS:
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=QUANT_SKIP,
        )
    raise LoadError(f"unknown quantization {quantization!r}; valid: {', '.join(ALL_QUANTIZATIONS)}")


def resolve_quantization(quantization: str | None, device: str, meta: LlavaMeta | None) -> tuple[str | None, str]:
    """The quantization to apply and why. `auto` serves on CPU the precision the checkpoint records as passing its
    quality gate (`config.json["llava"]["cpu_quantization"]`, e.g. the default model's int4), else none."""
    if quantization in (None, "none"):
        return None, "none asked"
    if quantization not in ALL_QUANTIZATIONS:
        raise LoadError(f"unknown quantization {quantization!r}; valid: {', '.join(ALL_QUANTIZATIONS)}")
    if quantization != "auto":
        return quantization, "given"
    if torch.device(device).type != "cpu":
        return None, "auto: none off CPU (use --load-8bit / --load-4bit for bitsandbytes)"
    recorded = meta.cpu_quantization if meta else None
    if recorded:
        return recorded, f"auto: the checkpoint records {recorded} as within its quality gate of float32"
    return None, "auto: the checkpoint records no CPU quantization that passed a quality gate"


def quantized_cache_key(hf_path: str, model, kind: str) -> str | None:
    """What the quantized weights of a local checkpoint folder depend on: its weight files (name, size, mtime),
    the dtype they were loaded in, the format and the quantizer's version; None for hub ids (not cached)."""
    from llava.buildcache import digest
    from llava.quant import INT4_RANK, QUANT_CACHE_FORMAT

    folder = Path(hf_path)
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") or f.name == "config.json")
    stamps = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    dtype = str(model.get_input_embeddings().weight.dtype)
    return digest(*stamps, dtype, kind, str(INT4_RANK), QUANT_CACHE_FORMAT)


def load_model(path: str, options: LoadOptions | None = None, **overrides: Any) -> LoadedModel:
    """Load a llava model for inference (eval mode) as `options` (a `LoadOptions`; keyword arguments override its
    fields: `load_model(path, dtype="float32")`).

    dtype: "auto" (default; see `llava.hardware.resolve_dtype`), a name or a torch dtype.
    quantization: None / "none", "int8" / "int4" (CPU weight-only, `llava.quant`), "8bit" / "4bit" (bitsandbytes),
    or "auto" (on CPU, what the checkpoint records as passing its quality gate).
    """
    try:
        o = dataclasses.replace(options or LoadOptions(), **overrides)
    except TypeError as e:
        raise TypeError(f"load_model: {e} (options are the fields of llava.config.LoadOptions)") from None
    model_base, template, image_mode, quantization, device, dtype, name = (
        o.model_base, o.template, o.image_mode, o.quantization, o.device, o.dtype, o.name)
    hf_path = resolve_path(path, model_base, template)
    config = read_config(hf_path) or {}
    meta = LlavaMeta(**config[META_KEY]) if META_KEY in config else None
    tmpl = resolve_template(template, meta, path)
    proc = ImageProcessing.from_dict(meta.image_processing) if meta else image_processing_from_hf(hf_path, config)
    if image_mode and image_mode not in ("default", proc.mode):
        proc = ImageProcessing.from_dict({**proc.to_dict(), "mode": image_mode})

    try:
        choice = resolve_dtype(dtype, device)
    except ValueError as e:
        raise LoadError(str(e)) from None
    dtype = choice.value
    quantization, quant_reason = resolve_quantization(quantization, device, meta)
    if quantization in QUANTIZATIONS and torch.device(device).type != "cpu":
        raise LoadError(f"{quantization} is a CPU format; on {device} use --load-8bit / --load-4bit (bitsandbytes)")
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=False)
    qconf = quantization_config(quantization, dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(hf_path, **kwargs)
    if qconf is None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    # the renderer's ids (the tokenizer's image_token_id / video_token_id, else <image> / <video> in its vocab)
    for marker, token_of, want in (("<image>", tokenizer_image_id, model.config.image_token_id),
                                   ("<video>", tokenizer_video_id, getattr(model.config, "video_token_id", None))):
        if want is None:
            continue
        try:
            got = token_of(tokenizer)
        except TokenizerError as e:
            raise LoadError(f"{path}: {e}") from None
        if got != want:
            raise LoadError(f"{path}: tokenizer {marker} id {got} != the model's {want}")
    report = {}
    if quantization in QUANTIZATIONS:
        try:
            report = quantize_llm(model, quantization, compute_dtype=dtype,
                                  cache_key=quantized_cache_key(hf_path, model, quantization))
        except QuantizationError as e:
            raise LoadError(f"{path}: {e}") from None
    reason = f"dtype {str(dtype).removeprefix('torch.')} ({choice.reason}); quantization {quantization or 'none'} ({quant_reason})"
    logger.info("%s: %s", path, reason)
    return LoadedModel(
        model=model.eval(), tokenizer=tokenizer, template=tmpl, image_processing=proc,
        name=name or Path(path.rstrip("/")).name or path, path=hf_path, dtype=dtype, quantization=quantization,
        precision_reason=reason, quant_report=report,
    )
