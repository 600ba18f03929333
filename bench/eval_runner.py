"""Questions/s of `python -m llava.eval.model_vqa_loader` (engine-backed) against what users run instead — the
original runner's loop, one question at a time through transformers' `model.generate` — on the same questions and
greedy settings (`python -m bench.eval_runner [--limit 160] [--set images|random]`).

- Questions: `--set images` (default) takes every easy-VQA test question of seeded images, grouped by image as real
  question files are (POPE asks 6 questions per image, MME 2, VQAv2 ~5, easy-VQA ~10); `--set random` a seeded
  random sample (few shared images).
- The loop: the default model's dense weights (the original has no CPU quantization), each question's image loaded,
  processed and generated alone; timed in float32 and at `--dtype auto`'s choice (bf16 where the CPU has it), the
  faster of the two being the baseline (transformers' bf16 path is not always the faster one on a CPU).
- Ours: the runner at its defaults (`--dtype auto --quantization auto`, the worker's choice), and the runner on the
  loop's dense model (the same weights: batching and prefix reuse alone).
- Times cover answering (image loading and processing included), not loading the model (load times are recorded
  separately). Also counts answers agreeing with the loop's, and records the CPU flags and the load average (the
  machine is shared).
Prints a summary and writes bench/results/eval_runner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import RESULTS_DIR, cpu_flags
from llava.eval import model_vqa_loader
from llava.images import load_image
from llava.loading import load_model
from llava.templates import get_template, render, stop_token_ids
from train import easyvqa
from train.evaluate import Item, easyvqa_items

MAX_NEW = 8
CONV = "chatml_direct"


def image_items(limit: int, seed: int) -> list[Item]:
    """All questions of seeded test images, image after image, until `limit` questions."""
    groups = list(easyvqa.by_image(easyvqa.questions("test")).values())
    random.Random(seed).shuffle(groups)
    items: list[Item] = []
    for qs in groups:
        items += [Item(q.qid, q.image, easyvqa.prompt(q.text), q.answer, q.type) for q in qs]
        if len(items) >= limit:
            break
    return items[:limit]


def one_at_a_time(lm, items) -> tuple[float, list[str]]:
    """The original's loop: per question, load and process the image, generate greedily, decode."""
    t0 = time.perf_counter()
    template = get_template(CONV)
    stops = stop_token_ids(template, lm.tokenizer)
    texts = []
    for it in items:
        im = lm.process_images([load_image(it.image)])[0]
        ids = render([{"role": "user", "content": "<image>\n" + it.prompt}], template, lm.tokenizer,
                     image_token_counts=[im.num_tokens], add_generation_prompt=True).input_ids
        with torch.inference_mode():
            out = lm.model.generate(input_ids=torch.tensor([ids]), pixel_values=im.pixel_values[None].to(lm.dtype),
                                    max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        texts.append(lm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return time.perf_counter() - t0, texts


def engine_runner(lm, items, workdir: Path) -> tuple[float, list[str]]:
    qfile, answers = workdir / "q.jsonl", workdir / "a.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "image": str(it.image), "text": it.prompt}) + "\n"
                             for i, it in enumerate(items)))
    if answers.exists():
        answers.unlink()
    t0 = time.perf_counter()
    model_vqa_loader.main(["--model-path", "default", "--question-file", str(qfile), "--answers-file", str(answers),
                           "--conv-mode", CONV, "--temperature", "0", "--max_new_tokens", str(MAX_NEW)], loaded=lm)
    seconds = time.perf_counter() - t0
    return seconds, [json.loads(line)["text"] for line in answers.read_text().splitlines()]


def timed_load(**kwargs):
    t0 = time.perf_counter()
    lm = load_model("default", **kwargs)
    return lm, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.eval_runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=160)
    ap.add_argument("--set", choices=["images", "random"], default="images")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "eval_runner.json")
    ap.add_argument("--skip-defaults", action="store_true",
                    help="leave out the runner at its defaults (loading int4 weights takes minutes on a busy CPU)")
    args = ap.parse_args(argv)
    items = image_items(args.limit, args.seed) if args.set == "images" else easyvqa_items(args.limit, args.seed)
    n = len(items)
    load_before = os.getloadavg()
    dense, dense_load_s = timed_load(dtype="auto", quantization="none")
    fp32, _ = timed_load(dtype="float32", quantization="none")
    auto, auto_load_s = (None, 0.0) if args.skip_defaults else timed_load(dtype="auto", quantization="auto")
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours = engine_runner(auto, items, Path(tmp)) if auto is not None else (None, [])
        ours_dense_s, ours_dense = engine_runner(dense, items, Path(tmp))
    loops = {}
    for lm in (fp32, dense) if dense.dtype != fp32.dtype else (fp32,):
        seconds, texts = one_at_a_time(lm, items)
        loops[str(lm.dtype).removeprefix("torch.")] = (seconds, texts)
    base_dtype = min(loops, key=lambda k: loops[k][0])
    base_s, base = loops[base_dtype]
    precision = lambda lm: f"{str(lm.dtype).removeprefix('torch.')}/{lm.quantization or 'none'}"  # noqa: E731
    res = {
        "cpu": cpu_flags(), "threads": torch.get_num_threads(), "load_average_1_5_15": [
            [round(x, 1) for x in load_before], [round(x, 1) for x in os.getloadavg()]],
        "questions": n, "set": args.set, "images": len({it.image for it in items}), "max_new_tokens": MAX_NEW,
        "one_at_a_time": {"precision": f"{base_dtype}/none", "q_s": n / base_s, "load_s": dense_load_s,
                          "q_s_by_dtype": {k: n / v[0] for k, v in loops.items()}},
        "runner_default": None if auto is None else {
            "precision": precision(auto), "q_s": n / ours_s, "load_s": auto_load_s,
            "answers_agree": sum(a == b for a, b in zip(ours, base))},
        "runner_dense": {"precision": precision(dense), "q_s": n / ours_dense_s,
                         "answers_agree": sum(a == b for a, b in zip(ours_dense, base))},
    }
    res["ratio"] = res["runner_default"]["q_s"] / res["one_at_a_time"]["q_s"] if auto is not None else None
    res["ratio_dense"] = res["runner_dense"]["q_s"] / res["one_at_a_time"]["q_s"]
    print(f"eval runner, default model, {n} easy-VQA questions on {res['images']} images ({args.set}), "
          f"{res['cpu']}, {res['threads']} threads, load average {res['load_average_1_5_15']}")
    for dtype, q_s in res["one_at_a_time"]["q_s_by_dtype"].items():
        print(f"  one question at a time (generate, {dtype}): {q_s:.2f} questions/s"
              + (" <- baseline" if dtype == base_dtype else ""))
    for key, name in (("runner_default", "llava.eval.model_vqa_loader, defaults"),
                      ("runner_dense", "llava.eval.model_vqa_loader, loop's weights")):
        r = res[key]
        if r is None:
            continue
        print(f"  {name} ({r['precision']}): {r['q_s']:.2f} questions/s, "
              f"{r['q_s'] / res['one_at_a_time']['q_s']:.2f}x; answers agreeing {r['answers_agree']}/{n}")
    print(f"  load: dense {dense_load_s:.0f} s, defaults {auto_load_s:.0f} s")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
