"""The model zoo: every entry instantiates on the meta device with the expected size and layout, lookups are
exact, memory estimates follow from the parameter counts, and the Markdown table matches docs/model_zoo.md."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, CLIPVisionModel, SiglipVisionModel

from llava import zoo
from llava.templates import TEMPLATES
from llava.zoo import (
    GIB,
    OVERHEAD_GIB,
    PRECISIONS,
    ZOO,
    DuplicateEntryError,
    InvalidEntryError,
    UnknownModelError,
    UnknownPrecisionError,
    build_index,
    get_entry,
    kv_cache_gb,
    memory_gb,
    param_counts,
    to_markdown,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "model_zoo.md"

# Published parameter counts of the bare parts (their own checkpoints, before llava-hf grew the vocabulary),
# independent anchors for the shape-derived counts.
LLAMA2_7B = 6_738_415_616
LLAMA2_13B = 13_015_864_320
MISTRAL_7B = 7_241_732_096
YI_34B = 34_388_917_248
CLIP_L14_336_VISION = 303_507_456
QWEN2_05B, QWEN2_7B, QWEN2_72B = 494_032_768, 7_615_616_512, 72_706_203_648
QWEN15_05B, QWEN15_7B = 463_987_712, 7_721_324_544
BARE_LLM = {
    **{f"llava-onevision-{size}-{kind}": (n, vocab) for size, n, vocab in (
        ("0.5b", QWEN2_05B, 151936), ("7b", QWEN2_7B, 152064), ("72b", QWEN2_72B, 152064)) for kind in ("si", "ov")},
    "llava-interleave-0.5b": (QWEN15_05B, 151936),
    "llava-interleave-7b": (QWEN15_7B, 151936),
    "llava-1.5-7b": (LLAMA2_7B, 32000),
    "llava-1.5-13b": (LLAMA2_13B, 32000),
    "llava-1.6-vicuna-7b": (LLAMA2_7B, 32000),
    "llava-1.6-vicuna-13b": (LLAMA2_13B, 32000),
    "llava-1.6-mistral-7b": (MISTRAL_7B, 32000),
    "llava-1.6-34b": (YI_34B, 64000),
}

NAMES = [e.name for e in ZOO]


def _meta_model(entry):
    with torch.device("meta"):
        return entry.model_class()(entry.hf_config())


def test_zoo_lists_the_standard_checkpoints():
    assert NAMES == ["llava-1.5-7b", "llava-1.5-13b", "llava-1.6-vicuna-7b", "llava-1.6-vicuna-13b",
                     "llava-1.6-mistral-7b", "llava-1.6-34b",
                     *(f"llava-onevision-{s}-{k}" for s in ("0.5b", "7b", "72b") for k in ("si", "ov")),
                     "llava-interleave-0.5b", "llava-interleave-7b"]
    assert {get_entry(n).template for n in NAMES if "onevision" in n or "interleave" in n} == {"qwen_1_5"}
    assert {e.template for e in ZOO} <= set(TEMPLATES)
    assert get_entry("llava-1.6-mistral-7b").template == "mistral_instruct"
    assert get_entry("llava-1.6-34b").template == "chatml_direct"
    assert {get_entry(n).template for n in NAMES if "vicuna" in n or "1.5" in n} == {"vicuna_v1"}


@pytest.mark.parametrize("name", NAMES)
def test_meta_model_size_and_layout(name):
    entry = get_entry(name)
    start = time.perf_counter()
    model = _meta_model(entry)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"meta instantiation of {name} took {elapsed:.1f} s"
    assert model.lm_head.weight.device.type == "meta"

    n = sum(p.numel() for p in model.parameters())
    assert n == param_counts(entry).total  # the shape formula is exact
    assert n == pytest.approx(entry.params_b * 1e9, rel=0.02)

    text = entry.text
    inner = model.model
    if entry.vision.family == "clip":
        assert isinstance(inner.vision_tower, CLIPVisionModel)
        assert sum(p.numel() for p in inner.vision_tower.parameters()) == CLIP_L14_336_VISION
    else:
        assert isinstance(inner.vision_tower, SiglipVisionModel) and not hasattr(inner.vision_tower, "head")
    proj = inner.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (entry.vision.hidden_size, text.hidden_size)
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (text.hidden_size, text.hidden_size)
    lm = inner.language_model
    assert len(lm.layers) == text.num_hidden_layers
    assert lm.embed_tokens.weight.shape == (text.vocab_size, text.hidden_size)
    assert lm.layers[0].self_attn.k_proj.out_features == text.num_key_value_heads * text.head_dim
    assert model.lm_head.out_features == text.vocab_size
    assert (model.lm_head.weight is lm.embed_tokens.weight) == text.tie_word_embeddings
    if entry.arch in ("llava_next", "llava_onevision"):
        assert inner.image_newline.shape == (text.hidden_size,)
    else:
        assert not hasattr(inner, "image_newline")

    # Independent anchor: the bare LLM's published size plus llava-hf's added rows (embed_tokens and lm_head).
    bare, bare_vocab = BARE_LLM[name]
    llm = sum(p.numel() for p in lm.parameters()) + (0 if text.tie_word_embeddings else model.lm_head.weight.numel())
    assert llm == bare + 2 * (text.vocab_size - bare_vocab) * text.hidden_size


@pytest.mark.parametrize("name", NAMES)
def test_hf_config_fields(name, tmp_path):
    entry = get_entry(name)
    cfg = entry.hf_config()
    assert cfg.model_type == entry.arch
    assert cfg.image_token_id == entry.image_token_id < entry.text.vocab_size
    if entry.vision.family == "clip":
        assert cfg.vision_feature_layer == -2
        assert cfg.vision_feature_select_strategy == "default"
        assert cfg.image_seq_length == 576 == (336 // 14) ** 2
        assert cfg.vision_config.image_size == entry.image_size == 336
    else:  # SigLIP: no CLS, the last kept layer, 27 x 27 patches
        assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")
        assert cfg.vision_config.image_size == entry.image_size == 384 and entry.image_seq_length == 729
    if entry.arch == "llava_onevision":
        assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_aspect_ratio) == (151646, 151647, "anyres_max_9")
        assert len(cfg.image_grid_pinpoints) == 36
    assert cfg.text_config.rope_parameters["rope_theta"] == entry.text.rope_theta
    if entry.arch == "llava_next":
        assert cfg.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

    # The config a checkpoint would carry survives a save/load through AutoConfig unchanged.
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert type(back) is type(cfg)
    assert back.text_config.to_dict() == cfg.text_config.to_dict()
    assert back.vision_config.to_dict() == cfg.vision_config.to_dict()


@pytest.mark.parametrize("name", NAMES)
def test_loading_code_accepts_entry(name, tmp_path):
    """What loading does with a llava-hf folder: read config.json (llava.checkpoint), pick the class through the
    Auto API, and take the template from the zoo by exact hub id (the hub itself is never contacted)."""
    loading = pytest.importorskip("llava.checkpoint")
    entry = get_entry(name)
    entry.hf_config().save_pretrained(tmp_path)
    config = loading.read_config(str(tmp_path))
    assert config["model_type"] in loading.HF_LLAVA_TYPES
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp_path))
    assert type(model) is entry.model_class()
    for hub_id in (entry.hf_id, entry.original_id):
        assert loading.resolve_template(None, None, hub_id).name == entry.template


def test_lookup_is_exact():
    for e in ZOO:
        assert get_entry(e.name) is get_entry(e.hf_id) is get_entry(e.original_id) is e
    for bad in ["llava-1.5", "llava-hf/llava-1.5-7b", "llava-1.5-7b-hf", "LLAVA-1.5-7B", "liuhaotian/llava-v1.5-7b/",
                "/models/llava-1.5-7b", "34b", ""]:
        with pytest.raises(UnknownModelError) as info:
            get_entry(bad)
        message = str(info.value)
        assert all(n in message for n in NAMES)
        assert message.startswith(repr(bad))  # not re-quoted the way KeyError does
    with pytest.raises(KeyError):  # callers may catch the builtin
        get_entry("llava-hf/llava")


def test_duplicate_and_invalid_entries_are_rejected():
    e = get_entry("llava-1.5-7b")
    with pytest.raises(DuplicateEntryError, match="llava-hf/llava-1.5-7b-hf"):
        build_index((e, dataclasses.replace(e, name="other", original_id="someone/else")))
    with pytest.raises(InvalidEntryError, match="grid_pinpoints"):
        dataclasses.replace(e, image_mode="anyres")
    with pytest.raises(InvalidEntryError, match="no_such_template"):
        dataclasses.replace(e, template="no_such_template")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.template = "plain"


def test_memory_follows_from_parameter_counts():
    e = get_entry("llava-1.5-7b")
    # KV cache: 2 x 32 layers x 4096 x 2048 tokens x 2 bytes = exactly 1 GiB.
    assert kv_cache_gb(e) == 1.0
    # GQA: Mistral keeps 8 of 32 KV heads, so a quarter of Vicuna-7B's cache at the same length.
    assert kv_cache_gb(get_entry("llava-1.6-mistral-7b"), 4096) == kv_cache_gb(e, 4096) / 4
    total = param_counts(e).total
    assert memory_gb(e, "bf16") == pytest.approx(2 * total / GIB + 1.0 + OVERHEAD_GIB)
    for entry in ZOO:
        bf16, int8, int4 = (memory_gb(entry, p) for p in ("bf16", "8bit", "4bit"))
        assert bf16 > int8 > int4
        weights_bf16 = bf16 - kv_cache_gb(entry) - OVERHEAD_GIB
        assert weights_bf16 == pytest.approx(2 * param_counts(entry).total / GIB)
        # vision tower and projector stay bf16: 4-bit weights exceed 0.55 bytes x all parameters
        assert int4 - kv_cache_gb(entry) - OVERHEAD_GIB > 0.55 * param_counts(entry).total / GIB
    assert memory_gb(get_entry("llava-1.6-34b"), "bf16") > 64  # 34.75 B params x 2 bytes alone are ~64.7 GiB
    assert memory_gb(e, "8bit", context_tokens=0) < memory_gb(e, "8bit")
    with pytest.raises(UnknownPrecisionError, match="bf16, 8bit, 4bit"):
        memory_gb(e, "int3")


def test_markdown_renders_every_entry_and_matches_docs():
    md = to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(ZOO)
    for row, e in zip(rows, ZOO):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:6] == [f"`{e.name}`", f"`{e.hf_id}`", f"`{e.original_id}`", e.arch, f"`{e.template}`",
                             e.image_mode]
        assert cells[6] == f"{param_counts(e).total / 1e9:.2f}B"
        assert [float(c) for c in cells[7:]] == [round(memory_gb(e, p), 1) for p in PRECISIONS]
    assert md in DOC.read_text(), "docs/model_zoo.md is stale: regenerate it from llava.zoo.to_markdown()"


def test_zoo_has_no_mutable_module_state():
    assert isinstance(zoo.ZOO, tuple)
    with pytest.raises(TypeError):
        zoo.PRECISIONS["fp8"] = None
