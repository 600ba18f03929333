"""The official VQA answer normalisation and soft accuracy (VQAv2, VizWiz, TextVQA), at the original's module path
with its two names (`EvalAIAnswerProcessor`, `TextVQAAccuracyEvaluator`) so scripts that import them keep working.

Normalisation, in order (the EvalAI / MMF rules, quirks included so figures match the leaderboards):
1. lower case; drop "," and "?"; "'s" -> " 's"; newlines and tabs -> spaces; strip.
2. punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the text has it next to a space or has a
   digit,digit comma anywhere, else replaced by a space; then every "." not followed by a digit is deleted (only the
   first 32: the official code passes re.UNICODE where `sub` takes its count).
3. per word: number words zero..ten and "none" -> digits, articles a/an/the dropped, apostrophe-less contractions
   restored ("dont" -> "don't").

Soft accuracy of a prediction against n human answers (10 in these datasets): the mean over the n leave-one-out
subsets of min(1, matches in the subset / 3), everything normalised first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Full forms; the table maps each spelling with exactly one apostrophe missing back to the full form.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contractions() -> dict[str, str]:
    table = {}
    for full in _CONTRACTED:
        for i, ch in enumerate(full):
            if ch == "'":
                table[full[:i] + full[i + 1:]] = full
    # the official table also maps this full form to the wrong spelling (and its capitalised I'd/I'm/I've keys
    # never match lower-cased text, so they are left out)
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS = _contractions()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        glued = not (p + " " in text or " " + p in text or has_digit_comma)
        out = out.replace(p, " " if glued else "")
    return _PERIOD.sub("", out, count=32)


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_soft_score(prediction: str, human_answers: Sequence[str]) -> float:
    """min(1, matches / 3) averaged over the leave-one-out subsets of the human answers (all normalised)."""
    if not human_answers:
        raise ValueError("a VQA question needs its human answers (10 in VQAv2, VizWiz and TextVQA)")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in human_answers]
    total = sum(hits)
    # leaving out answer i leaves total - hits[i] matches among the others
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


def vqa_accuracy(pairs: Iterable[tuple[str, Sequence[str]]]) -> float:
    """Mean soft score of (prediction, human answers) pairs, as a fraction."""
    scores = [vqa_soft_score(pred, gts) for pred, gts in pairs]
    if not scores:
        raise ValueError("no predictions to score")
    return sum(scores) / len(scores)


class EvalAIAnswerProcessor:
    """Callable form of `normalize_answer`, under the original's name."""

    def __call__(self, item: str) -> str:
        return normalize_answer(item)


class TextVQAAccuracyEvaluator:
    """`eval_pred_list([{pred_answer, gt_answers}, ...])` -> mean soft accuracy (a fraction), the original's API."""

    def eval_pred_list(self, pred_list: Sequence[dict]) -> float:
        return vqa_accuracy((e["pred_answer"], e["gt_answers"]) for e in pred_list)
