"""LoRA adapters served on one base model: several loaded at once, chosen per request, batched together.

`read_adapter(path, model, name)` reads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), or an
output folder of `python -m train.train` (its `adapter/`), trained on the LLM of `model`, checks every tensor
against the model's decoder layers and returns a `LoraAdapter`: for each (layer, projection) the matrices A [r, in]
and B [out, r], B already multiplied by PEFT's scaling (alpha / r; alpha / sqrt(r) with rsLoRA; `alpha_pattern`
honoured), so the engine adds `x @ A.T @ B.T` to the base projection's output, row by row
(`llava.runner.LlamaRunner.set_adapters`).

Refused with the reason (these cannot be applied per request on a shared base): LoRA on modules other than the
LLM's q/k/v/o/gate/up/down projections (vision tower, projector, embeddings, LM head), DoRA, LoRA biases,
`modules_to_save`, and an adapter whose training also changed the projector (`projector.safetensors` /
`non_lora_trainables.*` differing from the base's): merge that one (`python -m train.merge`) and serve it as a model.
Only safetensors are read for the LoRA weights (no unpickling).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# module paths (after PEFT's `base_model.model.`) under which a LoRA tensor is on the LLM's decoder layers:
# ours (transformers 5 Llava), transformers 4 Llava, a plain causal LM (the original LLaVA's adapters)
_LLM_LAYER = re.compile(
    r"(?:model\.language_model\.|language_model\.model\.|model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(" + "|".join(PROJECTIONS) + r")\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight"
)
PROJECTOR_FILES = ("projector.safetensors", "non_lora_trainables.safetensors")


class AdapterError(ValueError):
    """An adapter that cannot be served on this base; the message names the cause."""


@dataclass(eq=False)
class LoraAdapter:
    name: str
    path: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> A [r, in], scaled B [out, r]
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # distinct per load: KV of a reloaded name differs

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())

    @property
    def targets(self) -> list[str]:
        return [p for p in PROJECTIONS if any(proj == p for _, proj in self.weights)]

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "rank": self.rank, "targets": self.targets,
                "parameters": self.num_parameters}


def adapter_folder(path: str | Path) -> Path:
    """The folder holding adapter_config.json: `path` itself or a training output's `adapter/`."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not p.exists():
        raise AdapterError(f"{path}: no such folder")
    raise AdapterError(f"{path}: not a LoRA adapter folder (no adapter_config.json, nor adapter/adapter_config.json)")


def _layer_shapes(model) -> tuple[int, dict[str, tuple[int, int]]]:
    cfg = model.config.get_text_config(decoder=True)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return cfg.num_hidden_layers, shapes  # (in, out) of each projection


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def _check_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder}/adapter_config.json: {e}") from None
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r} (only LoRA is served per request)")
    if cfg.get("use_dora"):
        problems.append("DoRA (use_dora: true)")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r})")
    if cfg.get("modules_to_save"):
        problems.append(f"fully trained modules {cfg['modules_to_save']} (modules_to_save)")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out weights")
    if problems:
        raise AdapterError(f"{folder}: cannot be served per request on a shared base: {'; '.join(problems)}. "
                           "Merge it into the base (python -m train.merge) and serve that as its own model.")
    return cfg


def _check_projector(folder: Path, model) -> None:
    """An adapter trained together with the projector changes the image features too: refuse it unless the saved
    projector equals the base's."""
    from llava.weights import read_file

    base = [p.detach().float().cpu() for p in model.model.multi_modal_projector.parameters()]
    for d in {folder, folder.parent}:
        for name in (*PROJECTOR_FILES, "non_lora_trainables.bin"):
            f = d / name
            if not f.is_file():
                continue
            saved = [t.float() for k, t in read_file(f).items() if "projector" in k]
            same = all(any(b.shape == s.shape and torch.allclose(b, s, atol=1e-6) for b in base) for s in saved)
            if not same:
                raise AdapterError(
                    f"{folder}: trained with its own projector ({f.name} differs from the base model's); a worker "
                    "serving several adapters shares the base's projector. Merge it (python -m train.merge) and "
                    "serve the merged folder as its own model.")


def read_adapter(path: str | Path, model, name: str) -> LoraAdapter:
    """Read and check a LoRA adapter for `model` (a loaded Llava model); see the module docstring."""
    folder = adapter_folder(path)
    cfg = _check_config(folder)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        other = "adapter_model.bin" if (folder / "adapter_model.bin").is_file() else None
        raise AdapterError(f"{folder}: no adapter_model.safetensors" + (
            f" (found {other}: pickled weights are not loaded; convert it to safetensors)" if other else ""))
    _check_projector(folder, model)
    tensors = load_file(str(weights_file))
    num_layers, shapes = _layer_shapes(model)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module = key.removeprefix("base_model.model.")
        m = _LLM_LAYER.fullmatch(module)
        if m is None:
            raise AdapterError(f"{folder}: tensor {key!r} is not LoRA on the LLM's q/k/v/o/gate/up/down projections; "
                               "only those can be switched per request")
        layer, proj, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= num_layers:
            raise AdapterError(f"{folder}: tensor {key!r} is for layer {layer}; the base has {num_layers} layers")
        pairs.setdefault((layer, proj), {})[which] = t
    if not pairs:
        raise AdapterError(f"{folder}: adapter_model.safetensors holds no LoRA tensors")
    weights = {}
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder}: layer {layer} {proj} has lora_{next(iter(ab))} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        fan_in, fan_out = shapes[proj]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise AdapterError(
                f"{folder}: layer {layer} {proj}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"base's {fan_in} -> {fan_out} projection (was the adapter trained on another model?)")
        module = f"layers.{layer}.{proj}"
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        weights[(layer, proj)] = (a.contiguous(), (b * scale).contiguous())
    return LoraAdapter(name=name, path=str(path), weights=weights)


def merged_state(adapter: LoraAdapter, model) -> dict[str, torch.Tensor]:
    """The LLM weights with `adapter` folded in (W + B A), keyed like `model.state_dict()` (tests, export)."""
    state = {}
    llm = model.model.language_model
    for (layer, proj), (a, b) in adapter.weights.items():
        parent = llm.layers[layer].self_attn if proj in PROJECTIONS[:4] else llm.layers[layer].mlp
        lin = getattr(parent, proj)
        key = f"model.language_model.layers.{layer}.{'self_attn' if proj in PROJECTIONS[:4] else 'mlp'}.{proj}.weight"
        state[key] = (lin.weight.detach().float() + b @ a).to(lin.weight.dtype)
    return state
