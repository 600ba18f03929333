"""Throughput of one running batch mixing 4 LoRA adapters against the same batch on one adapter
(`python -m bench.adapters`).

The default model (at the worker's precision) serves 16 image questions at once, 64 tokens each (ignore_eos, so
every run decodes the same number of tokens): all on adapter 0 ("one adapter"), spread over adapters 0-3 (4 each,
"four adapters"), and on the bare base for reference. Adapters are rank-16 LoRA on all seven projections of every
layer (random weights written as PEFT folders: the cost does not depend on the values). Runs alternate (one, four,
base, one, ...), best of `--repeats`; images are encoded before timing. Prints a table and a one-line JSON summary
with the CPU flags; writes bench/results/adapters.json. --quick uses the small random model of `bench.engine`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.engine import RESULTS_DIR, Setup, cpu_flags, default_setup, engine_streams, one_image_request, quick_setup
from llava.adapters import PROJECTIONS, read_adapter
from llava.engine import Engine, GenerationRequest, SamplingParams

RANK = 16
STREAMS = 16
TOKENS = 64


def write_adapter(model, folder: Path, seed: int, rank: int = RANK) -> Path:
    """A PEFT-format LoRA folder with random weights on every projection of every LLM layer."""
    cfg = model.config.get_text_config(decoder=True)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for proj in PROJECTIONS:
            fan_in, fan_out = dims[proj]
            part = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            key = f"base_model.model.model.language_model.layers.{layer}.{part}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS), "bias": "none"}))
    return folder


def run(engine: Engine, requests, adapters: list[str | None]) -> float:
    """Tokens/s of all requests submitted together (wall time, prefill included: the same prompts every run)."""
    params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(ids, images, params, adapter=a))
               for (ids, images), a in zip(requests, adapters)]
    tokens = sum(h.result(timeout=1800).completion_tokens for h in handles)
    return tokens / (time.perf_counter() - t0)


def bench(setup: Setup, repeats: int) -> dict:
    engine = Engine(setup.model, setup.tokenizer, eos_token_ids=setup.eos_ids, max_batch_size=STREAMS,
                    prefix_cache_tokens=0).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(4):
                folder = write_adapter(setup.model, Path(tmp) / f"a{i}", seed=i)
                engine.load_adapter(read_adapter(folder, setup.model, f"a{i}"))
        reqs = [one_image_request(setup, 300 + i, 8) for i in range(STREAMS)]
        engine_streams(engine, reqs, 4)  # encodes the images and warms every path
        scenarios = {"one adapter": ["a0"] * STREAMS, "four adapters": [f"a{i % 4}" for i in range(STREAMS)],
                     "base (no adapter)": [None] * STREAMS}
        best = {name: 0.0 for name in scenarios}
        for _ in range(repeats):
            for name, adapters in scenarios.items():
                best[name] = max(best[name], run(engine, reqs, adapters))
    finally:
        engine.shutdown()
    return {"tok_s": best, "ratio_four_vs_one": best["four adapters"] / best["one adapter"],
            "ratio_one_vs_base": best["one adapter"] / best["base (no adapter)"], "runner": engine.runner_name}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small random model instead of the embedded default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = quick_setup() if args.quick else default_setup()
    result = bench(setup, args.repeats)
    summary = {"model": setup.name, "cpu": cpu_flags(), "threads": torch.get_num_threads(),
               "precision": setup.precision_reason, "streams": STREAMS, "tokens_per_stream": TOKENS, "rank": RANK,
               **result}
    print(f"LoRA adapters in one batch, {setup.name}, {STREAMS} streams x {TOKENS} tokens, rank {RANK}, "
          f"{summary['cpu']}, {summary['threads']} threads")
    for name, v in result["tok_s"].items():
        print(f"  {name:18s} {v:8.1f} tok/s")
    print(f"  four adapters / one adapter: {result['ratio_four_vs_one']:.2f}   "
          f"one adapter / base: {result['ratio_one_vs_base']:.2f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"adapters{'-quick' if args.quick else ''}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"model": setup.name, "cpu": summary["cpu"],
                      "ratio_four_vs_one": round(result["ratio_four_vs_one"], 3)}))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
