"""Answer files -> the files benchmark servers and official tools take (the scripts/convert_* command lines are thin
layers over these), with the original's rules:

- VQAv2 / VizWiz: each answer normalised as the VQA evaluation does (`normalize_answer`); VQAv2 lists every
  question of the test split ("" where unanswered), VizWiz every question of the annotation file (all must be
  answered) keyed by image.
- GQA: `{questionId, prediction}` with trailing "." removed and lower case.
- MME: per category, lines `file<TAB>question<TAB>truth<TAB>reply` in answer order, the question put back into the
  form of MME's own files (the short-answer instruction removed, " Please answer yes or no." ensured, with the
  two-space spelling some of MME's files use when that is the one they have).
- SEED-Bench: `{question_id, prediction}` for every question of SEED-Bench.json.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

from llava.eval.m4c_evaluator import normalize_answer
from llava.eval.scoring import gqa_prediction

SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def vqav2_submission(answers: Sequence[dict], split: Sequence[dict]) -> list[dict]:
    texts = {a["question_id"]: a["text"] for a in answers}
    return [{"question_id": q["question_id"],
             "answer": normalize_answer(texts[q["question_id"]]) if q["question_id"] in texts else ""}
            for q in split]


def vizwiz_submission(answers: Sequence[dict], questions: Sequence[dict]) -> list[dict]:
    texts = {a["question_id"]: a["text"] for a in answers}
    missing = [q["question_id"] for q in questions if q["question_id"] not in texts]
    if missing:
        raise ValueError(f"{len(missing)} VizWiz questions have no answer (first: {missing[0]!r})")
    return [{"image": q["image"], "answer": normalize_answer(texts[q["question_id"]])} for q in questions]


def gqa_predictions(answers: Sequence[dict]) -> list[dict]:
    return [{"questionId": a["question_id"], "prediction": gqa_prediction(a["text"])} for a in answers]


def seed_upload(questions: Sequence[dict], replies: dict[str, str]) -> tuple[list[dict], int]:
    """(upload rows, how many questions had no reply: their prediction is "")."""
    rows = [{"question_id": q["question_id"], "prediction": replies.get(str(q["question_id"]), "")}
            for q in questions]
    return rows, sum(str(q["question_id"]) not in replies for q in questions)


def mme_ground_truth(data_path: str) -> dict[tuple[str, str, str], str]:
    """{(category, question file, question): "Yes"|"No"} from MME_Benchmark_release_version: each category folder
    holds its .txt files (lines `question<TAB>answer`) either itself or in questions_answers_YN/."""
    truth = {}
    for category in sorted(os.listdir(data_path)):
        folder = os.path.join(data_path, category)
        if not os.path.isdir(folder):
            continue
        qa = os.path.join(folder, "questions_answers_YN")
        qa = qa if os.path.isdir(os.path.join(folder, "images")) else folder
        for name in sorted(os.listdir(qa)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(qa, name), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    fields = line.strip().split("\t")
                    if len(fields) != 2:
                        raise ValueError(f"{os.path.join(qa, name)}:{n}: expected question<TAB>answer")
                    truth[(category, name, fields[0])] = fields[1]
    return truth


def mme_category_lines(answers: Sequence[dict], truth: dict) -> dict[str, list[str]]:
    """{category: [line, ...]} for eval_mme; an answer's question_id is `category/.../image.ext`."""
    out: dict[str, list[str]] = defaultdict(list)
    for a in answers:
        category = a["question_id"].split("/")[0]
        file = a["question_id"].split("/")[-1].split(".")[0] + ".txt"
        question = a["prompt"].replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in a["prompt"] else a["prompt"]
        if YES_NO.strip() not in question:
            question += YES_NO
            if (category, file, question) not in truth:
                question = question.replace(YES_NO, " " + YES_NO)
        if (category, file, question) not in truth:
            raise ValueError(f"no MME ground truth for {a['question_id']!r}, question {question!r}")
        reply = " ".join(a["text"].split("\n")).replace("\t", " ")  # keep one line of four fields
        out[category].append("\t".join((file, question, truth[category, file, question], reply)))
    return dict(out)
