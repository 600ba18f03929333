"""Quantized weights are computed once per checkpoint and read back from the cache on later loads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import llava.quant as quant
from llava.testing import make_tiny_tokenizer


@pytest.fixture
def model():
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=16, patch_size=8),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64),
        image_token_id=tok.image_token_id)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_second_load_reads_the_cache_and_equals_the_first(model, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_CACHE", str(tmp_path))
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    quant.quantize_llm(first, kind, cache_key="k1")
    assert (tmp_path / "quantized" / f"{kind}-k1" / "state.safetensors").is_file()

    def no_quantizing(*a, **k):
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(quant, "quantize_linear", no_quantizing)
    quant.quantize_llm(second, kind, cache_key="k1")
    x = torch.randn(3, 64)
    pairs = [(a, b) for a, b in zip(first.modules(), second.modules()) if isinstance(a, quant.QuantLinear)]
    assert len(pairs) == 2 * 7 + 1  # and the LM head
    for a, b in pairs:
        assert type(a) is type(b)
        assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))
        if a.in_features == 64:
            assert torch.equal(a.small(x), b.small(x))
