"""`python -m llava.eval.eval_gqa [--tier testdev_balanced]`, run in GQA's data folder like GQA's own eval/eval.py:
reads `{tier}_questions.json` and `{tier}_predictions.json` (what scripts/convert_gqa_for_eval.py writes) and prints
accuracy, binary and open (percent) over the balanced questions, and accuracy per structural type. GQA's
consistency, validity, plausibility, grounding and distribution need its scene graphs and are not computed here."""

from __future__ import annotations

import argparse

from llava.eval.files import SCORER_ERRORS, main_entry, read_json
from llava.eval.scoring import gqa_scores


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="GQA accuracy (exact match)")
    p.add_argument("--tier", default="testdev_balanced")
    p.add_argument("--questions", default="{tier}_questions.json")
    p.add_argument("--predictions", default="{tier}_predictions.json")
    args = p.parse_args(argv)
    questions = read_json(args.questions.format(tier=args.tier))
    predictions = {str(p["questionId"]): p["prediction"] for p in read_json(args.predictions.format(tier=args.tier))}
    scores = gqa_scores({str(k): v for k, v in questions.items()}, predictions)
    for key in ("binary", "open", "accuracy"):
        print(f"{key.capitalize()}: {scores.get(key, 0.0):.2f}%")
    for key in sorted(k for k in scores if k.startswith("structural/")):
        print(f"  {key.split('/', 1)[1]}: {scores[key]:.2f}%")
    return scores


if __name__ == "__main__":
    main_entry(main, SCORER_ERRORS)
