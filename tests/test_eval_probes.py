"""train.probes: easy-VQA images as POPE / ScienceQA / MME question sets in the original's files, scored by the
original's scorers. No model here: answers written by hand (all right, then some wrong) give scores worked out by
hand."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

pytest.importorskip("easy_vqa")

from llava.eval import eval_mme, eval_pope, eval_science_qa  # noqa: E402
from train import easyvqa, probes  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("probes")
    images = probes.probe_images(6, seed=0)
    probes.pope_files(images, out / "pope", 0)
    probes.science_files(images, out / "scienceqa", 0)
    probes.mme_files(images, out / "MME", 0)
    return out, images


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_answers(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pope_negative_rules():
    freq = Counter({("red", "circle"): 9, ("blue", "circle"): 5, ("red", "triangle"): 4, ("teal", "rectangle"): 7})
    rng = random.Random(0)
    present = ("red", "circle")
    assert probes.pope_negative("popular", present, freq, rng) == ("teal", "rectangle")  # most frequent absent one
    assert probes.pope_negative("adversarial", present, freq, rng) == ("blue", "circle")  # shares an attribute
    for _ in range(20):
        c, s = probes.pope_negative("random", present, freq, rng)
        assert (c, s) != present and c in easyvqa.COLORS and s in easyvqa.SHAPES


def test_pope_files_and_scores(built):
    out, images = built
    questions = jsonl(out / "pope" / "llava_pope_test.jsonl")
    assert len(questions) == 3 * 2 * len(images)
    assert set(questions[0]) == {"question_id", "image", "text", "category"}
    assert questions[0]["text"].endswith("in the image?\n" + easyvqa.SHORT_ANSWER)
    labels = {s: jsonl(out / "pope" / "coco" / f"coco_pope_{s}.json") for s in probes.SPLITS}
    assert all(Counter(r["label"] for r in rows) == {"yes": 6, "no": 6} for rows in labels.values())
    truth = {r["question_id"]: r["label"] for rows in labels.values() for r in rows}
    # right everywhere except: every "no" of the random split answered "Yes." -> FP 6, TN 0 there
    answers = [{"question_id": q["question_id"], "text": "No, there is not." if truth[q["question_id"]] == "no"
                and q["category"] != "random" else "Yes."} for q in questions]
    write_answers(out / "pope" / "answers.jsonl", answers)
    scores = eval_pope.main(["--annotation-dir", str(out / "pope" / "coco"), "--question-file",
                             str(out / "pope" / "llava_pope_test.jsonl"), "--result-file",
                             str(out / "pope" / "answers.jsonl")])
    assert scores["adversarial"]["accuracy"] == 1.0 and scores["popular"]["f1"] == 1.0
    r = scores["random"]  # TP 6, FP 6: accuracy 0.5, precision 0.5, recall 1, F1 2/3, yes ratio 1
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert r["f1"] == pytest.approx(2 / 3)


def test_science_files_and_scores(built):
    out, images = built
    problems = json.loads((out / "scienceqa" / "problems.json").read_text())
    rows = json.loads((out / "scienceqa" / "llava_test_CQM-A.json").read_text())
    assert len(problems) == len(rows) == 2 * len(images)
    first = rows[0]["conversations"][0]["value"]
    assert first.startswith("<image>\nWhat shape is in the image?\nA. ") and "\nC. " in first
    # the first half answered with the right letter, the rest "yes" (FAILED under the original's rule)
    answers = []
    for i, r in enumerate(rows):
        letter = "ABCDE"[problems[r["id"]]["answer"]]
        answers.append({"question_id": r["id"], "prompt": r["conversations"][0]["value"],
                        "text": letter if i < len(rows) // 2 else "yes"})
    write_answers(out / "scienceqa" / "answers.jsonl", answers)
    d = out / "scienceqa"
    res = eval_science_qa.main(["--base-dir", str(d), "--result-file", str(d / "answers.jsonl"), "--output-file",
                                str(d / "o.json"), "--output-result", str(d / "r.json")])
    assert (res["acc"], res["img_acc"], res["count"]) == (50.0, 50.0, 2 * len(images))


def test_mme_files_and_scores(built):
    out, images = built
    questions = jsonl(out / "MME" / "llava_mme.jsonl")
    assert len(questions) == 2 * len(probes.MME_KINDS) * len(images)
    data = out / "MME" / "MME_Benchmark_release_version"
    truth = {}
    for q in questions:
        kind, name = q["question_id"].split("/")
        lines = (data / kind / name.replace(".png", ".txt")).read_text().splitlines()
        assert (data / kind / name).is_file()
        for line in lines:
            question, answer = line.split("\t")
            truth[(q["question_id"], question)] = answer
    # existence all right; color: only the yes questions right ("Yes" always) -> acc 50, acc+ 0; count all wrong
    answers = []
    for q in questions:
        kind = q["category"]
        gold = truth[(q["question_id"], q["text"].split("\n")[0])]
        reply = gold if kind == "existence" else "Yes" if kind == "color" else {"Yes": "No", "No": "Yes"}[gold]
        answers.append({"question_id": q["question_id"], "prompt": q["text"], "text": reply})
    write_answers(out / "MME" / "answers" / "exp.jsonl", answers)
    cmd = probes.commands(out, "", "exp", "chatml_direct")["mme"]
    probes.run_command(cmd[1], None)  # scripts/convert_answer_to_mme.py
    scores = eval_mme.main(["--results_dir", str(out / "MME" / "eval_tool" / "answers" / "exp"), "--partial"])
    cat = scores["categories"]
    assert cat["existence"]["score"] == 200.0 and cat["count"]["score"] == 0.0
    assert (cat["color"]["acc"], cat["color"]["acc_plus"]) == (50.0, 0.0)
    assert scores["Perception"] == 250.0 and scores["Cognition"] == 0
    with pytest.raises(ValueError, match="missing"):  # without --partial, MME's totals need every category
        eval_mme.main(["--results_dir", str(out / "MME" / "eval_tool" / "answers" / "exp")])
