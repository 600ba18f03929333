"""The original LLaVA's answer rules and scores, as pure functions (the eval_* modules are their command lines).

- POPE: keep the first sentence (up to the first "."), drop commas, split on spaces; "No", "no" or "not" among
  the words -> no, else yes. Scores: TP/FP/TN/FN with "yes" positive, accuracy, precision, recall, F1, yes ratio
  (an undefined ratio, e.g. precision with no "yes" predictions, is 0).
- ScienceQA: the answer is a lone option letter, or "X. ..." at the start, or "The answer is X" anywhere (with
  or without the period); anything else is FAILED and counts as wrong. Accuracy over all problems of the split
  and over those whose prompt had an image.
- TextVQA: the question is found again in the answer's prompt (three layouts) to pair it with its annotation; the
  VQA soft accuracy itself is `llava.eval.m4c_evaluator`.
- GQA: trailing "." removed, lower case, then exact equality with the answer; accuracy, binary, open.
- MME: "yes"/"no" read from the reply's first 4 characters; acc and acc+ (both questions of an image right) per
  category, score = acc + acc+; Perception and Cognition totals are sums over their categories.
- Multiple choice (MMBench, optionally SEED): a reply's single option letter, else its single option text.
- SEED-Bench: the reply equals the answer letter; accuracy per question type, in total, per data type.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

OPTIONS = ("A", "B", "C", "D", "E")


def pope_says_no(text: str) -> bool:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return any(w in ("No", "no", "not") for w in words)


def pope_scores(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """answers: model texts; labels: "yes"/"no", paired by position."""
    preds = [0 if pope_says_no(a) else 1 for a in answers]
    truth = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and t == 1 for p, t in zip(preds, truth))
    fp = sum(p == 1 and t == 0 for p, t in zip(preds, truth))
    tn = sum(p == 0 and t == 0 for p, t in zip(preds, truth))
    fn = sum(p == 0 and t == 1 for p, t in zip(preds, truth))
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1, "yes_ratio": sum(preds) / len(preds) if preds else 0.0}


def science_answer(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The option letter a ScienceQA reply gives, or "FAILED"."""
    text = text.replace("\n", ". ")
    if text.strip() in options:
        return text.strip()
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    m = re.search(r"The answer is ([A-E])", text)
    if m and m.group(1) in options:
        return m.group(1)
    return "FAILED"


# ------------------------------------------------------------------------------------------------ TextVQA


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA answer's prompt, lower-cased (the three prompt layouts the original knows):
    "OCR tokens: … Question: Q Short answer:", three lines with a "Reference OCR token: …" line, or
    "Q\\n<instruction>"."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m:
            return m.group(1).lower()
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    elif len(lines) == 2:
        return lines[0].lower()
    raise ValueError(f"cannot find the question in this TextVQA prompt: {prompt!r}")


# ------------------------------------------------------------------------------------------------ GQA


def gqa_prediction(text: str) -> str:
    """The original's GQA processing: trailing periods off, lower case (then GQA compares exactly)."""
    return text.rstrip(".").lower()


def gqa_scores(questions: dict, predictions: dict) -> dict:
    """GQA's accuracy figures (percent) over the balanced questions: accuracy, binary and open (a question is open
    when its structural type is "query"), and per structural type. `questions` is GQA's {qid: question} file;
    `predictions` {qid: prediction}. A balanced question without a prediction is an error, as in GQA's eval.py."""
    scores: dict[str, list[bool]] = defaultdict(list)
    missing = [qid for qid, q in questions.items() if q.get("isBalanced", True) and qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} balanced questions have no prediction (first: {missing[0]})")
    for qid, q in questions.items():
        if not q.get("isBalanced", True):
            continue
        ok = predictions[qid] == q["answer"]
        structural = q["types"]["structural"]
        for key in ("accuracy", "open" if structural == "query" else "binary", f"structural/{structural}"):
            scores[key].append(ok)
    return {k: 100 * sum(v) / len(v) for k, v in scores.items()}


# ------------------------------------------------------------------------------------------------ MME

MME_CATEGORIES = {
    "Perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"),
    "Cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def mme_label(text: str) -> str:
    """MME's reading of a reply: "yes" / "no" when it is exactly that (lower-cased), else whichever of "yes" then
    "no" occurs in its first 4 characters, else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_category_scores(rows: Sequence[tuple[str, str]]) -> dict:
    """rows: (ground truth, reply) in file order, the two questions of each image adjacent, as MME's files are.
    acc = % of questions right; acc_plus = % of images with both questions right; score = acc + acc_plus."""
    if len(rows) % 2:
        raise ValueError(f"MME pairs two questions per image; this category has {len(rows)} lines")
    right = [mme_label(reply) == gt.lower() for gt, reply in rows]
    acc = 100 * sum(right) / len(right) if right else 0.0
    pairs = len(right) // 2
    acc_plus = 100 * sum(right[i] and right[i + 1] for i in range(0, len(right), 2)) / pairs if pairs else 0.0
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def mme_totals(per_category: dict[str, dict], partial: bool = False) -> dict:
    """Perception and Cognition totals: sums of their categories' scores (every category must be there, unless
    `partial`: then the sums of those present)."""
    out = {}
    for kind, names in MME_CATEGORIES.items():
        missing = [n for n in names if n not in per_category]
        if missing and partial:
            out[kind] = sum(per_category[n]["score"] for n in names if n in per_category)
            continue
        if missing:
            raise ValueError(f"MME {kind} needs all its categories; missing: {', '.join(missing)}")
        out[kind] = sum(per_category[n]["score"] for n in names)
    return out


# ------------------------------------------------------------------------------------------------ multiple choice

_LETTER_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def choice_letter(text: str, options: dict[str, str]) -> str | None:
    """The option a multiple-choice reply picks, or None. `options` maps letters to option texts.

    The reply's words (with .()[],:;!*#{} as spaces) holding exactly one of the option letters give that letter
    ("B", "(B)", "The answer is B."); failing that, exactly one option text inside the reply (case-insensitive)
    gives its letter. Anything else picks nothing (MMBench's server would then ask an LLM; here it is wrong)."""
    words = set(text.translate(_LETTER_PUNCTUATION).split())
    letters = [c for c in options if c in words]
    if len(letters) == 1:
        return letters[0]
    low = text.lower()
    named = [c for c, option in options.items() if option and option.lower() in low]
    return named[0] if len(named) == 1 else None


# ------------------------------------------------------------------------------------------------ SEED-Bench


def seed_scores(questions: Sequence[dict], replies: dict[str, str], type_names: dict[int, str],
                extract_letter: bool = False) -> dict:
    """SEED-Bench accuracy (percent) per question type, in total, and per data type (image / video).

    questions: SEED-Bench.json's `questions` ({question_id, answer, question_type_id, data_type, choice_a..d});
    replies: {str(question_id): answer text}; a question without a reply counts wrong. The original compares the
    reply with the answer letter exactly; `extract_letter` reads the letter with `choice_letter` first (ours)."""
    per_type: dict[int, list[bool]] = defaultdict(list)
    per_data: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        reply = replies.get(str(q["question_id"]))
        if reply is not None and extract_letter:
            reply = choice_letter(reply, {c: q.get(f"choice_{c.lower()}", "") for c in "ABCD"})
        ok = reply == q["answer"]
        per_type[q["question_type_id"]].append(ok)
        per_data[q["data_type"]].append(ok)
    every = [ok for oks in per_type.values() for ok in oks]
    out = {"by_type": {type_names.get(t, str(t)): 100 * sum(v) / len(v) for t, v in sorted(per_type.items())},
           "total": 100 * sum(every) / len(every) if every else 0.0}
    out.update({kind: 100 * sum(v) / len(v) for kind, v in per_data.items()})
    return out
