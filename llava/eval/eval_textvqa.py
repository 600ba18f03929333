"""`python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file A.jsonl`
(or `--result-dir DIR`, every .jsonl in it): the original's TextVQA scorer. Each answer is paired with the
annotation of the same image (its question_id) and question (found again in its prompt); the figure is the VQA soft
accuracy with the official normalisation (llava.eval.m4c_evaluator)."""

from __future__ import annotations

import argparse
import os

from llava.eval.files import SCORER_ERRORS, main_entry, read_json, read_jsonl
from llava.eval.m4c_evaluator import vqa_accuracy
from llava.eval.scoring import textvqa_question


def score_file(annotation_file: str, result_file: str) -> float:
    """Accuracy in percent of one answers file."""
    annotations = {(a["image_id"], a["question"].lower()): a for a in read_json(annotation_file)["data"]}
    pairs = []
    for r in read_jsonl(result_file):
        key = (r["question_id"], textvqa_question(r["prompt"]))
        if key not in annotations:
            raise ValueError(f"{result_file}: no annotation for image {key[0]!r} with question {key[1]!r}")
        pairs.append((r["text"], annotations[key]["answers"]))
    accuracy = 100 * vqa_accuracy(pairs)
    print(os.path.splitext(os.path.basename(result_file))[0])
    print(f"Samples: {len(pairs)}\nAccuracy: {accuracy:.2f}%\n")
    return accuracy


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="TextVQA accuracy (VQA soft score)")
    p.add_argument("--annotation-file", type=str, required=True)
    p.add_argument("--result-file", type=str)
    p.add_argument("--result-dir", type=str)
    args = p.parse_args(argv)
    files = [args.result_file] if args.result_file else []
    if args.result_dir:
        files += [os.path.join(args.result_dir, n) for n in sorted(os.listdir(args.result_dir)) if n.endswith(".jsonl")]
    if not files:
        p.error("give --result-file or --result-dir")
    return {f: score_file(args.annotation_file, f) for f in files}


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
