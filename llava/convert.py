"""Convert checkpoints that are not HF llava folders into one, once, cached.

- Original LLaVA (liuhaotian-format) checkpoints: config.json is the LLM config plus mm_* keys
  (mm_vision_tower, mm_projector_type, mm_hidden_size, mm_vision_select_layer, mm_vision_select_feature,
  image_aspect_ratio, image_grid_pinpoints, mm_patch_merge_type); weights hold the LLM, `model.mm_projector.*`
  and, for 1.6, `model.image_newline`. The vision tower comes from `mm_vision_tower`.
- Projector-only folders (stage-1 output: config.json + mm_projector.*) joined to `model_base` (the LLM).
- LoRA adapters: ours (trained on an HF llava model; `model_base` is that model) or the original's
  (adapter on the LLM + non_lora_trainables.* holding the projector; `model_base` is the LLM).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from llava.assemble import (
    build_config,
    ensure_special_tokens,
    image_processing_for,
    load_vision_encoder,
    save_checkpoint,
)
from llava.checkpoint import HF_LLAVA_TYPES, LoadError, image_processing_from_hf, is_adapter, read_config
from llava.config import META_KEY, AssemblySpec, LlavaMeta
from llava.default import DEFAULT_NAMES, default_model_dir
from llava.images import ImageProcessing
from llava.buildcache import build_once, cache_dir
from llava.weights import WeightsError, find_first, read_file, read_folder
from llava.zoo import get_entry

ORIGINAL_LLM_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
PROJECTOR_FILES = ["mm_projector.safetensors", "mm_projector.bin"]
NON_LORA_FILES = ["non_lora_trainables.safetensors", "non_lora_trainables.bin"]


class ConversionError(ValueError):
    """The checkpoint cannot be converted (unsupported type, missing part, ...)."""


def find_projector_file(folder: str | Path) -> Path | None:
    return find_first(folder, PROJECTOR_FILES)


def _cache_key(*paths: str | None, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        if p is None:
            continue
        h.update(str(Path(p).resolve() if Path(p).exists() else p).encode())
        if Path(p).exists():
            h.update(str(Path(p).stat().st_mtime_ns).encode())
    return h.hexdigest()[:16]


def spec_from_original(config: dict, llm: str, template: str) -> AssemblySpec:
    """The AssemblySpec an original LLaVA config describes."""
    if "mm_vision_tower" not in config:
        raise ConversionError("original LLaVA config has no mm_vision_tower")
    aspect = config.get("image_aspect_ratio") or "square"
    if aspect == "pad":
        mode = "pad"
    elif aspect.startswith("anyres"):
        mode = "anyres"
        merge = config.get("mm_patch_merge_type", "flat")
        if merge != "spatial_unpad":
            raise ConversionError(f"anyres with mm_patch_merge_type {merge!r} has no transformers equivalent (needs spatial_unpad)")
    else:
        mode = "crop"  # the original's default: CLIP processor (shortest side + centre crop)
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {feature!r} unsupported (patch or cls_patch)")
    pinpoints = config.get("image_grid_pinpoints")
    return AssemblySpec(
        vision_encoder=config["mm_vision_tower"],
        llm=llm,
        template=template,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if feature == "cls_patch" else "default",
        projector=config.get("mm_projector_type", "linear"),
        image_mode=mode,
        grid_pinpoints=[tuple(p) for p in pinpoints] if mode == "anyres" and isinstance(pinpoints, list) else None,
    )


def map_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LlavaLlamaForCausalLM keys -> HF LlavaForConditionalGeneration keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("base_model.model."):  # non_lora_trainables from a PEFT-wrapped model
            key = key[len("base_model.model."):]
        if key.startswith("model.mm_projector."):
            rest = key[len("model.mm_projector."):]
            idx, _, param = rest.partition(".")
            if idx in ("weight", "bias"):  # a bare nn.Linear (projector type linear)
                out[f"model.multi_modal_projector.linear_1.{idx}"] = value
            else:
                out[f"model.multi_modal_projector.linear_{int(idx) // 2 + 1}.{param}"] = value
        elif key == "model.image_newline":
            out[key] = value
        elif key.startswith("model.vision_tower.vision_tower."):
            out["model.vision_tower." + key[len("model.vision_tower.vision_tower."):]] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
        elif key.startswith("lm_head."):
            out[key] = value
        else:
            raise ConversionError(f"unexpected key in original checkpoint: {key}")
    return out


def _text_config(config: dict):
    model_type = ORIGINAL_LLM_TYPES.get(config.get("model_type", ""))
    if model_type is None:
        raise ConversionError(
            f"original model_type {config.get('model_type')!r} unsupported; known: {', '.join(ORIGINAL_LLM_TYPES)}"
        )
    keep = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in (
        "model_type", "architectures", "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter", "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj",
        "mm_use_im_start_end", "mm_use_im_patch_token", "transformers_version", "unfreeze_mm_vision_tower")}
    return AutoConfig.for_model(model_type, **keep)


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Grow an embedding / lm_head matrix to `rows`, new rows = mean of the old ones."""
    if t.shape[0] >= rows:
        return t[:rows]
    extra = t.mean(dim=0, keepdim=True).expand(rows - t.shape[0], -1)
    return torch.cat([t, extra], dim=0)


def convert_original(path: str, *, model_base: str | None = None, template: str | None = None,
                     out_dir: str | Path | None = None, llm_state: dict | None = None) -> Path:
    """Convert an original-format (full, projector-only + base, or pre-merged LLM) checkpoint to an HF folder:
    `out_dir`, or a folder of the cache built once (concurrent loaders wait for one conversion)."""
    build = lambda out: _convert_original(path, model_base, template, out, llm_state)  # noqa: E731
    if out_dir is not None:
        return build(Path(out_dir))
    return build_once(cache_dir() / "converted" / _cache_key(path, model_base, extra=template or ""), build)


def _convert_original(path: str, model_base: str | None, template: str | None, out_dir: Path,
                      llm_state: dict | None) -> Path:
    config = json.loads((Path(path) / "config.json").read_text())
    if template is None:
        try:
            template = get_entry(path).template
        except KeyError:
            raise ConversionError(
                f"{path}: original LLaVA checkpoints do not record their template; pass template= (e.g. vicuna_v1)"
            ) from None
    projector_file = find_projector_file(path)
    if llm_state is None:
        if projector_file is not None:  # projector-only: the LLM comes from model_base
            if model_base is None:
                raise ConversionError(f"{path} holds only a projector ({projector_file.name}); pass model_base (the LLM)")
            llm_state = read_folder(model_base)
        else:
            llm_state = read_folder(path)
    state = map_original_keys(llm_state)
    if projector_file is not None:
        state.update(map_original_keys(read_file(projector_file)))
    text_source = model_base if projector_file is not None and model_base else path
    text_config = AutoConfig.from_pretrained(text_source) if text_source == model_base else _text_config(config)
    tok_source = path if (Path(path) / "tokenizer_config.json").is_file() else model_base
    if tok_source is None:
        raise ConversionError(f"{path} has no tokenizer files; pass model_base")

    spec = spec_from_original(config, llm=text_source, template=template)
    vision, vision_config, family, (mean, std) = load_vision_encoder(spec.vision_encoder)
    proc = image_processing_for(spec, vision_config, family, mean, std)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = ensure_special_tokens(AutoTokenizer.from_pretrained(tok_source), Path(work))
    text_config.vocab_size = max(len(tokenizer), text_config.vocab_size)
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            state[key] = _resize_rows(state[key], text_config.vocab_size)
    hf_config, model_cls = build_config(spec, vision_config, text_config, proc, tokenizer.image_token_id)
    model = model_cls(hf_config)
    for k, v in vision.state_dict().items():
        state.setdefault(f"model.vision_tower.{k}", v)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (hf_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"{path}: weights do not fit the converted model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    setattr(model.config, META_KEY, LlavaMeta(
        template=template, image_processing=proc.to_dict(), projector=spec.projector,
        parts={"converted_from": str(path), "model_base": str(model_base or "")},
    ).model_dump())
    return save_checkpoint(model.eval(), tokenizer, proc, template, out_dir)


def merge_lora(adapter_dir: str, model_base: str, *, template: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base and save a full HF llava folder: `out_dir`, or a folder of the cache
    (keyed by adapter + base) built once."""
    build = lambda out: _merge_lora(adapter_dir, model_base, template, out)  # noqa: E731
    if out_dir is not None:
        return build(Path(out_dir))
    return build_once(cache_dir() / "merged" / _cache_key(adapter_dir, model_base, extra=template or ""), build)


def _merge_lora(adapter_dir: str, model_base: str, template: str | None, out_dir: Path) -> Path:
    from peft import PeftModel

    adapter_config = Path(adapter_dir) / "config.json"
    if adapter_config.is_file() and "mm_vision_tower" in json.loads(adapter_config.read_text()):
        # Original LLaVA LoRA: the adapter sits on the plain LLM; the projector is in non_lora_trainables.
        llm = AutoModelForCausalLM.from_pretrained(model_base, dtype=torch.float32)
        llm = PeftModel.from_pretrained(llm, adapter_dir).merge_and_unload()
        state = llm.state_dict()
        extra = find_first(adapter_dir, NON_LORA_FILES)
        if extra is None:
            raise WeightsError(f"{adapter_dir}: no non_lora_trainables file (the projector) next to the adapter")
        state.update(read_file(extra))
        return convert_original(adapter_dir, model_base=model_base, template=template, out_dir=out_dir, llm_state=state)

    base_dir = resolve_path(model_base, None)  # a base given as 'default' or original format resolves first
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    base_config = json.loads((Path(base_dir) / "config.json").read_text())
    meta = LlavaMeta(**base_config[META_KEY]) if META_KEY in base_config else None
    tmpl = template or (meta.template if meta else None)
    if tmpl is None:
        raise ConversionError(f"{model_base} does not record its template; pass template=")
    if meta is not None:
        setattr(merged.config, META_KEY, meta.model_dump())
    proc = ImageProcessing.from_dict(meta.image_processing) if meta else None
    if proc is None:
        proc = image_processing_from_hf(base_dir, base_config)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return save_checkpoint(merged.eval(), tokenizer, proc, tmpl, out_dir)


def resolve_path(path: str, model_base: str | None, template: str | None = None) -> str:
    """Turn every accepted input into an HF llava folder (or hub id), converting once where needed."""
    if path in DEFAULT_NAMES:
        return str(default_model_dir(path))
    if is_adapter(path):
        if model_base is None:
            raise LoadError(f"{path} is a LoRA adapter: pass model_base (the model it was trained on)")
        return str(merge_lora(path, model_base, template=template))
    config = read_config(path)
    if config is None:
        if model_base and find_projector_file(path):
            return str(convert_original(path, model_base=model_base, template=template))
        raise LoadError(f"{path} has no config.json; is it a model folder?")
    if config.get("model_type") in HF_LLAVA_TYPES:
        return path
    if "mm_vision_tower" in config or "mm_projector_type" in config:
        return str(convert_original(path, model_base=model_base, template=template))
    raise LoadError(
        f"{path} has model_type {config.get('model_type')!r}: not a llava checkpoint. For a plain LLM, assemble one "
        f"with llava.assemble (vision encoder + projector + this LLM)."
    )
