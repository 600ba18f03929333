"""`python -m llava.eval.eval_science_qa --base-dir DIR --result-file A.jsonl --output-file O.json
--output-result R.json [--split test]`: the original's ScienceQA scorer. DIR holds problems.json and
pid_splits.json; a problem without an answer counts as FAILED."""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.files import SCORER_ERRORS, main_entry, read_json, read_jsonl
from llava.eval.scoring import OPTIONS, science_answer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="ScienceQA accuracy (all and with image)")
    p.add_argument("--base-dir", type=str, required=True)
    p.add_argument("--result-file", type=str, required=True)
    p.add_argument("--output-file", type=str, required=True)
    p.add_argument("--output-result", type=str, required=True)
    p.add_argument("--split", type=str, default="test")
    args = p.parse_args(argv)
    split = read_json(os.path.join(args.base_dir, "pid_splits.json"))[args.split]
    problems = read_json(os.path.join(args.base_dir, "problems.json"))
    predictions = {r["question_id"]: r for r in read_jsonl(args.result_file)}
    results = {"correct": [], "incorrect": []}
    sqa = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    for pid in split:
        prob = problems[pid]
        pred = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        text = pred["text"].replace("\n", ". ")
        options = OPTIONS[: len(prob["choices"])]
        answer = science_answer(pred["text"], options)
        idx = options.index(answer) if answer in options else -1
        row = {"question_id": pid, "parsed_ans": answer, "ground_truth": OPTIONS[prob["answer"]],
               "question": pred["prompt"], "pred": text, "is_multimodal": "<image>" in pred["prompt"]}
        results["correct" if idx == prob["answer"] else "incorrect"].append(row)
        sqa["results"][pid], sqa["outputs"][pid] = idx, text
    correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
    img_correct = sum(r["is_multimodal"] for r in results["correct"])
    img_total = img_correct + sum(r["is_multimodal"] for r in results["incorrect"])
    acc = 100 * correct / total if total else 0.0
    img_acc = 100 * img_correct / img_total if img_total else 0.0
    print(f"Total: {total}, Correct: {correct}, Accuracy: {acc:.2f}%, IMG-Accuracy: {img_acc:.2f}%")
    sqa.update(acc=acc, correct=correct, count=total)
    with open(args.output_file, "w") as f:
        json.dump(results, f, indent=2)
    with open(args.output_result, "w") as f:
        json.dump(sqa, f, indent=2)
    return {"acc": acc, "img_acc": img_acc, "correct": correct, "count": total}


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
