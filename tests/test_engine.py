"""The generation engine on a tiny random LLaVA (float32, CPU): batching equivalence, caches, cancellation, stop
strings, errors, concurrency and seeded sampling."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from llava.engine import (
    Engine,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParams,
)
from llava.images import ImageProcessing, ProcessedImage, preprocess
from llava.kvcache import ImageRun, PrefixCache
from llava.sampling import (
    IncrementalDetokenizer,
    InvalidSamplingParamsError,
    RowSampler,
    StopStringMatcher,
    apply_repetition_penalty,
    make_generator,
)
from llava.testing import make_tiny_tokenizer

IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # "default" strategy drops CLS: 16 tokens
CONTEXT = 512


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny matmuls gain nothing from a second thread, and on a shared 2-core machine the OpenMP barrier makes each
    # one wait for a descheduled sibling (10 ms instead of 10 us per Linear)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _text_config(tok) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=CONTEXT, pad_token_id=tok.pad_token_id,
    )


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=_vision_config(), text_config=_text_config(tok), image_token_id=tok.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def _engine(model, tok, **kw) -> Engine:
    return Engine(model, tok, eos_token_ids=[tok.eos_token_id], **kw)


def _image(seed: int, num_tokens: int = IMAGE_TOKENS) -> ProcessedImage:
    g = torch.Generator().manual_seed(seed)
    return ProcessedImage(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), (IMAGE_SIZE, IMAGE_SIZE),
                          num_tokens, f"img{seed}")


def _prompt(tok, question: str, images: int = 0) -> list[int]:
    ids = tok.encode("USER: ")
    ids += [tok.image_token_id] * (IMAGE_TOKENS * images)
    return ids + tok.encode(f" {question} ASSISTANT:")


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def _solo(model, tok, req: GenerationRequest):
    """The request alone in a fresh engine with no caches."""
    eng = _engine(model, tok, max_batch_size=1, image_cache_bytes=0, prefix_cache_tokens=0)
    h = eng.submit(GenerationRequest(list(req.input_ids), list(req.images), req.sampling))
    eng.run_until_idle()
    return h.result()


MIXED = [
    ("what color is the circle", 1, 12),
    ("hello", 0, 20),
    ("describe this picture of a cat and a dog in detail please", 1, 7),
    ("is there a red triangle", 2, 15),
    ("yes", 0, 3),
]


def _mixed_requests(tok) -> list[GenerationRequest]:
    reqs = []
    for i, (q, n_img, n_new) in enumerate(MIXED):
        images = [_image(10 * i + j) for j in range(n_img)]
        reqs.append(GenerationRequest(_prompt(tok, q, n_img), images, _greedy(n_new)))
    return reqs


# ------------------------------------------------------------------------------------------------ correctness


def test_solo_engine_matches_transformers_generate(model, tok):
    img = _image(1)
    ids = _prompt(tok, "what is this", 1)
    got = _solo(model, tok, GenerationRequest(ids, [img], _greedy(16))).token_ids
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]), pixel_values=img.pixel_values[None],
                             max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    assert got == ref[0, len(ids):].tolist()


def test_batched_greedy_equals_unbatched(model, tok):
    reqs = _mixed_requests(tok)
    expected = [_solo(model, tok, r).token_ids for r in reqs]
    eng = _engine(model, tok, max_batch_size=8)
    handles = [eng.submit(r) for r in reqs]
    eng.step()
    assert eng.num_running == len(reqs)  # all prefilled together, then decoded as one batch
    eng.run_until_idle()
    got = [h.result().token_ids for h in handles]
    assert got == expected
    assert [len(t) for t in got] == [n for _, _, n in MIXED]


def test_requests_join_and_leave_mid_stream(model, tok):
    reqs = _mixed_requests(tok)
    expected = [_solo(model, tok, r).token_ids for r in reqs]
    eng = _engine(model, tok, max_batch_size=3)
    handles = [eng.submit(reqs[0])]
    for _ in range(4):
        eng.step()
    assert eng.num_running == 1 and len(handles[0]._events) == 5
    handles += [eng.submit(r) for r in reqs[1:]]  # 4 more; only 2 fit beside the first
    eng.step()
    assert eng.num_running == 3 and eng.queue_length == 2
    running_counts = []
    while eng.step():
        running_counts.append(eng.num_running)
    # rows left (count drops) and the next step refilled them from the queue (back to 3)
    assert any(a < 3 and b == 3 for a, b in zip(running_counts, running_counts[1:]))
    assert eng.num_running == 0 and eng.queue_length == 0
    assert [h.result().token_ids for h in handles] == expected
    assert eng.stats().batch_tokens == 0 and eng.stats().batch_bytes == 0


def test_max_cached_tokens_bounds_the_batch(model, tok):
    reqs = _mixed_requests(tok)
    budget = max(len(r.input_ids) + r.sampling.max_new_tokens for r in reqs)
    eng = _engine(model, tok, max_batch_size=8, max_cached_tokens=budget)
    handles = [eng.submit(r) for r in reqs]
    while eng.step():
        assert eng.num_running <= 1  # no two requests fit the budget together
    assert all(h.result().finish_reason == "length" for h in handles)


def test_anyres_model_matches_generate(tok):
    torch.manual_seed(0)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(
        vision_config=_vision_config(), text_config=_text_config(tok), image_token_id=tok.image_token_id,
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    next_model = LlavaNextForConditionalGeneration(cfg).eval()
    proc = ImageProcessing(mode="anyres", size=IMAGE_SIZE, patch_size=PATCH,
                           grid_pinpoints=tuple(map(tuple, pinpoints)))
    img = preprocess(Image.new("RGB", (50, 30), (200, 30, 90)), proc)
    ids = tok.encode("USER: ") + [tok.image_token_id] * img.num_tokens + tok.encode(" what? ASSISTANT:")
    got = _solo(next_model, tok, GenerationRequest(ids, [img], _greedy(10))).token_ids
    with torch.no_grad():
        ref = next_model.generate(
            input_ids=torch.tensor([ids]), pixel_values=img.pixel_values[None],
            image_sizes=torch.tensor([img.image_size]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    assert got == ref[0, len(ids):].tolist()


# ----------------------------------------------------------------------------------------------------- caches


def test_image_cache_hits_and_evictions(model, tok):
    one_image_bytes = IMAGE_TOKENS * 64 * 4  # [16 tokens, hidden 64] float32
    eng = _engine(model, tok, image_cache_bytes=one_image_bytes, prefix_cache_tokens=0)
    a, b = _image(1), _image(2)
    outs = []
    for img, q in [(a, "what"), (a, "color"), (b, "shape"), (a, "what")]:
        h = eng.submit(GenerationRequest(_prompt(tok, q, 1), [img], _greedy(4)))
        eng.run_until_idle()
        outs.append(h.result().token_ids)
    s = eng.stats().image_cache
    assert (s.hits, s.misses, s.evictions) == (1, 3, 2)  # a miss, a hit, b miss (evicts a), a miss (evicts b)
    assert s.entries == 1 and s.bytes == one_image_bytes
    assert outs[0] == outs[3]  # recomputed features give the same answer
    assert outs[1] == _solo(model, tok, GenerationRequest(_prompt(tok, "color", 1), [a], _greedy(4))).token_ids


def test_prefix_reuse_equals_recompute(model, tok):
    img = _image(3)
    eng = _engine(model, tok, min_prefix_tokens=8)
    first = GenerationRequest(_prompt(tok, "what is in the picture", 1), [img], _greedy(12))
    h1 = eng.submit(first)
    eng.run_until_idle()
    r1 = h1.result()
    # the next turn: previous prompt + reply + a new question, same image
    turn2 = first.input_ids + r1.token_ids + tok.encode(" USER: and the color? ASSISTANT:")
    req2 = GenerationRequest(turn2, [img], _greedy(12))
    h2 = eng.submit(req2)
    eng.run_until_idle()
    r2 = h2.result()
    stats = eng.stats()
    assert stats.prefix_cache.hits == 1
    # every position whose KV exists was reused: the prompt and all replies but the last token
    assert r2.cached_tokens == len(first.input_ids) + len(r1.token_ids) - 1
    assert stats.image_cache.hits == 0  # the image sat wholly inside the reused prefix: not even looked up
    assert r2.token_ids == _solo(model, tok, req2).token_ids
    # the turn-2 sequence extends turn 1, so turn 1's entry was replaced rather than kept twice
    assert stats.prefix_cache.entries == 1


def test_prefix_with_different_image_does_not_hit(model, tok):
    eng = _engine(model, tok, min_prefix_tokens=4)
    ids = _prompt(tok, "what is it", 1)
    image_start = ids.index(tok.image_token_id)
    h = eng.submit(GenerationRequest(ids, [_image(4)], _greedy(6)))
    eng.run_until_idle()
    req = GenerationRequest(ids, [_image(5)], _greedy(6))  # same ids, another picture
    h = eng.submit(req)
    eng.run_until_idle()
    r = h.result()
    assert r.cached_tokens <= image_start  # at most the text before the image is reused
    assert r.token_ids == _solo(model, tok, req).token_ids


def test_prefix_cache_lru_bounded_in_tokens():
    kv = lambda n: [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]  # noqa: E731
    cache = PrefixCache(max_tokens=25, min_match=3)
    cache.insert(list(range(10)), [], kv(10))
    cache.insert(list(range(100, 110)), [], kv(10))
    cache.insert(list(range(200, 210)), [], kv(10))  # 30 > 25: the oldest goes
    assert cache.num_tokens == 20 and cache.counters.evictions == 1
    assert cache.lookup(list(range(12)), []) is None
    m = cache.lookup(list(range(100, 115)), [])
    assert m is not None and m.length == 10
    # the image key is part of the match
    runs = [ImageRun("a", 2, 3)]
    cache.insert([1, 1, 9, 9, 9, 1, 1, 1], runs, kv(8))
    assert cache.lookup([1, 1, 9, 9, 9, 1, 1, 1, 5], [ImageRun("b", 2, 3)]) is None
    assert cache.lookup([1, 1, 9, 9, 9, 1, 1, 1, 5], runs).length == 8


# ------------------------------------------------------------------------------------------------ cancellation


def test_cancellation_frees_row_and_cache(model, tok):
    eng = _engine(model, tok, min_prefix_tokens=4).start()
    try:
        long = eng.submit(GenerationRequest(_prompt(tok, "tell me everything", 1), [_image(6)], _greedy(400)))
        short = eng.submit(GenerationRequest(_prompt(tok, "hello"), [], _greedy(400)))
        for i, _ in enumerate(long):
            if i == 3:
                break
        assert eng.num_running == 2 and eng.stats().batch_tokens > 0
        long.cancel()
        r = long.result(timeout=10)
        assert r.finish_reason == "cancelled" and 4 <= len(r.token_ids) < 400
        short.cancel()
        assert short.result(timeout=10).finish_reason == "cancelled"
        stats = eng.stats()
        assert eng.num_running == 0 and stats.batch_tokens == 0 and stats.batch_bytes == 0
        assert stats.prefix_cache.entries == 0  # cancelled requests are not kept
        assert stats.cancelled == 2
    finally:
        eng.shutdown()


def test_cancel_while_queued(model, tok):
    eng = _engine(model, tok, max_batch_size=1)
    a = eng.submit(GenerationRequest(_prompt(tok, "a"), [], _greedy(5)))
    b = eng.submit(GenerationRequest(_prompt(tok, "b"), [], _greedy(5)))
    eng.step()
    assert eng.queue_length == 1
    b.cancel()
    eng.run_until_idle()
    assert a.result().finish_reason == "length"
    assert b.result().finish_reason == "cancelled" and b.result().token_ids == []


# ---------------------------------------------------------------------------------------------- stop strings


def test_stop_string_split_across_tokens_is_trimmed(model, tok):
    req = GenerationRequest(_prompt(tok, "what color is the circle", 1), [_image(7)], _greedy(40))
    full = _solo(model, tok, req)
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    # a stop string made of the end of one token's text and the start of the next one's
    stop, cut = _straddling_stop(tok, full.token_ids, full.text)
    req.sampling = _greedy(40, stop=("zzz-never", stop))
    eng = _engine(model, tok)
    h = eng.submit(req)
    eng.run_until_idle()
    r = h.result()
    assert r.finish_reason == "stop"
    assert r.text == full.text[:cut] and stop not in r.text
    assert "".join(ev.text for ev in h) == r.text  # the streamed deltas never leaked part of the stop string
    assert len(r.token_ids) < len(full.token_ids)  # generation really stopped


def _straddling_stop(tok, ids: list[int], text: str) -> tuple[str, int]:
    """A 3-char string whose first occurrence in `text` crosses a token boundary, and that occurrence's index."""
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k], skip_special_tokens=True)
        if not head or not text.startswith(head) or len(head) >= len(text) - 1:
            continue  # the boundary after token k falls inside a character
        stop = text[len(head) - 1 : len(head) + 2]
        if "\ufffd" not in stop and text.find(stop) == len(head) - 1:
            return stop, len(head) - 1
    pytest.fail(f"no boundary-crossing stop string in {text!r}")


def test_stop_matcher_holds_back_partial_matches():
    m = StopStringMatcher(("</s>", "###"))
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("b>") == ("</b>", False)  # disproven: released
    assert m.feed(" ok #") == (" ok ", False)
    assert m.feed("#") == ("", False)
    assert m.feed("#tail") == ("", True)
    m2 = StopStringMatcher(("END",))
    assert m2.feed("fin E") == ("fin ", False)
    assert m2.flush() == "E"


def test_eos_stops_and_is_not_in_text(model, tok):
    req = GenerationRequest(_prompt(tok, "hello there"), [], _greedy(12))
    full = _solo(model, tok, req)
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    req.sampling = SamplingParams(max_new_tokens=12, stop_token_ids=(stop_id,))
    r = _solo(model, tok, req)
    assert r.finish_reason == "stop" and r.token_ids == full.token_ids[: first + 1]
    assert r.text == tok.decode(full.token_ids[:first], skip_special_tokens=True)


def test_incremental_detokenizer_never_splits_characters(tok):
    text = "héllo wörld 日本語 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte chars really span several byte-level tokens
    det = IncrementalDetokenizer(tok)
    deltas = [det.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


# -------------------------------------------------------------------------------------------------- errors


def test_over_long_prompt_is_rejected_with_counts(model, tok):
    eng = _engine(model, tok)
    images = [_image(i) for i in range(3)]
    text = tok.encode("hello " * 300)
    ids = [tok.image_token_id] * (3 * IMAGE_TOKENS) + text
    with pytest.raises(PromptTooLongError) as e:
        eng.submit(GenerationRequest(ids, images, _greedy(4)))
    msg = str(e.value)
    assert f"{len(ids)} tokens" in msg and f"{3 * IMAGE_TOKENS} of them image tokens" in msg and str(CONTEXT) in msg
    # a prompt that fits gets max_new_tokens clipped to the context instead
    ids = _prompt(tok, "hi") + [5] * (CONTEXT - 10 - len(_prompt(tok, "hi")))
    h = eng.submit(GenerationRequest(ids, [], _greedy(100)))
    eng.run_until_idle()
    assert h.result().finish_reason == "length" and len(h.result().token_ids) == 10


def test_validation_errors_are_raised_at_submit(model, tok):
    with pytest.raises(InvalidSamplingParamsError) as e:
        SamplingParams(temperature=-0.5)
    assert e.value.field == "temperature" and isinstance(e.value, ValueError)
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0), dict(stop=("",)), dict(seed=-1)):
        with pytest.raises(InvalidSamplingParamsError) as e:
            SamplingParams(**bad)
        assert e.value.field == next(iter(bad))
    eng = _engine(model, tok)
    with pytest.raises(InvalidRequestError, match="16 image tokens .* need 32"):
        eng.submit(GenerationRequest(_prompt(tok, "x", 1), [_image(1), _image(2)], _greedy(2)))
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.submit(GenerationRequest([], [], _greedy(2)))
    assert eng.queue_length == 0


def test_failure_in_a_step_fails_only_that_request(model, tok):
    eng = _engine(model, tok)
    good = GenerationRequest(_prompt(tok, "hello"), [], _greedy(6))
    # claims 4 tokens, but a 32 px image yields 16 features: only the vision encoder can tell
    liar = ProcessedImage(torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE), 4, "liar")
    bad_ids = tok.encode("USER: ") + [tok.image_token_id] * 4 + tok.encode(" what ASSISTANT:")
    hb = eng.submit(GenerationRequest(bad_ids, [liar], _greedy(6)))
    hg = eng.submit(good)
    eng.run_until_idle()
    rb = hb.result()
    assert rb.finish_reason == "error" and "4 prompt tokens" in rb.error and "16 features" in rb.error
    assert hg.result().token_ids == _solo(model, tok, good).token_ids
    assert eng.stats().failed == 1 and eng.stats().completed == 1


class _FlakyTokenizer:
    """Delegates to the real tokenizer; decode() raises while `fail` is set (an exception inside a decode step)."""

    def __init__(self, tok):
        self.tok, self.fail = tok, False

    def __len__(self):
        return len(self.tok)

    def decode(self, ids, **kw):
        if self.fail:
            raise RuntimeError("decode exploded")
        return self.tok.decode(ids, **kw)


def test_engine_survives_a_failing_decode_step(model, tok):
    flaky = _FlakyTokenizer(tok)
    eng = Engine(model, flaky, eos_token_ids=[tok.eos_token_id])
    hs = [eng.submit(r) for r in _mixed_requests(tok)[:2]]
    eng.step()
    assert eng.num_running == 2
    flaky.fail = True
    eng.step()
    for h in hs:
        r = h.result()
        assert r.finish_reason == "error" and r.error == "RuntimeError: decode exploded"
    assert eng.num_running == 0 and eng.stats().batch_bytes == 0 and eng.stats().failed == 2
    flaky.fail = False
    req = _mixed_requests(tok)[2]
    h = eng.submit(req)
    eng.run_until_idle()
    assert h.result().token_ids == _solo(model, tok, req).token_ids


# --------------------------------------------------------------------------------------------- concurrency


def test_concurrent_submitters_threads_and_asyncio(model, tok):
    reqs = _mixed_requests(tok) * 2
    expected = [_solo(model, tok, r).token_ids for r in reqs[: len(MIXED)]] * 2
    eng = _engine(model, tok, max_batch_size=4).start()
    try:
        got: dict[int, list[int]] = {}

        def worker(i):
            h = eng.submit(GenerationRequest(list(reqs[i].input_ids), reqs[i].images, reqs[i].sampling))
            got[i] = [ev.token_id for ev in h if ev.token_id is not None]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [got[i] for i in range(len(reqs))] == expected

        async def consume(r):
            h = eng.submit(GenerationRequest(list(r.input_ids), r.images, r.sampling))
            return [ev.token_id async for ev in h if ev.token_id is not None]

        async def main():
            return await asyncio.gather(*(consume(r) for r in reqs))

        assert asyncio.run(main()) == expected
    finally:
        eng.shutdown()


# ----------------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_alone_and_batched(model, tok):
    params = SamplingParams(max_new_tokens=15, temperature=1.3, top_p=0.9, top_k=50, repetition_penalty=1.2,
                            seed=1234, ignore_eos=True)
    req = GenerationRequest(_prompt(tok, "describe the photo", 1), [_image(8)], params)
    alone = _solo(model, tok, req).token_ids
    assert _solo(model, tok, req).token_ids == alone
    eng = _engine(model, tok)
    handles = [eng.submit(r) for r in _mixed_requests(tok)[:3]]
    h = eng.submit(GenerationRequest(req.input_ids, req.images, params))
    eng.run_until_idle()
    assert h.result().token_ids == alone
    assert all(x.result().finish_reason == "length" for x in handles)
    other = GenerationRequest(req.input_ids, req.images,
                              SamplingParams(**{**params.__dict__, "seed": 99}))
    assert _solo(model, tok, other).token_ids != alone
    greedy = _solo(model, tok, GenerationRequest(req.input_ids, req.images, _greedy(15))).token_ids
    assert alone != greedy


def test_logprobs_equal_log_softmax_of_the_models_logits(model, tok):
    """Each generated token's logprob and its top alternatives are the log-softmax of transformers' logits at that
    position (over the tokens the engine can generate: the image token is never one), sampled or greedy, alone or
    batched beside requests that did not ask; a final EOS gets none."""
    img = _image(3)
    ids = _prompt(tok, "what is this", 1)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.5, seed=7, ignore_eos=True, logprobs=5)
    eng = _engine(model, tok)
    others = [eng.submit(r) for r in _mixed_requests(tok)[:2]]
    h = eng.submit(GenerationRequest(ids, [img], sampled))
    eng.run_until_idle()
    res = h.result()
    assert res.logprobs is not None and len(res.logprobs) == len(res.token_ids) == 8
    assert all(o.result().logprobs is None for o in others)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + res.token_ids]), pixel_values=img.pixel_values[None]).logits[0]
    logits[:, tok.image_token_id] = float("-inf")
    ref = torch.log_softmax(logits[len(ids) - 1 : -1].float(), dim=-1)
    for i, lp in enumerate(res.logprobs):
        assert lp.token_id == res.token_ids[i]
        assert lp.logprob == pytest.approx(float(ref[i, lp.token_id]), abs=1e-4)
        top_v, top_i = ref[i].topk(5)
        assert [t for t, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)
    # greedy: the chosen token is the top alternative; logprobs=0 lists no alternatives
    greedy = _solo(model, tok, GenerationRequest(ids, [img], _greedy(4, logprobs=0)))
    assert all(lp.top == () for lp in greedy.logprobs)
    with pytest.raises(InvalidSamplingParamsError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_an_image_sent_by_id_uses_the_cached_features(model, tok):
    img = _image(4)
    ids = _prompt(tok, "what is this", 1)
    eng = _engine(model, tok)
    assert eng.cached_image(img.key) is None
    h = eng.submit(GenerationRequest(ids, [img], _greedy(6)))
    eng.run_until_idle()
    ref = eng.cached_image(img.key)
    assert ref is not None and ref.pixel_values is None and ref.num_tokens == IMAGE_TOKENS
    h2 = eng.submit(GenerationRequest(ids, [ref], _greedy(6)))
    eng.run_until_idle()
    assert h2.result().token_ids == h.result().token_ids
    bad = type(ref)(None, (0, 0), IMAGE_TOKENS, "x", features=ref.features[:3])
    with pytest.raises(InvalidRequestError, match="features must be"):
        eng.submit(GenerationRequest(ids, [bad], _greedy(2)))


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                 "ok": {"type": "boolean"}},
                "required": ["x", "ok"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "pos"],
    "additionalProperties": False,
}


def _check_person(value: dict) -> None:
    assert list(value) == ["name", "age", "tags", "pos"]  # the schema's order
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(t in ("red", "green", "blue") for t in value["tags"])
    assert set(value["pos"]) == {"x", "ok"} and -9 <= value["pos"]["x"] <= 9 and isinstance(value["pos"]["ok"], bool)


def test_constrained_outputs_match_their_schema_regex_or_choices(model, tok):
    """On a random model (which, left alone, writes nonsense), constrained requests batched with unconstrained ones
    end with an output that matches: a nested JSON schema with enums and arrays, regexes, choices, any JSON object;
    greedy and sampled; their log-probabilities stay those of the unmasked model."""
    from llava.structured import Constraint

    cases = [(Constraint("json_schema", PERSON), lambda t: _check_person(json.loads(t))),
             (Constraint("regex", r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) or 1 / 0),
             (Constraint("choice", ["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe") or 1 / 0),
             (Constraint("json_object"), lambda t: isinstance(json.loads(t), dict) or 1 / 0)]
    eng = _engine(model, tok)
    plain = [eng.submit(r) for r in _mixed_requests(tok)[:3]]
    handles = []
    for c, check in cases:
        for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
            params = SamplingParams(max_new_tokens=120, temperature=temperature, seed=seed, constraint=c, logprobs=0)
            h = eng.submit(GenerationRequest(_prompt(tok, "who?", 1), [_image(5)], params))
            h.constraint_kind = c.kind
            handles.append((h, check))
    eng.run_until_idle()
    for h, check in handles:
        res = h.result()
        if h.constraint_kind == "json_object" and res.finish_reason == "length":
            assert res.text.startswith("{")  # random weights may write one endless key: a valid prefix, cut
            continue
        assert res.finish_reason == "stop", (res.text, res.finish_reason)
        check(res.text)
        assert all(lp.logprob <= 0 for lp in res.logprobs)
    assert [h.result().token_ids for h in plain] == [_solo(model, tok, r).token_ids for r in _mixed_requests(tok)[:3]]


def test_invalid_constraints_are_refused_at_submit(model, tok):
    from llava.structured import Constraint, ConstraintError

    eng = _engine(model, tok)
    ids = _prompt(tok, "hi", 0)
    for bad in (Constraint("regex", "[a-"), Constraint("grammar", "start: undefined_rule"),
                Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "no-such-type"}}})):
        with pytest.raises(InvalidRequestError, match="constraint: invalid"):
            eng.submit(GenerationRequest(ids, [], SamplingParams(constraint=bad)))
    with pytest.raises(ConstraintError, match="unknown constraint kind"):
        Constraint("xml")
    with pytest.raises(ConstraintError, match="non-empty list"):
        Constraint("choice", [])


def test_a_final_eos_has_no_logprob(model, tok):
    ids = _prompt(tok, "hello", 0)
    first = _solo(model, tok, GenerationRequest(ids, [], _greedy(1))).token_ids[0]
    eng = Engine(model, tok, eos_token_ids=[first])  # the first greedy token ends the request
    h = eng.submit(GenerationRequest(ids, [], SamplingParams(max_new_tokens=5, logprobs=2)))
    eng.run_until_idle()
    res = h.result()
    assert res.token_ids == [first] and res.finish_reason == "stop" and res.logprobs == []


# ------------------------------------------------------------------------------------------------ quantized


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_model_batches_like_it_generates(model, tok, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    q = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if bits == 8 else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip))
    model.save_pretrained(tmp_path)
    qmodel = LlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=q, device_map={"": "cpu"})
    qmodel.eval()
    assert "bitsandbytes" in type(qmodel.model.language_model.layers[0].mlp.up_proj).__module__
    reqs = _mixed_requests(tok)[:3]
    eng = _engine(qmodel, tok)
    handles = [eng.submit(r) for r in reqs]
    eng.run_until_idle()
    assert [h.result().token_ids for h in handles] == [_solo(qmodel, tok, r).token_ids for r in reqs]
    img, ids = reqs[0].images[0], reqs[0].input_ids
    with torch.no_grad():
        ref = qmodel.generate(input_ids=torch.tensor([ids]), pixel_values=img.pixel_values[None], do_sample=False,
                              max_new_tokens=12, min_new_tokens=12, pad_token_id=tok.pad_token_id)
    ref = ref[0, len(ids):].tolist()
    # the engine never emits <image> (it would corrupt the next turn); generate may: compare up to there
    n = ref.index(tok.image_token_id) if tok.image_token_id in ref else len(ref)
    assert n >= 6 and handles[0].result().token_ids[:n] == ref[:n]
    assert tok.image_token_id not in handles[0].result().token_ids


def test_top_k_top_p_and_repetition_penalty_restrict_choices():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def draws(**kw):
        p = SamplingParams(temperature=1.0, seed=0, **kw)
        s = RowSampler(p, make_generator(p))
        return {s.choose(logits.clone()) for _ in range(300)}

    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    assert draws(top_p=0.85) == {0, 1, 2}
    penalised = apply_repetition_penalty(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([0, 1]), 2.0)
    assert penalised.tolist() == [1.0, -2.0, 3.0]
    greedy = RowSampler(SamplingParams(repetition_penalty=4.0), None, seen={0})
    assert greedy.choose(logits.clone()) == 1  # the seen top token lost its lead


# ----------------------------------------------------------------------------------------------- CPU threads


class _FakeCpu:
    """Clock, /proc/stat and own CPU time the test moves by hand (ticks: 100 per CPU-second)."""

    def __init__(self, ncpu=2):
        self.t, self.busy, self.total, self.own, self.ncpu = 0.0, 0, 0, 0, ncpu

    def run(self, seconds, others, own):
        self.t += seconds
        self.total += round(100 * seconds * self.ncpu)
        self.busy += round(100 * seconds * (others + own))
        self.own += round(100 * seconds * own)

    def governor(self, cpus=2):
        from llava.hardware import ThreadGovernor

        return ThreadGovernor(interval=2.0, cpus=cpus, read=lambda: (self.busy, self.total, self.ncpu),
                              own=lambda: self.own, clock=lambda: self.t)


def test_thread_governor_leaves_the_cpus_other_processes_use():
    cpu = _FakeCpu()
    g = cpu.governor()
    assert g.threads() is None  # the first reading is only a baseline
    cpu.run(1.0, others=1.0, own=1.0)
    assert g.threads() is None  # not yet an interval later
    cpu.run(1.5, others=1.0, own=1.0)
    assert g.threads() == 1 and g.others == pytest.approx(1.0)  # one busy process: one thread
    cpu.run(2.0, others=0.0, own=1.0)
    assert g.threads() == 2  # its own busy time is not counted against it
    cpu.run(2.0, others=2.0, own=0.0)
    assert g.threads() == 1  # never fewer than one
    cpu.run(2.0, others=0.0, own=2.0)
    assert g.threads() == 2


def test_thread_governor_stands_aside_where_it_cannot_measure():
    cpu = _FakeCpu(ncpu=64)  # a container seeing its host's CPUs through /proc/stat
    g = cpu.governor(cpus=2)
    assert g.threads() is None and not g.enabled
    cpu.run(2.0, others=30.0, own=1.0)
    assert g.threads() is None


def test_engine_with_auto_cpu_threads_sets_torch_threads_in_its_own_thread(model, tok):
    """cpu_threads="auto": the engine thread applies the governor's choice before its steps; output unchanged."""
    from llava.config import EngineConfig

    with pytest.raises(ValueError, match="cpu_threads must be fixed or auto"):
        EngineConfig(cpu_threads="all")
    cpu = _FakeCpu()
    eng = _engine(model, tok, cpu_threads="auto")
    eng._threads = cpu.governor()
    seen = []
    real_apply = eng._threads.apply

    def apply():
        seen.append((threading.current_thread().name, real_apply()))
        return seen[-1][1]

    eng._threads.apply = apply
    assert eng._threads.threads() is None  # the baseline reading
    cpu.run(2.0, others=0.0, own=1.0)  # then an idle machine: the engine's first step decides
    ids = _prompt(tok, "what is this", 1)
    req = GenerationRequest(ids, [_image(1)], _greedy(8))
    with eng:
        got = eng.submit(req).result(timeout=60).token_ids
    assert seen and all(name == "llava-engine" for name, _ in seen)
    assert 2 in {n for _, n in seen}  # idle machine: both CPUs
    assert eng.stats().cpu_threads == seen[-1][1]  # what the engine thread ran its last step with
    torch.set_num_threads(1)
    assert got == _solo(model, tok, req).token_ids


_SINGLE_OPENMP = r"""
import threading, torch
from llava.hardware import _libgomp, single_openmp_thread
torch.set_num_threads(2)
(torch.randn(3, 400, 400) * 2).sum()  # the main thread starts its OpenMP team
if _libgomp() is None:
    print("no-libgomp")
    raise SystemExit
assert single_openmp_thread(release=True)
seen = {"main": torch.get_num_threads()}
(torch.randn(3, 400, 400) * 2).sum()
seen["main after an op"] = torch.get_num_threads()
t = threading.Thread(target=lambda: seen.update(engine=torch.get_num_threads())); t.start(); t.join()
t = threading.Thread(target=lambda: (single_openmp_thread(), seen.update(request=torch.get_num_threads()))); t.start(); t.join()
print(seen)
"""


def test_single_openmp_thread_leaves_other_threads_their_count():
    """single_openmp_thread: the calling thread computes on one OpenMP thread from then on (also after torch ops);
    a new thread (the engine's) still gets torch's count. In a subprocess: the test process keeps its threads."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SINGLE_OPENMP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no-libgomp":
        pytest.skip("torch does not run on GNU OpenMP here")
    assert out.stdout.strip() == str({"main": 1, "main after an op": 1, "engine": 2, "request": 1})
