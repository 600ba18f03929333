"""The quality gate of each CPU precision on the embedded default model (`python -m bench.precision`).

For float32, bfloat16, int8 and int4 (the LLM's linear layers; vision encoder and projector in the compute dtype),
answers the same seeded 1,000 easy-VQA test questions through the serving engine and reports accuracy, the gap to
float32 in points, LLM weight memory and the wall time. A precision passes when it is within `--gate` points
(0.5) of float32. Writes bench/results/precision.json; the last line is a JSON summary. The default model records
the fastest passing quantization in assets/default/precision.json (`--record`), which `--quantization auto` serves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llava.hardware import cpu_info
from llava.loading import load_model
from train import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("float32", "int4")]


def llm_weight_bytes(lm) -> int:
    """Bytes of the LLM's weights as served: quantized buffers (without prefill copies) or parameters."""
    if lm.quant_report:
        dense_other = sum(p.numel() * p.element_size() for n, p in lm.model.model.language_model.named_parameters())
        return lm.quant_report["quantized_bytes"] + dense_other
    llm = lm.model.model.language_model
    head = lm.model.get_output_embeddings().weight
    tied = head is lm.model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in llm.parameters()) + (0 if tied else head.numel() * head.element_size())


def run_one(dtype: str, quantization: str, items, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    lm = load_model("default", dtype=dtype, quantization=quantization)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = evaluate.EngineAnswerer(lm, max_new_tokens, 16)(items, progress=False)
    seconds = time.perf_counter() - t0
    scored = evaluate.score(items, answers)
    return {
        "dtype": dtype, "quantization": quantization, "accuracy": scored["accuracy"], "n": scored["n"],
        "per_type": {t: v["accuracy"] for t, v in scored["per_type"].items()},
        "llm_weight_bytes": llm_weight_bytes(lm),
        "prefill_copy_bytes": lm.quant_report.get("prefill_copy_bytes", 0), "kernel": lm.quant_report.get("kernel"),
        "load_seconds": load_s, "answer_seconds": seconds, "answers": answers,
    }


CARD_HEADING = "## Serving precision"


def write_card_section(card: Path, res: dict, chosen: str | None) -> None:
    """The model card's precision table (replacing the previous one): what `--quantization auto` serves and why."""
    lines = [CARD_HEADING, "",
             f"`python -m bench.precision --record`: {res['benchmark']}, gate {res['gate_points']} points below "
             f"float32, on {res['cpu']}. `--quantization auto` serves **{chosen or 'none'}** on CPU.", "",
             "| dtype / quantization | accuracy | gap (points) | passes | LLM weights (MiB) | answers differing |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} / {r['quantization']} | {r['accuracy']:.3f} | {r['gap_points']:.1f} | "
                     f"{'yes' if r['passes'] else 'no'} | {r['llm_weight_bytes'] / 2**20:.0f} | "
                     f"{r['answers_differing_from_float32']} |")
    text = card.read_text()
    start = text.find(CARD_HEADING)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start].rstrip() + ("\n\n" + text[end + 1:] if end >= 0 else "")
    card.write_text(text.rstrip() + "\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--gate", type=float, default=0.5, help="allowed accuracy drop vs float32, in points")
    ap.add_argument("--only", nargs="*", default=None, help="subset like float32:none float32:int4")
    ap.add_argument("--record", action="store_true", help="write assets/default/precision.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    items = evaluate.easyvqa_items(args.limit, seed=0)
    wanted = [tuple(x.split(":")) for x in args.only] if args.only else PRECISIONS
    if ("float32", "none") not in wanted:
        wanted = [("float32", "none"), *wanted]
    rows = [run_one(d, q, items, 8) for d, q in wanted]
    base = rows[0]
    for r in rows:
        r["gap_points"] = round(100 * (base["accuracy"] - r["accuracy"]), 2)
        r["passes"] = r["gap_points"] <= args.gate
        r["answers_differing_from_float32"] = sum(a != b for a, b in zip(r["answers"], base["answers"]))
    for r in rows:
        del r["answers"]
    res = {"benchmark": f"easy-VQA test, {args.limit} seeded questions", "gate_points": args.gate,
           "cpu": cpu_info().summary(), "threads": torch.get_num_threads(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nquality gate on the default model ({res['benchmark']}), CPU {res['cpu']}")
    print(f"  {'precision':<18} {'accuracy':>8} {'gap pt':>7} {'passes':>6} {'LLM MB':>7} {'answer s':>8}")
    for r in rows:
        name = f"{r['dtype']}/{r['quantization']}"
        print(f"  {name:<18} {r['accuracy']:>8.4f} {r['gap_points']:>7.2f} {str(r['passes']):>6} "
              f"{r['llm_weight_bytes'] / 2**20:>7.0f} {r['answer_seconds']:>8.1f}")
    if args.record:
        from llava.default import assets_dir

        record = {"gate_points": args.gate, "benchmark": res["benchmark"], "cpu": res["cpu"],
                  "float32_accuracy": base["accuracy"],
                  "results": {f"{r['dtype']}/{r['quantization']}": {"accuracy": r["accuracy"], "passes": r["passes"]}
                              for r in rows}}
        passing = [r["quantization"] for r in rows if r["passes"] and r["quantization"] in ("int4", "int8")]
        record["cpu_quantization"] = "int4" if "int4" in passing else "int8" if "int8" in passing else None
        (assets_dir() / "precision.json").write_text(json.dumps(record, indent=2) + "\n")
        write_card_section(assets_dir() / "MODEL_CARD.md", res, record["cpu_quantization"])
    summary = {r["dtype"] + "/" + r["quantization"]: round(r["accuracy"], 4) for r in rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
