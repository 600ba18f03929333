"""Benchmark of the generation engine (`python -m bench.engine [--quick]`), at this machine's serving defaults.

- P1: single-stream tokens/s through the engine vs. a raw loop of model forward steps (same model, prompt, greedy).
- P7: single-stream decode tokens/s of the engine vs. llama.cpp (llama-cpp-python) on the shipped GGUF of the same
  LLM: same ChatML text prompt, 128 new tokens, greedy, same threads, runs alternated (`make bench` installs it).
- P2 / P8: aggregate tokens/s with 1, 4 and 16 concurrent image streams vs. the original LLaVA worker's design (one
  `model.generate` thread per request, at most 5 at once, no batching), and at 16 streams vs. llama.cpp's
  single-stream tokens/s.
- TTFT: time to first token of one image question on an idle engine with nothing cached (cold, p50), and of 16
  image questions with distinct images arriving together (p95).
- P3: time to first token at turns 1..8 of one image conversation, with the engine's caches and without.
- roofline_fraction: LLM weight bytes read per decode step x steps/s / the read bandwidth measured here.
Full mode runs the embedded default model with `--dtype auto --quantization auto` (what a worker serves here);
--quick builds a small random LLaVA in memory. As in a worker, only the engine thread runs OpenMP teams (the raw
loop, llama.cpp and the bandwidth probe run in threads of their own, and P1/P7 start a new engine per round and shut
it down before the other side runs, so each side runs as the process's only OpenMP team). Every result names the CPU
flags it ran on. Prints a table, writes bench/results/engine-<mode>.json; the last printed line is a one-line JSON
summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from llava.engine import Engine, GenerationRequest, SamplingParams
from llava.hardware import single_openmp_thread
from llava.images import ImageProcessing, ProcessedImage, load_image, preprocess
from llava.templates import get_template, render, stop_token_ids

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "What shape is in the image?", "What color is the shape?", "Is there a circle?", "Describe the picture.",
    "Is the shape red?", "How many shapes are there?", "Is it a triangle?", "What is the background color?",
]
BASELINE_CONCURRENCY = 5  # the original worker's --limit-model-concurrency


@dataclass
class Setup:
    """A model and everything needed to turn a conversation into a request."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    template: object
    eos_ids: list[int]
    process: Callable[[Image.Image], ProcessedImage]
    p1_tokens: int
    p2_tokens: int
    p3_tokens: int
    repeats: int
    quantization: str | None = None
    precision_reason: str = ""

    def prompt(self, messages: list[dict], images: list[ProcessedImage]) -> list[int]:
        return render(messages, self.template, self.tokenizer, image_token_counts=[im.num_tokens for im in images],
                      add_generation_prompt=True).input_ids


# ------------------------------------------------------------------------------------------------------ setups


def quick_setup() -> Setup:
    """A small random LLaVA: CLIP-style tower (64 px, patch 8 -> 64 image tokens) + a 4-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=64, patch_size=8),
        text_config=LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                                pad_token_id=tok.pad_token_id),
        image_token_id=tok.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    template = get_template("chatml_direct")
    proc = ImageProcessing(mode="pad", size=64, patch_size=8)
    return Setup("tiny", model, tok, template, stop_token_ids(template, tok), lambda im: preprocess(im, proc),
                 p1_tokens=64, p2_tokens=32, p3_tokens=16, repeats=5)


def default_setup(dtype: str = "auto", quantization: str = "auto") -> Setup:
    """The embedded default model (DINOv2-small + SmolLM2-135M) at the given precision."""
    try:
        from llava.loading import load_model

        loaded = load_model("default", dtype=dtype, quantization=quantization)
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise SystemExit(
            f"bench.engine: the embedded default model could not be loaded ({type(exc).__name__}: {exc}); "
            "run with --quick for the tiny model"
        ) from exc
    setup = Setup("default", loaded.model, loaded.tokenizer, loaded.template,
                  stop_token_ids(loaded.template, loaded.tokenizer),
                  lambda im: loaded.process_images([im])[0], p1_tokens=128, p2_tokens=128, p3_tokens=32, repeats=5)
    setup.quantization, setup.precision_reason = loaded.quantization, loaded.precision_reason
    return setup


def synthetic_image(i: int) -> Image.Image:
    """Distinct small pictures (a coloured shape on a background), so no two streams share image features."""
    rng = np.random.default_rng(i)
    bg = tuple(int(c) for c in rng.integers(0, 255, 3))
    fg = tuple(int(c) for c in rng.integers(0, 255, 3))
    im = Image.new("RGB", (64, 64), bg)
    x, y = (int(v) for v in rng.integers(8, 32, 2))
    ImageDraw.Draw(im).ellipse((x, y, x + 24, y + 24), fill=fg)
    return load_image(im)


# ---------------------------------------------------------------------------------------------------- helpers


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


@dataclass
class StreamTiming:
    tokens: int
    ttft: float
    itl: list[float]
    end: float


def consume(handle, t_submit: float) -> StreamTiming:
    """Iterate a handle's events, timing the first token and the gaps between tokens (client side)."""
    stamps = []
    for ev in handle:
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"request finished without tokens: {handle.result()}")
    return StreamTiming(len(stamps), stamps[0] - t_submit, list(np.diff(stamps)), stamps[-1])


def one_image_request(setup: Setup, i: int, n_new: int) -> tuple[list[int], list[ProcessedImage]]:
    img = setup.process(synthetic_image(i))
    q = f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"
    ids = setup.prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], [img])
    return ids, [img]


def fixed_length(n: int) -> SamplingParams:
    # ignore_eos: throughput is measured on exactly n tokens per stream
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def no_cache_engine(setup: Setup, **kw) -> Engine:
    return Engine(setup.model, setup.tokenizer, eos_token_ids=setup.eos_ids, image_cache_bytes=0,
                  prefix_cache_tokens=0, **kw)


# ------------------------------------------------------------------------------------------------------- P1


def solo_engine_run(setup: Setup, request: GenerationRequest) -> tuple[float, StreamTiming]:
    """One request on a new single-stream engine, shut down after it (its thread and OpenMP team gone): the side
    measured next runs as the process's only OpenMP team, as each would in its own server. (t_submit, timing)."""
    engine = no_cache_engine(setup, max_batch_size=1).start()
    try:
        t0 = time.perf_counter()
        return t0, consume(engine.submit(request), t0)
    finally:
        engine.shutdown()


def in_fresh_thread(fn, *args):
    """fn(*args) in a new thread, which ends with it (and with it the OpenMP team it started): the engine thread's
    team stays the only live one, as in a worker (llava.hardware.single_openmp_thread)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    if not out:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its thread (traceback above)")
    return out[0]


@torch.inference_mode()
def raw_loop(model, ids: list[int], image: ProcessedImage, n: int) -> float:
    """Seconds for prefill + n-1 greedy decode steps with plain forward calls and a DynamicCache."""
    t0 = time.perf_counter()
    extra = {}
    pv = image.pixel_values.unsqueeze(0)
    if pv.dim() == 5:  # anyres
        extra["image_sizes"] = torch.tensor([image.image_size])
    out = model(input_ids=torch.tensor([ids]), pixel_values=pv, use_cache=True, logits_to_keep=1, **extra)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def bench_p1(setup: Setup) -> dict:
    n = setup.p1_tokens
    raw_times, eng_times, itl, ttft = [], [], [], []
    for r in range(setup.repeats + 1):  # the first round warms both paths up and is not counted
        ids, images = one_image_request(setup, 100 + r, n)
        t_raw = in_fresh_thread(raw_loop, setup.model, ids, images[0], n)
        t0, timing = solo_engine_run(setup, GenerationRequest(ids, images, fixed_length(n)))
        t_eng = timing.end - t0
        if r:
            raw_times.append(t_raw)
            eng_times.append(t_eng)
            itl += timing.itl
            ttft.append(timing.ttft)
    raw_tps, eng_tps = n / statistics.median(raw_times), n / statistics.median(eng_times)
    # each engine run is paired with the raw run just before it, so load from other processes cancels out
    ratio = statistics.median(r / e for r, e in zip(raw_times, eng_times))
    return {"tokens": n, "repeats": setup.repeats, "raw_tok_s": raw_tps, "engine_tok_s": eng_tps, "ratio": ratio,
            "itl": percentiles(itl), "ttft": percentiles(ttft)}


# ------------------------------------------------------------------------------------------------------- P2


def baseline_worker(setup: Setup, requests: list[tuple[list[int], list[ProcessedImage]]], n: int) -> float:
    """Original worker design: a thread per request calling model.generate, at most 5 at a time. Wall seconds."""
    gate = threading.Semaphore(BASELINE_CONCURRENCY)
    model = setup.model

    def run(ids, images):
        pv = images[0].pixel_values.unsqueeze(0)
        extra = {"image_sizes": torch.tensor([images[0].image_size])} if pv.dim() == 5 else {}
        with gate, torch.inference_mode():
            model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=setup.tokenizer.pad_token_id, **extra)

    threads = [threading.Thread(target=run, args=r) for r in requests]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def engine_streams(engine: Engine, requests, n: int) -> tuple[float, list[StreamTiming]]:
    """All requests submitted at once and consumed as a worker does: one asyncio loop follows every stream (the
    model worker's HTTP handlers are coroutines of one event loop). Wall seconds and per-stream timings."""

    async def follow(handle, t_submit: float) -> StreamTiming:
        stamps = []
        async for ev in handle:
            if ev.token_id is not None:
                stamps.append(time.perf_counter())
        if not stamps:
            raise RuntimeError(f"request finished without tokens: {handle.result()}")
        return StreamTiming(len(stamps), stamps[0] - t_submit, list(np.diff(stamps)), stamps[-1])

    async def run_all() -> list[StreamTiming]:
        jobs = []
        for ids, images in requests:
            t_submit = time.perf_counter()
            jobs.append(follow(engine.submit(GenerationRequest(ids, images, fixed_length(n))), t_submit))
        return list(await asyncio.gather(*jobs))

    t0 = time.perf_counter()
    timings = asyncio.run(run_all())
    return time.perf_counter() - t0, timings


def bench_p2(setup: Setup, streams=(1, 4, 16)) -> dict:
    n = setup.p2_tokens
    engine = Engine(setup.model, setup.tokenizer, eos_token_ids=setup.eos_ids, max_batch_size=max(streams)).start()
    out = {"tokens_per_stream": n, "streams": {}}
    try:
        warm = [one_image_request(setup, 900 + i, n) for i in range(2)]
        engine_streams(engine, warm, 4)
        baseline_worker(setup, warm[:1], 4)
        for s in streams:
            # fresh images and questions per configuration: no cache carries over from a previous one
            reqs = [one_image_request(setup, 1000 * s + i, n) for i in range(s)]
            wall, timings = engine_streams(engine, reqs, n)
            base_wall = baseline_worker(setup, reqs, n)
            eng_tps, base_tps = s * n / wall, s * n / base_wall
            out["streams"][s] = {
                "engine_tok_s": eng_tps, "baseline_tok_s": base_tps, "ratio": eng_tps / base_tps,
                "ttft": percentiles([t.ttft for t in timings]),
                "itl": percentiles([x for t in timings for x in t.itl]),
            }
    finally:
        engine.shutdown()
    return out


# ------------------------------------------------------------------------------------------------------- P3


def conversation_ttfts(setup: Setup, engine: Engine, replies: list[str] | None, turns: int) -> tuple[list, list]:
    """TTFT per turn of one image conversation; replies are generated (and returned) unless given."""
    img = setup.process(synthetic_image(4242))
    messages: list[dict] = []
    ttfts, got = [], []
    stops = tuple(getattr(setup.template, "stop_strings", ()))
    for k in range(turns):
        content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[k]}] if k == 0 else QUESTIONS[k]
        messages.append({"role": "user", "content": content})
        ids = setup.prompt(messages, [img])
        t0 = time.perf_counter()
        h = engine.submit(GenerationRequest(ids, [img], SamplingParams(max_new_tokens=setup.p3_tokens, stop=stops)))
        first = None
        for ev in h:
            if first is None and ev.token_id is not None:
                first = time.perf_counter() - t0
        reply = h.result().text if replies is None else replies[k]
        ttfts.append(first)
        got.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return ttfts, got


def bench_p3(setup: Setup, turns: int = 8) -> dict:
    cached = Engine(setup.model, setup.tokenizer, eos_token_ids=setup.eos_ids).start()
    uncached = no_cache_engine(setup).start()
    try:
        with no_cache_engine(setup) as warm:
            conversation_ttfts(setup, warm, None, 1)
        with_cache, replies = conversation_ttfts(setup, cached, None, turns)
        without_cache, _ = conversation_ttfts(setup, uncached, replies, turns)
        stats = cached.stats()
    finally:
        cached.shutdown()
        uncached.shutdown()
    return {
        "tokens_per_turn": setup.p3_tokens,
        "ttft_with_cache": with_cache, "ttft_without_cache": without_cache,
        "ratio_turn8_with_cache": with_cache[-1] / with_cache[0],
        "ratio_turn8_without_cache": without_cache[-1] / without_cache[0],
        "prefix_hits": stats.prefix_cache.hits, "reused_tokens": stats.prefix_cache.reused_tokens,
        "image_cache_hits": stats.image_cache.hits,
    }


# ---------------------------------------------------------------------------------------------------- report


def ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def print_report(res: dict) -> None:
    p1, p2, p3, p7, ttft = res["p1"], res["p2"], res["p3"], res["p7"], res["ttft"]
    print(f"\nengine benchmark: model={res['model']} dtype={res['dtype']} quantization={res['quantization']} "
          f"threads={res['threads']} load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f} "
          f"(other processes share the CPU)\n  CPU: {res['cpu']}\n  precision: {res['precision_reason']}\n"
          f"  read bandwidth {res['read_bandwidth_gbs']:.1f} GB/s; LLM weights read per decode step "
          f"{res['decode_weight_bytes'] / 2**20:.0f} MiB; llama.cpp: {res['llamacpp']}")
    print(f"\nP7 single-stream decode, text prompt of {p7['prompt_tokens']} tokens, {p7['tokens']} new tokens")
    print(f"  engine    : {p7['decode_tok_s']:8.1f} tok/s  (TTFT {ms(p7['ttft_text_s'])} ms)")
    if "llamacpp_decode_tok_s" in p7:
        print(f"  llama.cpp : {p7['llamacpp_decode_tok_s']:8.1f} tok/s  (TTFT {ms(p7['llamacpp_ttft_s'])} ms, "
              f"{p7['llamacpp_tokens']:.0f} tokens)   ratio {p7['ratio']:.2f} (median of {p7['repeats']} paired runs)")
    print(f"\nTTFT, image question ({ttft['image_tokens']} image tokens): cold p50 {ms(ttft['cold_p50_s'])} ms; "
          f"{ttft['newcomers']} newcomers together p50/p95 {ms(ttft['newcomers_p50_s'])}/{ms(ttft['newcomers_p95_s'])} ms")
    print(f"\nP1 single stream ({p1['tokens']} tokens)")
    print(f"  raw forward loop : {p1['raw_tok_s']:8.1f} tok/s")
    print(f"  engine           : {p1['engine_tok_s']:8.1f} tok/s   ratio {p1['ratio']:.3f} "
          f"(median of {p1['repeats']} paired runs)")
    print(f"  engine ITL p50/p95 {ms(p1['itl']['p50'])}/{ms(p1['itl']['p95'])} ms, "
          f"TTFT p50/p95 {ms(p1['ttft']['p50'])}/{ms(p1['ttft']['p95'])} ms")
    print(f"\nP2 concurrent streams ({p2['tokens_per_stream']} tokens each)")
    print(f"  {'streams':>7} {'engine tok/s':>13} {'baseline tok/s':>15} {'ratio':>7} {'TTFT p50/p95 ms':>17} "
          f"{'ITL p50/p95 ms':>16}")
    for s, row in p2["streams"].items():
        print(f"  {s:>7} {row['engine_tok_s']:>13.1f} {row['baseline_tok_s']:>15.1f} {row['ratio']:>7.2f} "
              f"{ms(row['ttft']['p50']) + '/' + ms(row['ttft']['p95']):>17} "
              f"{ms(row['itl']['p50']) + '/' + ms(row['itl']['p95']):>16}")
    print(f"\nP3 time to first token per turn (ms), one image conversation")
    print(f"  {'turn':>4} {'with caches':>12} {'without':>9}")
    for k, (a, b) in enumerate(zip(p3["ttft_with_cache"], p3["ttft_without_cache"]), 1):
        print(f"  {k:>4} {ms(a):>12} {ms(b):>9}")
    print(f"  turn8/turn1: with caches {p3['ratio_turn8_with_cache']:.2f}, "
          f"without {p3['ratio_turn8_without_cache']:.2f}; prefix hits {p3['prefix_hits']}, "
          f"reused tokens {p3['reused_tokens']}")


# ---------------------------------------------------------------------------------------------- P7 / TTFT


def text_request(setup: Setup, question: str) -> list[int]:
    return setup.prompt([{"role": "user", "content": question}], [])


def bench_p7(setup: Setup, tokens: int, repeats: int, llamacpp) -> dict:
    """Single-stream decode of the same text prompt: our engine and llama.cpp alternated run by run."""
    from bench import llamacpp as lc

    ids = text_request(setup, lc.PROMPT_QUESTION)
    prompt_text = setup.tokenizer.decode(ids)  # the exact text our template renders, special tokens included
    ours, theirs = [], []
    for r in range(repeats + 1):  # round 0 warms both up
        t0, timing = solo_engine_run(setup, GenerationRequest(ids, [], fixed_length(tokens)))
        mine = {"decode_tok_s": (timing.tokens - 1) / (timing.end - t0 - timing.ttft), "ttft_s": timing.ttft}
        other = in_fresh_thread(llamacpp.run, prompt_text, tokens) if llamacpp else None
        if r:
            ours.append(mine)
            if other:
                theirs.append(other)
    out = {"tokens": tokens, "repeats": repeats, "prompt_tokens": len(ids),
           "decode_tok_s": statistics.median(x["decode_tok_s"] for x in ours),
           "ttft_text_s": statistics.median(x["ttft_s"] for x in ours)}
    if theirs:
        out["llamacpp_decode_tok_s"] = statistics.median(x["decode_tok_s"] for x in theirs)
        out["llamacpp_ttft_s"] = statistics.median(x["ttft_s"] for x in theirs)
        out["llamacpp_tokens"] = statistics.median(x["tokens"] for x in theirs)
        # paired runs: each of ours against the llama.cpp run right after it
        out["ratio"] = statistics.median(a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(ours, theirs))
    return out


def bench_ttft(setup: Setup, cold_runs: int = 8, newcomers: int = 16) -> dict:
    """Cold TTFT of one image question (nothing cached, idle engine) and of `newcomers` arriving together."""
    engine = no_cache_engine(setup, max_batch_size=newcomers).start()
    try:
        one_image_request(setup, 7000, 4)  # warm the preprocessing path
        engine_streams(engine, [one_image_request(setup, 7001, 4)], 2)
        cold = []
        for i in range(cold_runs):
            ids, images = one_image_request(setup, 7100 + i, 8)
            t0 = time.perf_counter()
            cold.append(consume(engine.submit(GenerationRequest(ids, images, fixed_length(2))), t0).ttft)
        reqs = [one_image_request(setup, 7200 + i, 8) for i in range(newcomers)]
        _, timings = engine_streams(engine, reqs, 8)
    finally:
        engine.shutdown()
    return {"image_tokens": reqs[0][1][0].num_tokens, "cold_p50_s": statistics.median(cold),
            "cold_all_s": cold, "newcomers": newcomers,
            "newcomers_p50_s": float(np.percentile([t.ttft for t in timings], 50)),
            "newcomers_p95_s": float(np.percentile([t.ttft for t in timings], 95))}


def read_bandwidth_gbs(mib: int = 512) -> float:
    """Memory read bandwidth with torch's threads: the best of 5 sums of a buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_weight_bytes(model) -> int:
    """Bytes of LLM weights one decode step reads: quantized buffers (not their prefill copies) or parameters,
    plus the LM head (the whole embedding matrix when tied)."""
    from llava.quant import QuantLinear

    llm, head = model.model.language_model, model.get_output_embeddings()
    total = 0
    quantized_params = set()
    for module in [*llm.modules(), head]:
        if isinstance(module, QuantLinear):
            dense = 0 if module.dense is None else module.dense.numel() * module.dense.element_size()
            total += module.nbytes - dense
            quantized_params.update(id(b) for b in module.buffers())
    embed = model.get_input_embeddings().weight
    for p in llm.parameters():
        if p is not embed and id(p) not in quantized_params:
            total += p.numel() * p.element_size()
    if not isinstance(head, QuantLinear):
        total += head.weight.numel() * head.weight.element_size()
    return total


def cpu_flags() -> str:
    from llava.hardware import cpu_info

    return cpu_info().summary()


def load_llamacpp(threads: int, skip: bool) -> tuple[object | None, str]:
    from bench import llamacpp as lc

    if skip:
        return None, "skipped (--no-llamacpp)"
    if not lc.available():
        return None, "not installed: `make bench` (or pip install -e '.[bench]') builds llama-cpp-python"
    try:
        probe = lc.probe(threads)
        handle = lc.LlamaCpp(threads, extra_buffers=probe["extra_buffers"])
    except (RuntimeError, FileNotFoundError, OSError, subprocess.SubprocessError) as e:
        return None, f"could not run: {e}"
    note = "default settings" if probe["extra_buffers"] else f"without extra buffer types ({probe['note']})"
    import llama_cpp

    return handle, f"llama-cpp-python {llama_cpp.__version__}, {note}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small random model instead of the embedded default")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 with --quick, torch's default otherwise)")
    ap.add_argument("--dtype", default="auto", help="dtype of the default model (default: auto, as a worker)")
    ap.add_argument("--quantization", default="auto", help="auto | none | int8 | int4 (default: auto, as a worker)")
    ap.add_argument("--no-llamacpp", action="store_true", help="do not run llama.cpp side by side")
    ap.add_argument("--p7-repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/engine-<mode>.json)")
    args = ap.parse_args(argv)
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    torch.set_num_threads(threads)
    setup = quick_setup() if args.quick else default_setup(args.dtype, args.quantization)
    t0 = time.perf_counter()
    res = {"mode": "quick" if args.quick else "full", "model": setup.name, "threads": threads, "cpu": cpu_flags(),
           "dtype": str(next(setup.model.parameters()).dtype).removeprefix("torch."),
           "quantization": setup.quantization, "precision_reason": setup.precision_reason,
           "load_avg_start": os.getloadavg()[0]}
    llamacpp, res["llamacpp"] = (None, "not run with --quick") if args.quick else load_llamacpp(threads, args.no_llamacpp)
    # as a worker: the main thread (which loaded the model) leaves OpenMP to the engine thread; the raw loop and
    # llama.cpp run in threads of their own (in_fresh_thread)
    res["main_thread_off_openmp"] = single_openmp_thread(release=True)
    res["read_bandwidth_gbs"] = in_fresh_thread(read_bandwidth_gbs)
    res["decode_weight_bytes"] = decode_weight_bytes(setup.model)
    res["p1"] = bench_p1(setup)
    res["p7"] = bench_p7(setup, setup.p1_tokens, args.p7_repeats, llamacpp)
    res["p2"] = bench_p2(setup)
    res["ttft"] = bench_ttft(setup)
    res["p3"] = bench_p3(setup)
    res["seconds"] = time.perf_counter() - t0
    res["load_avg_end"] = os.getloadavg()[0]
    print_report(res)
    out = args.out or RESULTS_DIR / f"engine-{res['mode']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    p7, agg16 = res["p7"], res["p2"]["streams"][16]["engine_tok_s"]
    llama = p7.get("llamacpp_decode_tok_s")
    summary = {
        "mode": res["mode"], "model": setup.name, "cpu": res["cpu"], "threads": threads,
        "dtype": res["dtype"], "quantization": res["quantization"],
        "p1_ratio": round(res["p1"]["ratio"], 3),
        "p2_ratio_16": round(res["p2"]["streams"][16]["ratio"], 3),
        "p3_ttft_ratio_turn8": round(res["p3"]["ratio_turn8_with_cache"], 3),
        "p1_engine_tok_s": round(res["p1"]["engine_tok_s"], 1),
        "p2_engine_tok_s_16": round(agg16, 1),
        "decode_tok_s": round(p7["decode_tok_s"], 1),
        "llamacpp_decode_tok_s": None if llama is None else round(llama, 1),
        "p7_decode_vs_llamacpp": None if llama is None else round(p7["ratio"], 3),
        "p8_agg16_vs_llamacpp": None if llama is None else round(agg16 / llama, 2),
        "ttft_cold_p50_s": round(res["ttft"]["cold_p50_s"], 3),
        "ttft_16_newcomers_p95_s": round(res["ttft"]["newcomers_p95_s"], 3),
        "roofline_fraction": round(res["decode_weight_bytes"] * p7["decode_tok_s"] / (res["read_bandwidth_gbs"] * 1e9), 3),
        "seconds": round(res["seconds"], 1),
    }
    print(f"\nwrote {out}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
