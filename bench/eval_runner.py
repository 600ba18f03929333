"""Questions/s of `python -m llava.eval.model_vqa_loader` (engine-backed) against the original runner's design —
one question at a time through `model.generate` — on the same model, questions and greedy settings
(`python -m bench.eval_runner [--limit 128]`).

Both sides use one loaded default model at the worker's precision and answer easy-VQA test questions (images
shared between questions, as in real question files); the times cover answering (image loading and processing
included), not loading the model. Also counts how many answers agree.
Prints a summary and writes bench/results/eval_runner.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import RESULTS_DIR, cpu_flags
from llava.eval import model_vqa_loader
from llava.images import load_image
from llava.loading import load_model
from llava.templates import get_template, render, stop_token_ids
from train.evaluate import easyvqa_items

MAX_NEW = 8
CONV = "chatml_direct"


def one_at_a_time(lm, items) -> tuple[float, list[str]]:
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
    t0 = time.perf_counter()
    model_vqa_loader.main(["--model-path", "default", "--question-file", str(qfile), "--answers-file", str(answers),
                           "--conv-mode", CONV, "--temperature", "0", "--max_new_tokens", str(MAX_NEW)], loaded=lm)
    seconds = time.perf_counter() - t0
    return seconds, [json.loads(line)["text"] for line in answers.read_text().splitlines()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.eval_runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=128)
    args = ap.parse_args(argv)
    items = easyvqa_items(args.limit, seed=1)
    lm = load_model("default", quantization="auto")
    with tempfile.TemporaryDirectory() as tmp:
        ours_s, ours = engine_runner(lm, items, Path(tmp))
    base_s, base = one_at_a_time(lm, items)
    n = len(items)
    res = {"cpu": cpu_flags(), "threads": torch.get_num_threads(), "questions": n, "max_new_tokens": MAX_NEW,
           "engine_runner_q_s": n / ours_s, "one_at_a_time_q_s": n / base_s, "ratio": base_s / ours_s,
           "answers_agree": sum(a == b for a, b in zip(ours, base))}
    print(f"eval runner, default model, {n} easy-VQA questions, {res['cpu']}, {res['threads']} threads")
    print(f"  llava.eval.model_vqa_loader (engine): {res['engine_runner_q_s']:.2f} questions/s")
    print(f"  one question at a time (generate):    {res['one_at_a_time_q_s']:.2f} questions/s")
    print(f"  ratio {res['ratio']:.2f}; answers agreeing {res['answers_agree']}/{n}")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "eval_runner.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    return res


if __name__ == "__main__":
    main()
