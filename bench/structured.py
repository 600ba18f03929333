"""Throughput of JSON-schema-constrained decoding against unconstrained decoding (`python -m bench.structured`).

The default model (at the worker's precision) answers image questions with 1 and 16 streams: constrained under a
schema (an object with an array of 12 small objects, enums and bounded integers, so every reply has a similar
length), and unconstrained for exactly the mean number of tokens the constrained replies had. Runs alternate
(constrained, unconstrained, constrained, ...), best of `--repeats`; the ratio is constrained / unconstrained
tokens/s. Every constrained reply is parsed and checked. Prints a table and a one-line JSON summary; writes
bench/results/structured.json. --quick uses the small random model of `bench.engine --quick`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.engine import RESULTS_DIR, Setup, cpu_flags, default_setup, engine_streams, one_image_request, quick_setup
from llava.engine import Engine, GenerationRequest, SamplingParams
from llava.structured import Constraint

SCHEMA = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array", "minItems": 12, "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {"color": {"enum": ["red", "green", "blue", "yellow"]},
                               "shape": {"enum": ["circle", "square", "triangle"]},
                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["color", "shape", "count"], "additionalProperties": False,
            },
        },
    },
    "required": ["objects"], "additionalProperties": False,
}


def run(engine: Engine, requests, params: SamplingParams) -> tuple[float, list]:
    """Wall seconds and results of all requests submitted together."""
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(ids, images, params)) for ids, images in requests]
    results = [h.result(timeout=1800) for h in handles]
    return time.perf_counter() - t0, results


def bench(setup: Setup, streams=(1, 16), repeats: int = 2) -> dict:
    engine = Engine(setup.model, setup.tokenizer, eos_token_ids=setup.eos_ids, max_batch_size=max(streams)).start()
    constrained = SamplingParams(max_new_tokens=1500, constraint=Constraint("json_schema", SCHEMA))
    out = {}
    try:
        run(engine, [one_image_request(setup, 7000, 8)], constrained)  # builds llguidance's token table
        for s in streams:
            reqs = [one_image_request(setup, 100 * s + i, 8) for i in range(s)]
            engine_streams(engine, reqs, 4)  # encodes the images: both sides then start from cached features
            best_c = best_u = 0.0
            lengths: list[int] = []
            for _ in range(repeats):
                wall, results = run(engine, reqs, constrained)
                for r in results:
                    assert r.finish_reason == "stop", r.text
                    value = json.loads(r.text)  # raises if a reply does not parse
                    assert len(value["objects"]) == 12, r.text
                lengths = [r.completion_tokens for r in results]
                best_c = max(best_c, sum(lengths) / wall)
                n = round(sum(lengths) / len(lengths))
                wall_u, _ = run(engine, reqs, SamplingParams(max_new_tokens=n, ignore_eos=True))
                best_u = max(best_u, s * n / wall_u)
            out[s] = {"constrained_tok_s": best_c, "unconstrained_tok_s": best_u, "ratio": best_c / best_u,
                      "mean_tokens": sum(lengths) / len(lengths)}
    finally:
        engine.shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small random model instead of the embedded default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = quick_setup() if args.quick else default_setup()
    result = bench(setup, repeats=args.repeats)
    summary = {"model": setup.name, "cpu": cpu_flags(), "threads": torch.get_num_threads(),
               "precision": setup.precision_reason, "streams": result}
    print(f"structured output (JSON schema) vs unconstrained, {setup.name}, {summary['cpu']}, "
          f"{summary['threads']} threads")
    print("  streams  constrained tok/s  unconstrained tok/s  ratio  tokens/reply")
    for s, r in result.items():
        print(f"  {s:7d}  {r['constrained_tok_s']:17.1f}  {r['unconstrained_tok_s']:19.1f}  {r['ratio']:5.2f}  "
              f"{r['mean_tokens']:12.0f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"structured{'-quick' if args.quick else ''}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"model": setup.name, "cpu": summary["cpu"],
                      **{f"ratio_{s}": round(r["ratio"], 3) for s, r in result.items()}}))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
