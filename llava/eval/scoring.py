"""The original LLaVA's answer rules and scores, as pure functions (the eval_* modules are their command lines).

- POPE: keep the first sentence (up to the first "."), drop commas, split on spaces; "No", "no" or "not" among
  the words -> no, else yes. Scores: TP/FP/TN/FN with "yes" positive, accuracy, precision, recall, F1, yes ratio
  (an undefined ratio, e.g. precision with no "yes" predictions, is 0).
- ScienceQA: the answer is a lone option letter, or "X. ..." at the start, or "The answer is X" anywhere (with
  or without the period); anything else is FAILED and counts as wrong. Accuracy over all problems of the split
  and over those whose prompt had an image.
"""

from __future__ import annotations

import re
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
