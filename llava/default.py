"""The embedded default model: DINOv2-small + SmolLM2-135M-Instruct + the trained pieces in assets/default/.

`default_model_dir()` assembles the shipped parts (no network), loads the trained projector
(`projector.safetensors`) and folds in the LoRA adapter (`adapter/`) when present, records the CPU quantization
that passed its quality gate (`precision.json`, what `--quantization auto` serves), and caches the result as an HF
llava folder keyed by the content of those assets, so a retrained default rebuilds and an unchanged one is reused.
Without trained assets the projector is freshly initialised (the model then only answers text-only questions well).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from llava.assemble import assemble, save_checkpoint
from llava.config import META_KEY, AssemblySpec, LlavaMeta, assets_root
from llava.images import ImageProcessing
from llava.buildcache import build_once, cache_dir, digest
from llava.parts import SHIPPED_LLM, SHIPPED_VISION
from llava.weights import read_file

DEFAULT_SPEC = AssemblySpec(
    vision_encoder=SHIPPED_VISION,
    llm=SHIPPED_LLM,
    template="chatml_direct",
    image_size=112,  # 8x8 = 64 patch tokens: easy-VQA images are 64 px
    image_mode="pad",
)


class DefaultModelError(RuntimeError):
    """The trained pieces in assets/ do not fit the assembled default model."""


# names `load_model` and `--model-path` accept for the embedded models: the current default, and the easy-VQA-only
# one it replaced (kept in assets/default-easyvqa/ once a newer default ships)
DEFAULT_NAMES = ("default", "default-easyvqa")


def assets_dir(name: str = "default") -> Path:
    if name not in DEFAULT_NAMES:
        raise DefaultModelError(f"unknown embedded model {name!r}; the embedded ones are {', '.join(DEFAULT_NAMES)}")
    root = assets_root() / name
    if name != "default" and not root.is_dir():
        raise DefaultModelError(f"the embedded model {name!r} is not in this installation ({root} is missing); "
                                "use 'default'")
    return root


def _spec(root: Path) -> AssemblySpec:
    spec_file = root / "spec.json"
    return AssemblySpec(**json.loads(spec_file.read_text())) if spec_file.is_file() else DEFAULT_SPEC


def _trained_files(root: Path) -> list[Path]:
    files = [root / "projector.safetensors"] if (root / "projector.safetensors").is_file() else []
    if (root / "precision.json").is_file():
        files.append(root / "precision.json")
    adapter = root / "adapter"
    if adapter.is_dir():
        files += [f for f in adapter.iterdir() if f.is_file()]
    return files


def default_model_dir(name: str = "default") -> Path:
    """Build (once, safely under concurrent starters) and return the HF folder of the embedded model `name`."""
    root = assets_dir(name)
    spec = _spec(root)
    spec_json = spec.model_dump_json()
    base = build_once(cache_dir() / "default" / f"base-{digest(spec_json)}", lambda tmp: assemble(spec, tmp))
    trained = _trained_files(root)
    if not trained:
        return base
    out = cache_dir() / "default" / f"trained-{digest(spec_json, *sorted(trained))}"
    return build_once(out, lambda tmp: _build_trained(base, tmp, root))


def _build_trained(base: Path, out: Path, root: Path) -> None:
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    projector_file = root / "projector.safetensors"
    if projector_file.is_file():
        _load_projector(model, read_file(projector_file))
    if (root / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, root / "adapter").merge_and_unload()
    config = json.loads((base / "config.json").read_text())
    meta = LlavaMeta(**config[META_KEY])
    precision = root / "precision.json"
    if precision.is_file():  # the quality gate measured by `python -m bench.precision --record`
        gate = json.loads(precision.read_text())
        meta = meta.model_copy(update={"cpu_quantization": gate.get("cpu_quantization"), "quality_gate": gate})
    setattr(model.config, META_KEY, meta.model_dump())
    tokenizer = AutoTokenizer.from_pretrained(base)
    save_checkpoint(model.eval(), tokenizer, ImageProcessing.from_dict(meta.image_processing), meta.template, out)


def _load_projector(model, state: dict[str, torch.Tensor]) -> None:
    own = {k: v for k, v in model.state_dict().items() if k.startswith("model.multi_modal_projector.")}
    if set(state) != set(own):
        raise DefaultModelError(
            f"assets projector keys {sorted(state)} do not match the model's {sorted(own)}; rebuild with train.build_default"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise DefaultModelError(f"assets projector {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
