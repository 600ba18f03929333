"""`python -m llava.eval.model_vqa_mmbench`: the original's MMBench runner. The question file is MMBench's TSV
(base64 images, hint, options A-D); `--all-rounds` asks every rotation of the options (for circular scoring),
`--single-pred-prompt` appends the letter instruction (Chinese with `--lang cn`). Answer lines carry round_id,
options and option_char besides the usual fields; answered through the engine (see llava.eval.vqa)."""

from __future__ import annotations

import argparse
import os

from llava.eval.files import main_entry
from llava.eval.mmbench import SINGLE_PRED_PROMPT_CN, image_bytes, question_prompt, read_tsv, rounds
from llava.eval.vqa import SINGLE_PRED_PROMPT, Question, add_common_args, run


def questions_of(rows: list[dict], *, all_rounds: bool, single_pred_prompt: bool, lang: str) -> list[Question]:
    by_index = {r["index"]: r for r in rows}
    suffix = ""
    if single_pred_prompt:
        suffix = "\n" + (SINGLE_PRED_PROMPT_CN if lang == "cn" else SINGLE_PRED_PROMPT)
    out = []
    for row in rows:
        image = image_bytes(row, by_index)  # one bytes object for all rounds: encoded once by the engine's cache
        for round_id, options, chars in rounds(row, all_rounds):
            prompt = question_prompt(row, options)
            out.append(Question(row["index"], "<image>\n" + prompt + suffix, prompt, image, round_id, options, chars))
    return out


def main(argv: list[str] | None = None, loaded=None) -> int:
    p = argparse.ArgumentParser(description="LLaVA MMBench runner: MMBench TSV -> answers JSONL")
    add_common_args(p, conv_mode="llava_v1", temperature=0.2, max_new_tokens=1024)
    p.add_argument("--all-rounds", action="store_true", help="ask every rotation of the options")
    p.add_argument("--single-pred-prompt", action="store_true")
    p.add_argument("--lang", type=str, default="en", help="en | cn (the single-prediction instruction's language)")
    args = p.parse_args(argv)
    _, rows = read_tsv(os.path.expanduser(args.question_file))
    questions = questions_of(rows, all_rounds=args.all_rounds, single_pred_prompt=args.single_pred_prompt,
                             lang=args.lang)
    return run(args, questions, loaded)


if __name__ == "__main__":
    main_entry(main)
