"""The README's benchmark table from result files (`python -m bench.table bench/results/engine-full*.json`).

One column per result file (each names the CPU flags, dtype and quantization it ran with), one row per figure the
engine benchmark reports; the targets are issue 16's. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = (  # (label, path into the result JSON, format, target)
    ("decode tok/s, 1 stream (ours)", ("p7", "decode_tok_s"), "{:.1f}", ""),
    ("decode tok/s, 1 stream (llama.cpp, Q4_1 GGUF)", ("p7", "llamacpp_decode_tok_s"), "{:.1f}", ""),
    ("P7 decode vs llama.cpp", ("p7", "ratio"), "{:.2f}x", ">= 1.2x"),
    ("tok/s, 16 image streams (ours)", ("p2", "streams", "16", "engine_tok_s"), "{:.0f}", ""),
    ("P8 16 streams vs llama.cpp single stream", ("p8",), "{:.2f}x", ">= 5x"),
    ("P2 16 streams vs the original worker design", ("p2", "streams", "16", "ratio"), "{:.1f}x", ">= 6x"),
    ("P1 engine vs raw forward loop", ("p1", "ratio"), "{:.2f}x", ">= 0.95"),
    ("TTFT, 1 image question, cold (p50)", ("ttft", "cold_p50_s"), "{:.3f} s", "<= 0.15 s"),
    ("TTFT, 16 newcomers with distinct images (p95)", ("ttft", "newcomers_p95_s"), "{:.2f} s", "<= 1.5 s"),
    ("P3 TTFT turn 8 / turn 1, with caches", ("p3", "ratio_turn8_with_cache"), "{:.2f}", "<= 0.6"),
    ("roofline fraction (decode)", ("roofline_fraction",), "{:.2f}", ""),
)


def _get(result: dict, path: tuple[str, ...]):
    if path == ("p8",):
        p7, p2 = result.get("p7") or {}, result.get("p2") or {}
        agg, single = p2.get("streams", {}).get("16", {}).get("engine_tok_s"), p7.get("llamacpp_decode_tok_s")
        return agg / single if agg and single else None
    if path == ("roofline_fraction",):
        steps, nbytes, bw = _get(result, ("p7", "decode_tok_s")), result.get("decode_weight_bytes"), result.get(
            "read_bandwidth_gbs")
        return steps * nbytes / (bw * 1e9) if steps and nbytes and bw else None
    value = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def table(results: list[dict]) -> str:
    head = ["", *(f"{r['cpu'].split('[', 1)[-1].rstrip(']')}<br>{r['dtype']} + {r['quantization']}" for r in results),
            "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, path, fmt, target in ROWS:
        cells = [fmt.format(v) if (v := _get(r, path)) is not None else "-" for r in results]
        lines.append("| " + " | ".join([label, *cells, target]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args(argv)
    print(table([json.loads(f.read_text()) for f in args.results]))


if __name__ == "__main__":
    main()
