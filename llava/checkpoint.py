"""Reading what a checkpoint says about itself, below both loading and conversion (no model is built here).

- `read_config(path)`: config.json of a folder or a hub id in the local HF cache (None for a folder without one).
- `resolve_template(explicit, meta, path)`: the conversation template, from the caller, the checkpoint's own
  metadata, or the model zoo's exact hub id; never guessed from a folder name.
- `image_processing_from_hf(path, config)`: image processing of a plain llava-hf folder (no `llava` metadata).
- `LoadError`: the path is not a loadable model, or needs something it was not given.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlavaOnevisionConfig
from transformers.utils import cached_file

from llava.config import LlavaMeta
from llava.images import CLIP_MEAN, CLIP_STD, ImageProcessing
from llava.projector import has_rowcol
from llava.templates import Template, TemplateError, get_template
from llava.zoo import get_entry

HF_LLAVA_TYPES = ("llava", "llava_next", "llava_variant", "llava_onevision")


class LoadError(ValueError):
    """The path is not a loadable model, or needs something it was not given (model_base, template)."""


def read_config(path: str) -> dict | None:
    """config.json of a folder or hub id (hub ids resolve from the local HF cache only when offline)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists():
        return None
    try:
        resolved = cached_file(path, "config.json")
    except OSError as e:
        raise LoadError(f"cannot find model {path!r}: not a folder, and the hub id is not available ({e})") from e
    return json.loads(Path(resolved).read_text())


def resolve_template(explicit: str | None, meta: LlavaMeta | None, path: str) -> Template:
    if explicit:
        return get_template(explicit)
    if meta is not None:
        return get_template(meta.template)
    try:  # the zoo knows exact hub ids; never guess from folder names
        return get_template(get_entry(path).template)
    except KeyError:
        raise TemplateError(
            f"{path!r} does not record its conversation template; pass template=... (e.g. --template vicuna_v1)"
        ) from None


def image_processing_from_hf(path: str, config: dict) -> ImageProcessing:
    """Image processing of an HF llava folder without our metadata, from its processor and vision config."""
    try:
        pre = json.loads(Path(cached_file(path, "preprocessor_config.json")).read_text())
    except OSError:
        pre = {}
    vision = config.get("vision_config", {})
    size = vision.get("image_size", 336)
    strategy = config.get("vision_feature_select_strategy", "default")
    prefix = 0 if vision.get("model_type") == "siglip_vision_model" else 1
    anyres_max = None
    if config.get("model_type") == "llava_onevision":
        mode = "anyres"
        aspect = config.get("vision_aspect_ratio") or "anyres_max_9"
        if not aspect.startswith("anyres_max_"):
            raise LoadError(f"{path}: vision_aspect_ratio {aspect!r} is not anyres_max_N")
        anyres_max = int(aspect.removeprefix("anyres_max_"))
    elif config.get("model_type") == "llava_next":
        mode = "anyres"
    elif "siglip" in str(pre.get("image_processor_type", "")).lower():
        mode = "resize"  # SigLIP's processor resizes to the square, no crop (LLaVA-NeXT-Interleave)
    elif pre.get("do_pad"):
        mode = "pad"
    elif pre.get("do_center_crop", True):
        mode = "crop"
    else:
        mode = "resize"
    pinpoints = config.get("image_grid_pinpoints")
    if anyres_max is not None and not pinpoints:
        pinpoints = LlavaOnevisionConfig().image_grid_pinpoints  # transformers' default, as its config would load
    return ImageProcessing(
        mode=mode, size=size, patch_size=vision.get("patch_size", 14),
        mean=tuple(pre.get("image_mean", CLIP_MEAN)),
        std=tuple(pre.get("image_std", CLIP_STD)),
        num_prefix_tokens=prefix, keep_cls=strategy == "full" and prefix > 0,
        grid_pinpoints=tuple(tuple(p) for p in pinpoints) if pinpoints and mode == "anyres" else None,
        anyres_max=anyres_max,
        reading_orders=2 if has_rowcol(config.get("projector_type", "")) else 1,
    )


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()
