"""The engine's own LLM forward (llava.runner.LlamaRunner) against transformers' on tiny Llama / Mistral / Qwen2
models: prefill and decode logits, the fused CPU path against the plain torch path, int4 decode layers, row
independence, KV growth, chunked prefill and prefix reuse from a running request."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig, Qwen2Config,
)

from llava import kernels
from llava.engine import IDLE_PREFILL_FACTOR, Engine, GenerationRequest, SamplingParams, UnsupportedModelError
from llava.quant import quantize_llm
from llava.runner import Chunk, LlamaRunner
from llava.testing import make_tiny_tokenizer

VOCAB = 400


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llava(kind: str = "llama", **text) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    common.update(text)
    text_config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**common)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=16, patch_size=8),
        text_config=text_config, image_token_id=3, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make q/k/v biases (Qwen2) matter
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.1)
    return model


def runner_for(model, **kw) -> LlamaRunner:
    return LlamaRunner(model, vocab_limit=VOCAB, image_token_id=3, max_rows=kw.pop("max_rows", 4),
                       context_length=256, **kw)


def hf_next_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.language_model(input_ids=torch.tensor([ids]))
        logits = model.lm_head(out.last_hidden_state[0, -1]).float()
    logits[3] = float("-inf")
    return logits


def prefill(runner, key, ids, start=0):
    emb = runner.embed(torch.tensor(ids[start:]))
    return runner.prefill([Chunk(key, emb, start, True)])[key]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_prefill_and_decode_equal_transformers(kind):
    model = tiny_llava(kind)
    assert LlamaRunner.unsupported_reason(model) is None
    runner = runner_for(model)
    ids = [5, 17, 99, 23, 8, 41, 7]
    runner.reserve("a", 32)
    torch.testing.assert_close(prefill(runner, "a", ids), hf_next_logits(model, ids), rtol=1e-4, atol=1e-4)
    seq = list(ids)
    for token in (12, 77, 5):
        got = runner.decode(["a"], [token])[0]
        seq.append(token)
        torch.testing.assert_close(got, hf_next_logits(model, seq), rtol=1e-4, atol=1e-4)


def test_fused_cpu_path_equals_the_torch_path():
    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    model = tiny_llava()
    fused, plain = runner_for(model), runner_for(model)
    plain.fused = False
    assert fused.fused
    for r in (fused, plain):
        r.reserve("a", 40)
        r.reserve("b", 40)
        prefill(r, "a", [5, 6, 7, 8, 9, 10])
        prefill(r, "b", [11, 12, 13])  # rows of different lengths: the torch path masks, the fused one doesn't need to
    for tokens in ([20, 21], [22, 23], [24, 25]):
        torch.testing.assert_close(fused.decode(["a", "b"], tokens), plain.decode(["a", "b"], tokens),
                                   rtol=1e-4, atol=1e-4)


def test_int4_decode_layers_track_transformers_and_rows_are_independent():
    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    model = tiny_llava()
    quantize_llm(model, "int4")
    runner = runner_for(model)
    assert runner._q4_layers is not None  # each decoder layer is one kernel call
    # each runner times its own kernel/dense crossover for prefill (and may release the dense copies, which the
    # next runner then lacks): pin both prompts' prefill to the kernels, as this test is about the decode rows
    runner.kernel_prefill_rows = 64
    ids = [5, 17, 99, 23, 8]
    runner.reserve("a", 32)
    first = prefill(runner, "a", ids)
    alone = runner.decode(["a"], [int(first.argmax())])[0]
    ref = hf_next_logits(model, ids + [int(first.argmax())])  # transformers' forward on the same int4 weights
    real = torch.isfinite(ref)
    assert (alone - ref)[real].abs().max() < 0.05 * ref[real].abs().max()  # int8 activations in the kernel
    # the same row again, now decoded beside another request: bit-identical
    other = runner_for(model)
    other.kernel_prefill_rows = runner.kernel_prefill_rows
    for key, row_ids in (("x", [40, 41, 42, 43, 44, 45, 46]), ("a", ids)):
        other.reserve(key, 32)
        prefill(other, key, row_ids)
    both = other.decode(["x", "a"], [9, int(first.argmax())])
    assert torch.equal(both[1], alone)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_prefill_with_and_without_dense_copies(kind):
    """Prefill of a long prompt multiplies by the dense copies when kept, else dequantizes per product; the crossover
    between kernels and dense products is measured when the runner is built, whichever is the case."""
    ids = list(range(5, 65))  # more rows than the smallest kernel prefill
    logits = []
    for budget in (None, 0):
        model = tiny_llava()
        quantize_llm(model, kind, dense_budget_bytes=budget)
        runner = runner_for(model)
        assert runner.kernel_prefill_rows >= 0
        runner.reserve("a", 64)
        logits.append(prefill(runner, "a", ids))
    # the kernels compute with bf16 (int8) or int8 activations (int4), the dense copies in float32
    real = torch.isfinite(logits[0])  # the image token's logit is masked
    assert (logits[0] - logits[1])[real].abs().max() < 0.02 * logits[0][real].abs().max()


def test_kv_rows_grow_while_positions_stay():
    model = tiny_llava()
    runner = runner_for(model, max_rows=8)
    runner.reserve("long", 200)
    prefill(runner, "long", list(range(5, 105)))  # 100 positions held
    for i in range(5):  # more rows with short prompts: the buffers grow in rows, never shrink in positions
        runner.reserve(f"s{i}", 8)
        prefill(runner, f"s{i}", [5 + i, 6, 7])
    assert runner._k.shape[3] >= 100 and runner.length("long") == 100
    keys = ["long"] + [f"s{i}" for i in range(5)]
    runner.decode(keys, [9] * 6)
    runner.release("s2")
    runner.release("long")
    assert runner.num_rows == 4 and all(runner.length(f"s{i}") == 4 for i in (0, 1, 3, 4))


def engine(model, tok, **kw) -> Engine:
    return Engine(model, tok, eos_token_ids=[tok.eos_token_id], **kw)


def test_chunked_prefill_equals_one_pass():
    tok = make_tiny_tokenizer()
    model = tiny_llava(vocab_size=len(tok))
    ids = tok.encode("USER: describe this picture of a cat and a dog in detail please ASSISTANT:")
    outs = []
    for budget in (512, 7):
        eng = engine(model, tok, max_prefill_tokens_per_step=budget, prefix_cache_tokens=0)
        h = eng.submit(GenerationRequest(ids, [], SamplingParams(max_new_tokens=10, ignore_eos=True)))
        steps = 0
        while eng.step():
            steps += 1
        outs.append((h.result().token_ids, steps))
    assert outs[0][0] == outs[1][0]
    # the small budget (x IDLE_PREFILL_FACTOR while nothing decodes) took several steps to prefill
    assert outs[1][1] >= outs[0][1] + -(-len(ids) // (7 * IDLE_PREFILL_FACTOR)) - 1 >= outs[0][1] + 1


def test_running_request_prefix_is_reused_and_equal():
    tok = make_tiny_tokenizer()
    model = tiny_llava(vocab_size=len(tok))
    system = tok.encode("chat between curious user and artificial intelligence assistant gives helpful answers")
    first = system + tok.encode(" USER: hello ASSISTANT:")
    second = system + tok.encode(" USER: what color is the circle ASSISTANT:")
    eng = engine(model, tok, min_prefix_tokens=8)
    h1 = eng.submit(GenerationRequest(first, [], SamplingParams(max_new_tokens=30, ignore_eos=True)))
    eng.step()
    eng.step()  # the first request is decoding: its KV holds the shared system prompt
    h2 = eng.submit(GenerationRequest(second, [], SamplingParams(max_new_tokens=8, ignore_eos=True)))
    eng.run_until_idle()
    r2 = h2.result()
    assert r2.cached_tokens >= len(system) - 1 and not h1.result().error
    solo = engine(model, tok, prefix_cache_tokens=0)
    h = solo.submit(GenerationRequest(second, [], SamplingParams(max_new_tokens=8, ignore_eos=True)))
    solo.run_until_idle()
    assert r2.token_ids == h.result().token_ids


def test_models_the_runner_does_not_compute_are_named():
    assert "sliding-window" in LlamaRunner.unsupported_reason(tiny_llava("mistral", sliding_window=16))
    dynamic = tiny_llava(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "RoPE type 'dynamic'" in LlamaRunner.unsupported_reason(dynamic)
    tok = make_tiny_tokenizer()
    with pytest.raises(UnsupportedModelError, match="DynamicSlidingWindowLayer"):
        engine(tiny_llava("mistral", sliding_window=16, vocab_size=len(tok)), tok)
    eng = engine(tiny_llava(vocab_size=len(tok)), tok, runner="transformers")
    assert eng.stats().runner == "transformers (asked for)"
