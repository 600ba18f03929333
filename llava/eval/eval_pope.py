"""`python -m llava.eval.eval_pope --annotation-dir DIR --question-file Q.jsonl --result-file A.jsonl`: the
original's POPE scorer. DIR holds coco_pope_<category>.json label files (JSONL with `label`); each category's
answers (by the question file's `category`, in answer-file order) are paired with its labels in order."""

from __future__ import annotations

import argparse
import os

from llava.eval.files import SCORER_ERRORS, main_entry, read_jsonl
from llava.eval.scoring import pope_scores


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="POPE scores (accuracy, precision, recall, F1, yes ratio) per category")
    p.add_argument("--annotation-dir", type=str, required=True)
    p.add_argument("--question-file", type=str, required=True)
    p.add_argument("--result-file", type=str, required=True)
    args = p.parse_args(argv)
    category_of = {q["question_id"]: q["category"] for q in read_jsonl(args.question_file)}
    answers = read_jsonl(args.result_file)
    out = {}
    for name in sorted(os.listdir(args.annotation_dir)):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            raise SystemExit(f"{args.annotation_dir}: {name} is not a coco_pope_<category>.json label file")
        category = name[len("coco_pope_"):-len(".json")]
        labels = [row["label"] for row in read_jsonl(os.path.join(args.annotation_dir, name))]
        texts = [a["text"] for a in answers if category_of.get(a["question_id"]) == category]
        s = pope_scores(texts, labels)
        out[category] = s
        print(f"Category: {category}, # samples: {len(texts)}")
        print("TP\tFP\tTN\tFN\t")
        print(f"{s['TP']}\t{s['FP']}\t{s['TN']}\t{s['FN']}")
        for key, label in (("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"),
                           ("f1", "F1 score"), ("yes_ratio", "Yes ratio")):
            print(f"{label}: {s[key]}")
        print("%.3f, %.3f, %.3f, %.3f, %.3f" % (s["f1"], s["accuracy"], s["precision"], s["recall"], s["yes_ratio"]))
        print("====================================")
    return out


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
