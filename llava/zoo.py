"""The model zoo: the standard LLaVA checkpoints people run on GPUs, as a typed, immutable table.

Each `ZooEntry` names a checkpoint three ways (our short name, the llava-hf hub id, the original liuhaotian id)
and records what a loader must not guess: architecture, chat template, image mode, and the public config shape of
the vision tower and the LLM. From the shape alone we can
  - build the transformers config (`entry.hf_config()`) and instantiate the network on the meta device,
  - count parameters exactly (`param_counts(entry)`), and
  - estimate GPU memory at bf16 / 8-bit / 4-bit (`memory_gb(entry, precision)`).
`get_entry(name)` matches exact names and ids only (never substrings); an unknown name lists the known ones.
`to_markdown()` renders the table that docs/model_zoo.md and the README show.

Nothing here downloads anything: the shapes are written down from the public config.json files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)

from llava.projector import STANDARD_PROJECTOR
from llava.templates import TEMPLATES

Arch = Literal["llava", "llava_next", "llava_onevision"]
ImageMode = Literal["pad", "resize", "anyres"]
ANYRES_ARCHS = ("llava_next", "llava_onevision")
PrecisionName = Literal["bf16", "8bit", "4bit"]

# LLaVA-1.6 AnyRes candidate resolutions (height, width), identical for every 1.6 checkpoint.
LLAVA_16_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# LLaVA-OneVision: every (h, w) of 1..6 tiles of 384 px per side (36 grids, 384 ... 2304), anyres_max_9.
ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))

GIB = 2**30
# Fixed per-process cost on top of weights and KV cache: CUDA context (~0.3-0.5 GiB), activation workspace for one
# request (CLIP over up to 5 AnyRes tiles is small next to the LLM), allocator slack. A round, stated number.
OVERHEAD_GIB = 1.0
KV_CACHE_BYTES = 2  # the KV cache stays bf16 whatever the weight precision


class ZooError(Exception):
    """Base class of model-zoo errors."""


class UnknownModelError(ZooError, KeyError):
    """A name that is neither a zoo short name, a llava-hf id nor a liuhaotian id."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0])


class UnknownPrecisionError(ZooError, ValueError):
    """A precision name outside bf16 / 8bit / 4bit."""


class DuplicateEntryError(ZooError, ValueError):
    """Two zoo entries share a short name or hub id."""


class InvalidEntryError(ZooError, ValueError):
    """A zoo entry whose fields contradict each other (e.g. anyres without pinpoints)."""


@dataclass(frozen=True)
class VisionShape:
    """CLIP or SigLIP vision tower shape (transformers `CLIPVisionConfig` / `SiglipVisionConfig` field names)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 336
    projection_dim: int = 768  # only used by CLIP's projection head, which LLaVA does not load
    family: Literal["clip", "siglip"] = "clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def hf_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "family"}
        if self.family == "siglip":
            del d["projection_dim"]
            return {"model_type": "siglip_vision_model", "vision_use_head": False, **d}
        return {"model_type": "clip_vision_model", **d}


# openai/clip-vit-large-patch14-336, the tower of the 1.5 / 1.6 entries.
CLIP_L14_336 = VisionShape()
# google/siglip-so400m-patch14-384 without its last layer and pooling head (LLaVA-OneVision / -Interleave): 729 tokens.
SIGLIP_SO400M_384 = VisionShape(hidden_size=1152, num_hidden_layers=26, num_attention_heads=16,
                                intermediate_size=4304, patch_size=14, image_size=384, family="siglip")


@dataclass(frozen=True)
class TextShape:
    """Decoder-only LLM shape (Llama / Mistral config field names). Token ids are those of the llava-hf checkpoint."""

    model_type: Literal["llama", "mistral", "qwen2"]
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"  # Qwen's q/k/v projections carry biases

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_dict(self) -> dict:
        d = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.model_type == "mistral":
            d["sliding_window"] = None  # Mistral-7B-Instruct-v0.2 (the 1.6 base) has no sliding window
        return d


# llava-hf grew each vocabulary by the added tokens (<image>, and <pad> or Yi's extras), padded to a multiple of 64:
# 32000 -> 32064 (image 32000, pad 32001), Yi 64000 -> 64064 (image 64000).
VICUNA_7B = TextShape("llama", 4096, 32, 32, 32, 11008, 32064, 10_000.0, 4096, pad_token_id=32001)
VICUNA_13B = TextShape("llama", 5120, 40, 40, 40, 13824, 32064, 10_000.0, 4096, pad_token_id=32001)
MISTRAL_7B = TextShape("mistral", 4096, 32, 32, 8, 14336, 32064, 1_000_000.0, 32768, pad_token_id=32001)
# Nous-Hermes-2-Yi-34B. The llava-hf pad id is not pinned here (not certain of it); the tokenizer carries it.
YI_34B = TextShape("llama", 7168, 60, 56, 8, 20480, 64064, 5_000_000.0, 4096)
# Qwen2 (LLaVA-OneVision) and Qwen1.5 (LLaVA-NeXT-Interleave) chat models: their vocabularies already hold the added
# <image> 151646 / <video> 151647, so the shapes are the bare LLMs'.
QWEN2_05B = TextShape("qwen2", 896, 24, 14, 2, 4864, 151936, 1_000_000.0, 32768, 1e-6, tie_word_embeddings=True)
QWEN2_7B = TextShape("qwen2", 3584, 28, 28, 4, 18944, 152064, 1_000_000.0, 32768, 1e-6)
QWEN2_72B = TextShape("qwen2", 8192, 80, 64, 8, 29568, 152064, 1_000_000.0, 32768, 1e-6)
QWEN15_05B = TextShape("qwen2", 1024, 24, 16, 16, 2816, 151936, 1_000_000.0, 32768, 1e-6, tie_word_embeddings=True)
QWEN15_7B = TextShape("qwen2", 4096, 32, 32, 32, 11008, 151936, 1_000_000.0, 32768, 1e-6)


@dataclass(frozen=True)
class ZooEntry:
    """One standard checkpoint: its names, how to prompt and preprocess it, and its config shape."""

    name: str
    hf_id: str
    original_id: str
    arch: Arch
    template: str  # an exact key of llava.templates.TEMPLATES
    image_mode: ImageMode
    text: TextShape
    image_token_id: int
    params_b: float  # published size in billions (approximate; tests check the exact count against it)
    context_tokens: int  # training max length; the memory estimate holds a KV cache this long
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    vision: VisionShape = CLIP_L14_336
    vision_tower: str = "openai/clip-vit-large-patch14-336"
    image_size: int = 336
    projector: str = STANDARD_PROJECTOR
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "full": SigLIP has no CLS token to drop
    video_token_id: int | None = None  # llava_onevision

    def __post_init__(self):
        for value, valid in ((self.arch, get_args(Arch)), (self.image_mode, get_args(ImageMode)),
                             (self.template, tuple(TEMPLATES))):
            if value not in valid:
                raise InvalidEntryError(f"{self.name}: {value!r} is not one of {valid}")
        if (self.image_mode == "anyres") != (self.grid_pinpoints is not None):
            raise InvalidEntryError(f"{self.name}: grid_pinpoints are required for anyres and only for anyres")
        if (self.arch in ANYRES_ARCHS) != (self.image_mode == "anyres"):
            raise InvalidEntryError(f"{self.name}: arch {self.arch} goes with "
                                    f"{'anyres' if self.arch in ANYRES_ARCHS else 'a square mode'}")
        if self.image_size != self.vision.image_size:
            raise InvalidEntryError(f"{self.name}: image_size {self.image_size} != tower's {self.vision.image_size}")

    @property
    def image_seq_length(self) -> int:
        """Feature tokens per base-resolution view ("default" strategy drops CLS): 576 at 336 px / patch 14, 729 for
        SigLIP at 384 px (no CLS)."""
        return self.vision.num_patches

    def hf_config(self) -> PreTrainedConfig:
        """The transformers LlavaConfig / LlavaNextConfig / LlavaOnevisionConfig with this entry's shape (no weights
        involved)."""
        kwargs = dict(
            vision_config=self.vision.hf_dict(),
            text_config=self.text.hf_dict(),
            image_token_id=self.image_token_id,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            projector_hidden_act="gelu",
            tie_word_embeddings=self.text.tie_word_embeddings,
        )
        if self.arch == "llava_onevision":
            kwargs.update(video_token_id=self.video_token_id, vision_aspect_ratio="anyres_max_9")
        else:
            kwargs["image_seq_length"] = self.image_seq_length
        if self.arch in ANYRES_ARCHS:
            kwargs["image_grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        return _ARCH_CLASSES[self.arch][0](**kwargs)

    def model_class(self) -> type[PreTrainedModel]:
        """LlavaForConditionalGeneration or LlavaNextForConditionalGeneration."""
        return _ARCH_CLASSES[self.arch][1]


_ARCH_CLASSES: Mapping[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = MappingProxyType({
    "llava": (LlavaConfig, LlavaForConditionalGeneration),
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
})


def _onevision(size: str, kind: str, text: TextShape, params_b: float) -> ZooEntry:
    """llava-hf/llava-onevision-qwen2-{size}-{kind}-hf: kind si (single-image stage) or ov (images + video)."""
    return ZooEntry(f"llava-onevision-{size}-{kind}", f"llava-hf/llava-onevision-qwen2-{size}-{kind}-hf",
                    f"lmms-lab/llava-onevision-qwen2-{size}-{kind}", "llava_onevision", "qwen_1_5", "anyres", text,
                    image_token_id=151646, video_token_id=151647, params_b=params_b, context_tokens=32768,
                    grid_pinpoints=ONEVISION_PINPOINTS, vision=SIGLIP_SO400M_384,
                    vision_tower="google/siglip-so400m-patch14-384", image_size=384, vision_feature_layer=-1,
                    vision_feature_select_strategy="full")


def _interleave(size: str, text: TextShape, params_b: float) -> ZooEntry:
    """llava-hf/llava-interleave-qwen-{size}-hf: a plain llava (SigLIP + Qwen1.5) trained on several images, frames
    and views; 729 tokens per image, a video is its frames as images."""
    return ZooEntry(f"llava-interleave-{size}", f"llava-hf/llava-interleave-qwen-{size}-hf",
                    f"lmms-lab/llava-next-interleave-qwen-{size}", "llava", "qwen_1_5", "resize", text,
                    image_token_id=151646, params_b=params_b, context_tokens=32768, vision=SIGLIP_SO400M_384,
                    vision_tower="google/siglip-so400m-patch14-384", image_size=384, vision_feature_layer=-1,
                    vision_feature_select_strategy="full")


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "liuhaotian/llava-v1.5-7b", "llava", "vicuna_v1", "pad",
             VICUNA_7B, image_token_id=32000, params_b=7.06, context_tokens=2048),
    ZooEntry("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "liuhaotian/llava-v1.5-13b", "llava", "vicuna_v1", "pad",
             VICUNA_13B, image_token_id=32000, params_b=13.35, context_tokens=2048),
    ZooEntry("llava-1.6-vicuna-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "liuhaotian/llava-v1.6-vicuna-7b",
             "llava_next", "vicuna_v1", "anyres", VICUNA_7B, image_token_id=32000, params_b=7.06,
             context_tokens=4096, grid_pinpoints=LLAVA_16_PINPOINTS),
    ZooEntry("llava-1.6-vicuna-13b", "llava-hf/llava-v1.6-vicuna-13b-hf", "liuhaotian/llava-v1.6-vicuna-13b",
             "llava_next", "vicuna_v1", "anyres", VICUNA_13B, image_token_id=32000, params_b=13.35,
             context_tokens=4096, grid_pinpoints=LLAVA_16_PINPOINTS),
    ZooEntry("llava-1.6-mistral-7b", "llava-hf/llava-v1.6-mistral-7b-hf", "liuhaotian/llava-v1.6-mistral-7b",
             "llava_next", "mistral_instruct", "anyres", MISTRAL_7B, image_token_id=32000, params_b=7.57,
             context_tokens=4096, grid_pinpoints=LLAVA_16_PINPOINTS),
    ZooEntry("llava-1.6-34b", "llava-hf/llava-v1.6-34b-hf", "liuhaotian/llava-v1.6-34b", "llava_next",
             "chatml_direct", "anyres", YI_34B, image_token_id=64000, params_b=34.75, context_tokens=4096,
             grid_pinpoints=LLAVA_16_PINPOINTS),
    _onevision("0.5b", "si", QWEN2_05B, 0.89), _onevision("0.5b", "ov", QWEN2_05B, 0.89),
    _onevision("7b", "si", QWEN2_7B, 8.03), _onevision("7b", "ov", QWEN2_7B, 8.03),
    _onevision("72b", "si", QWEN2_72B, 73.2), _onevision("72b", "ov", QWEN2_72B, 73.2),
    _interleave("0.5b", QWEN15_05B, 0.87), _interleave("7b", QWEN15_7B, 8.13),
)


def build_index(entries: tuple[ZooEntry, ...]) -> Mapping[str, ZooEntry]:
    """Read-only map from every short name, llava-hf id and liuhaotian id to its entry; a shared key is an error."""
    index: dict[str, ZooEntry] = {}
    for entry in entries:
        for key in (entry.name, entry.hf_id, entry.original_id):
            if key in index:
                raise DuplicateEntryError(f"{key!r} names both {index[key].name!r} and {entry.name!r}")
            index[key] = entry
    return MappingProxyType(index)


_INDEX = build_index(ZOO)


def get_entry(name_or_hub_id: str) -> ZooEntry:
    """The entry whose short name, llava-hf id or liuhaotian id equals `name_or_hub_id` exactly."""
    entry = _INDEX.get(name_or_hub_id)
    if entry is None:
        known = ", ".join(e.name for e in ZOO)
        raise UnknownModelError(
            f"{name_or_hub_id!r} is not in the model zoo (exact short name, llava-hf id or liuhaotian id); "
            f"known: {known}"
        )
    return entry


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts by part. `llm_linear` (decoder-layer q/k/v/o/gate/up/down weights) is what
    bitsandbytes quantizes; embeddings, norms and lm_head stay bf16 like the vision tower and projector."""

    vision: int
    projector: int  # includes LLaVA-NeXT's / OneVision's image_newline
    llm_linear: int
    llm_other: int  # embed_tokens, lm_head (untied), RMSNorms

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm_linear + self.llm_other


def _vision_params(v: VisionShape) -> int:
    h, i = v.hidden_size, v.intermediate_size
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # attention, MLP, two LayerNorms
    if v.family == "siglip":  # conv with bias, positions, no CLS, one post-LayerNorm, no pooling head
        return 3 * v.patch_size**2 * h + h + v.num_patches * h + v.num_hidden_layers * layer + 2 * h
    embeddings = h + 3 * v.patch_size**2 * h + (v.num_patches + 1) * h  # CLS, conv (no bias), positions
    return embeddings + v.num_hidden_layers * layer + 2 * 2 * h  # pre- and post-LayerNorm


def param_counts(entry: ZooEntry) -> ParamCounts:
    """Count parameters from the config shape alone (a test checks it against the meta-device model)."""
    t = entry.text
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    attn = 2 * h * h + 2 * h * kv  # q, o: [h, h]; k, v: [kv, h]
    bias = (h + 2 * kv) if t.qkv_bias else 0  # Qwen's q/k/v biases (not quantized: counted with the rest)
    mlp = 3 * h * t.intermediate_size  # gate, up, down
    projector = (entry.vision.hidden_size * h + h) + (h * h + h)  # mlp2x_gelu: linear_1, linear_2
    if entry.arch in ANYRES_ARCHS:
        projector += h  # image_newline
    embeddings = (1 if t.tie_word_embeddings else 2) * t.vocab_size * h  # embed_tokens (+ lm_head unless tied)
    return ParamCounts(
        vision=_vision_params(entry.vision),
        projector=projector,
        llm_linear=t.num_hidden_layers * (attn + mlp),
        llm_other=embeddings + t.num_hidden_layers * bias + (2 * t.num_hidden_layers + 1) * h,
    )


@dataclass(frozen=True)
class Precision:
    """How many bytes one quantizable LLM weight takes at this precision."""

    name: PrecisionName
    label: str
    llm_bytes_per_param: float


# 8-bit: int8 weights plus one fp32 scale per output row (negligible). 4-bit nf4: 0.5 byte plus block absmax
# (0.516 with double quant, 0.5625 without); 0.55 sits between.
PRECISIONS: Mapping[str, Precision] = MappingProxyType({
    "bf16": Precision("bf16", "bf16", 2.0),
    "8bit": Precision("8bit", "8-bit", 1.0),
    "4bit": Precision("4bit", "4-bit", 0.55),
})


def kv_cache_gb(entry: ZooEntry, context_tokens: int | None = None) -> float:
    """bf16 KV cache of one sequence: 2 (K, V) x layers x kv_heads x head_dim x tokens x 2 bytes, in GiB."""
    t = entry.text
    tokens = entry.context_tokens if context_tokens is None else context_tokens
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * tokens * KV_CACHE_BYTES / GIB


def memory_gb(entry: ZooEntry, precision: str, context_tokens: int | None = None) -> float:
    """GPU memory in GiB to serve one conversation: weights (decoder linears at `precision`, the rest bf16, as with
    llm_int8_skip_modules=[vision_tower, multi_modal_projector, lm_head]) + a bf16 KV cache of `context_tokens`
    (default: the entry's training max length) + OVERHEAD_GIB."""
    p = PRECISIONS.get(precision)
    if p is None:
        raise UnknownPrecisionError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    c = param_counts(entry)
    weights = c.llm_linear * p.llm_bytes_per_param + (c.total - c.llm_linear) * 2.0
    return weights / GIB + kv_cache_gb(entry, context_tokens) + OVERHEAD_GIB


def to_markdown() -> str:
    """The zoo as a Markdown table plus a note stating how memory is estimated."""
    mem_cols = [f"{p.label} (GiB)" for p in PRECISIONS.values()]
    cols = ["name", "llava-hf id", "original id", "arch", "template", "image mode", "params", *mem_cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in ZOO:
        mems = [f"{memory_gb(e, p):.1f}" for p in PRECISIONS]
        row = [f"`{e.name}`", f"`{e.hf_id}`", f"`{e.original_id}`", e.arch, f"`{e.template}`", e.image_mode,
               f"{param_counts(e).total / 1e9:.2f}B", *mems]
        lines.append("| " + " | ".join(row) + " |")
    note = (
        "Memory = weights + bf16 KV cache for one conversation at the training length (2,048 tokens for 1.5, "
        "4,096 for 1.6, the Qwen LLM's 32,768 for OneVision / Interleave) "
        f"+ {OVERHEAD_GIB:.1f} GiB (CUDA context, activations). At 8-/4-bit only the LLM's decoder "
        "linears are quantized (1.0 / 0.55 bytes per parameter); vision tower, projector, embeddings and lm_head "
        "stay bf16 (`llm_int8_skip_modules`). Parameter counts are exact for the listed config shapes. "
        "1.5 / 1.6 vision tower: openai/clip-vit-large-patch14-336, feature layer -2, 576 tokens per 336 px view; "
        "anyres pinpoints " + ", ".join(f"{h}x{w}" for h, w in LLAVA_16_PINPOINTS) + ". "
        "OneVision / Interleave: SigLIP-so400m at 384 px (26 layers, last one used, 729 tokens per view); OneVision "
        "anyres_max_9 over 1-6 x 1-6 tiles of 384 px, up to ~8,800 tokens per lone image, 730 per image of several, "
        "196 per video frame (2x2 pooled); Interleave reads every image and frame as one 729-token view."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"
