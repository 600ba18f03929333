"""`python -m llava.eval.model_vqa_science`: the original's ScienceQA runner. The question file is a JSON list of
{id, image?, conversations: [{from: human, value}, ...]}; the first human turn is the question (its `<image>`
removed and put first when the row has an image); `--single-pred-prompt` appends the letter instruction."""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.files import main_entry
from llava.eval.vqa import SINGLE_PRED_PROMPT, Question, add_common_args, run


def questions_of(rows: list[dict], single_pred_prompt: bool) -> list[Question]:
    out = []
    for r in rows:
        qs = r["conversations"][0]["value"].replace("<image>", "").strip()
        if single_pred_prompt:
            qs = qs + "\n" + SINGLE_PRED_PROMPT
        image = r.get("image")
        shown = "<image>\n" + qs if image else qs
        out.append(Question(r["id"], shown, shown, image))
    return out


def main(argv: list[str] | None = None, loaded=None) -> int:
    p = argparse.ArgumentParser(description="LLaVA ScienceQA runner: problems JSON -> answers JSONL")
    add_common_args(p, conv_mode="llava_v0", temperature=0.2, max_new_tokens=1024)
    p.add_argument("--single-pred-prompt", action="store_true")
    p.add_argument("--answer-prompter", action="store_true", help="not supported (the original's two-pass prompt)")
    args = p.parse_args(argv)
    if args.answer_prompter:
        raise SystemExit("--answer-prompter is not supported; LLaVA-1.5's scripts use --single-pred-prompt")
    with open(os.path.expanduser(args.question_file)) as f:
        rows = json.load(f)
    return run(args, questions_of(rows, args.single_pred_prompt), loaded)


if __name__ == "__main__":
    main_entry(main)
