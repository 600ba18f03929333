"""The benchmark scorers and converters at the original's paths (TextVQA, VQAv2, VizWiz, GQA, MME, MMBench, SEED),
each on a small hand-made fixture whose figures are worked out by hand below, and the MMBench runner on a tiny
random model (prompts, option rotations, answer fields, shards, resuming)."""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import png
from llava.eval import eval_gqa, eval_mmbench, eval_mme, eval_textvqa, model_vqa_mmbench
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor, TextVQAAccuracyEvaluator, normalize_answer, vqa_soft_score
from llava.eval.mmbench import read_tsv, rounds
from llava.eval.scoring import MME_CATEGORIES, choice_letter, mme_label
from llava.loading import load_model
from llava.templates import get_template, render, stop_token_ids
from llava.testing import make_tiny_llava

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    """A scripts/*.py command line as a module (they are files, not a package, as in the original)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header, *rows])
    return path


# ------------------------------------------------------------------------------------------------ VQA accuracy


def test_vqa_normalisation_follows_the_official_rules():
    assert normalize_answer("Two dogs.") == "2 dogs"  # number word, trailing period
    assert normalize_answer("The Cat's toy") == "cat 's toy"  # lower case, "'s" split off, article dropped
    assert normalize_answer("dont know") == "don't know"  # contraction restored
    assert normalize_answer("1,000") == "1000"  # commas always go
    assert normalize_answer("left-hand") == "left hand"  # "-" inside a word becomes a space...
    assert normalize_answer("a - b") == "b"  # ...and next to a space it is deleted; "a" is an article
    assert normalize_answer("3.5") == "3.5" and normalize_answer("yes.") == "yes"  # "." kept only before a digit
    assert normalize_answer("somebody'd") == "somebodyd"  # the official table's quirk, kept
    assert EvalAIAnswerProcessor()("None") == "0"


def test_vqa_soft_score_worked_by_hand():
    gts = ["2", "2", "two"] + ["3"] * 7
    # "two" -> "2" matches 3 answers. Leaving out one of those 3 leaves 2 matches: min(1, 2/3) = 2/3;
    # leaving out one of the 7 others leaves 3: 1.  (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_soft_score("Two", gts) == pytest.approx(0.9)
    assert vqa_soft_score("3", gts) == 1.0  # 7 matches: at least 6 remain in every subset
    assert vqa_soft_score("4", gts) == 0.0
    # one match among 10: leaving it out leaves 0, any other leaves 1 -> 9 * (1/3) / 10 = 0.3
    assert vqa_soft_score("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)


def test_textvqa_scorer(tmp_path):
    ann = {"data": [{"image_id": "img1", "question": "What number is it?", "answers": ["2", "2", "two"] + ["3"] * 7},
                    {"image_id": "img2", "question": "What brand?", "answers": ["coca cola"] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    results = [
        {"question_id": "img1", "prompt": "What number is it?\nAnswer the question using a single word or phrase.",
         "text": "two"},
        {"question_id": "img2", "prompt": "OCR tokens: coca, cola Question: What brand? Short answer:",
         "text": "Coca Cola"},
    ]
    write_jsonl(tmp_path / "res" / "model.jsonl", results)
    # 0.9 (worked above) and 1.0 -> 95 %
    out = eval_textvqa.main(["--annotation-file", str(tmp_path / "ann.json"),
                             "--result-dir", str(tmp_path / "res")])
    assert list(out.values()) == [pytest.approx(95.0)]
    pairs = [{"pred_answer": r["text"], "gt_answers": a["answers"]} for r, a in zip(results, ann["data"])]
    assert TextVQAAccuracyEvaluator().eval_pred_list(pairs) == pytest.approx(0.95)  # the original's API


def test_vqav2_and_vizwiz_converters(tmp_path):
    d = tmp_path / "vqav2"
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": i, "text": "q"} for i in (1, 2, 3)])
    merge = d / "answers" / "dev" / "ckpt" / "merge.jsonl"
    write_jsonl(merge, [{"question_id": 1, "text": "Two."}, {"question_id": 3, "text": "Yes"}])
    with merge.open("a") as f:
        f.write('{"question_id": 2, "te\n')  # a torn line is counted and skipped, as the original does
    dst = script("convert_vqav2_for_submission").main(["--dir", str(d), "--ckpt", "ckpt", "--split", "dev"])
    assert json.loads(Path(dst).read_text()) == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": ""},
                                                 {"question_id": 3, "answer": "yes"}]
    vizwiz = script("convert_vizwiz_for_submission")
    questions = write_jsonl(tmp_path / "vizwiz" / "llava_test.jsonl",
                            [{"question_id": 0, "image": "a.jpg"}, {"question_id": 1, "image": "b.jpg"}])
    answers = write_jsonl(tmp_path / "vizwiz" / "a.jsonl", [{"question_id": 0, "text": "A dog!"}])
    upload = tmp_path / "vizwiz" / "up" / "u.json"
    argv = ["--annotation-file", str(questions), "--result-file", str(answers), "--result-upload-file", str(upload)]
    with pytest.raises(ValueError, match="1 VizWiz questions have no answer"):
        vizwiz.main(argv)
    write_jsonl(answers, [{"question_id": 0, "text": "A dog!"}, {"question_id": 1, "text": "unanswerable"}])
    vizwiz.main(argv)
    assert json.loads(upload.read_text()) == [{"image": "a.jpg", "answer": "dog"},
                                              {"image": "b.jpg", "answer": "unanswerable"}]


# ------------------------------------------------------------------------------------------------ GQA


def test_gqa_converter_and_accuracy(tmp_path):
    answers = write_jsonl(tmp_path / "merge.jsonl", [
        {"question_id": "q1", "text": "Yes."}, {"question_id": "q2", "text": "The table"},
        {"question_id": "q3", "text": "left"}, {"question_id": "q4", "text": "yes"}])
    preds = tmp_path / "testdev_balanced_predictions.json"
    script("convert_gqa_for_eval").main(["--src", str(answers), "--dst", str(preds)])
    assert json.loads(preds.read_text())[:2] == [{"questionId": "q1", "prediction": "yes"},
                                                 {"questionId": "q2", "prediction": "the table"}]  # no article rule
    questions = {
        "q1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
        "q2": {"answer": "table", "isBalanced": True, "types": {"structural": "query"}},
        "q3": {"answer": "left", "isBalanced": True, "types": {"structural": "choose"}},
        "q4": {"answer": "no", "isBalanced": False, "types": {"structural": "logical"}},  # not counted
    }
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    out = eval_gqa.main(["--questions", str(tmp_path / "{tier}_questions.json"),
                         "--predictions", str(tmp_path / "{tier}_predictions.json")])
    # right: q1, q3; wrong: q2 ("the table" != "table"). accuracy 2/3; binary (verify, choose) 2/2; open (query) 0/1
    assert out["accuracy"] == pytest.approx(200 / 3) and out["binary"] == 100.0 and out["open"] == 0.0
    assert out["structural/query"] == 0.0 and out["structural/verify"] == 100.0


# ------------------------------------------------------------------------------------------------ MME


def test_mme_reply_rule():
    assert mme_label("Yes") == "yes" and mme_label("No") == "no"
    assert mme_label("Yes, there is a dog.") == "yes" and mme_label("nope") == "no"  # first 4 characters
    assert mme_label("There is no dog") == "other" and mme_label("I don't know") == "other"


def test_mme_converter_and_scores(tmp_path, monkeypatch):
    # MME's folders: "count" has images/ + questions_answers_YN/, every other category holds its .txt files itself
    data = tmp_path / "MME_Benchmark_release_version"
    plan = {}  # category -> [(image, question, truth, reply)]
    for names in MME_CATEGORIES.values():
        for name in names:
            plan[name] = [("1.jpg", "Is it red?", "Yes", "No"), ("1.jpg", "Is it blue?", "No", "Yes")]  # both wrong
    plan["existence"] = [("1.jpg", "Is there a dog?", "Yes", "Yes"), ("1.jpg", "Is there a cat?", "No", "No"),
                         ("2.jpg", "Is there a car?", "Yes", "Yes"), ("2.jpg", "Is there a bus?", "No", "Yes")]
    plan["count"] = [("7.png", "Are there two?", "Yes", "yes, two"), ("7.png", "Are there three?", "No", "Maybe")]
    plan["code_reasoning"] = [("0.png", "Does it print 3?", "Yes", "Yes"), ("0.png", "Does it print 4?", "No", "No")]
    answers = []
    for category, rows in plan.items():
        qa = data / category / ("questions_answers_YN" if category == "count" else "")
        qa.mkdir(parents=True, exist_ok=True)
        if category == "count":
            (data / category / "images").mkdir()
        for image, question, truth, reply in rows:
            stem = image.split(".")[0]
            # MME's files spell some questions with two spaces before the instruction
            spaces = "  " if category == "count" else " "
            with open(qa / f"{stem}.txt", "a") as f:
                f.write(f"{question}{spaces}Please answer yes or no.\t{truth}\n")
            prompt = f"{question}\nAnswer the question using a single word or phrase."  # as in llava_mme.jsonl
            answers.append({"question_id": f"{category}/{image}", "prompt": prompt, "text": reply})
    write_jsonl(tmp_path / "answers" / "exp.jsonl", answers)
    monkeypatch.chdir(tmp_path)
    out = script("convert_answer_to_mme").main(["--experiment", "exp"])
    lines = (Path(out) / "count.txt").read_text().splitlines()
    assert lines[0] == "7.txt\tAre there two?  Please answer yes or no.\tYes\tyes, two"
    scores = eval_mme.main(["--results_dir", out])
    cat = scores["categories"]
    # existence: 3 of 4 right -> acc 75; image 1 both right, image 2 not -> acc+ 1/2 = 50; score 125
    assert (cat["existence"]["acc"], cat["existence"]["acc_plus"], cat["existence"]["score"]) == (75.0, 50.0, 125.0)
    # count: "yes, two" -> yes (right), "Maybe" -> other (wrong): acc 50, acc+ 0 -> 50
    assert cat["count"]["score"] == 50.0 and cat["color"]["score"] == 0.0
    # Perception = 125 + 50 + 8 categories at 0; Cognition = code_reasoning 100 + 100
    assert scores["Perception"] == 175.0 and scores["Cognition"] == 200.0
    (Path(out) / "OCR.txt").unlink()
    with pytest.raises(ValueError, match="missing: OCR"):
        eval_mme.main(["--results_dir", out])


# ------------------------------------------------------------------------------------------------ MMBench

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
          "comment", "split"]


def mmbench_tsv(path: Path, images: list[str]) -> Path:
    rows = [
        [0, "Which colour?", "nan", "cyan", "red", "olive", "blue", "B", "color", images[0], "s", "l2", "nan", "dev"],
        [1, "Is it a square?", "Look closely.", "yes", "no", "nan", "nan", "A", "shape", images[1], "s", "l2", "nan",
         "dev"],
        [2, "Which one is green?", "", "red", "blue", "green", "", "C", "color", "0", "s", "l2", "nan", "dev"],
    ]  # row 2's image cell names row 0's image, as VLMEvalKit's files do
    return write_tsv(path, HEADER, rows)


def test_choice_letter_rule():
    options = {"A": "red", "B": "blue", "C": "green"}
    assert choice_letter("B", options) == "B" and choice_letter("(C) green", options) == "C"
    assert choice_letter("The answer is A.", options) == "A"
    assert choice_letter("It is green.", options) == "C"  # no letter: the one option text it names
    assert choice_letter("A or B", options) is None and choice_letter("red or blue", options) is None


def test_mmbench_rotations_circular_score_and_submission(tmp_path):
    tsv = mmbench_tsv(tmp_path / "dev.tsv", ["aW1n", "aW1n"])
    header, rows = read_tsv(str(tsv))
    assert [o for _, o, _ in rounds(rows[0], True)][1] == ["red", "olive", "blue", "cyan"]
    assert [c for *_, c in rounds(rows[0], True)] == [list("ABCD"), list("BCDA"), list("CDAB"), list("DABC")]
    assert len(rounds(rows[1], True)) == 2 and len(rounds(rows[1], False)) == 1  # options stop at the first "nan"

    def answers(index, replies):
        row = rows[index]
        return [{"question_id": index, "round_id": r, "text": t, "options": o, "option_char": c}
                for (r, o, c), t in zip(rounds(row, True), replies)]

    # question 0 (answer B): round 0 shows A B C D, so B is "B"; round 1 shows B C D A, so B is "A";
    #   round 2 shows C D A B, so B is "D"; round 3 shows D A B C, so B is "C" -> all four right -> passes
    # question 1 (answer A): round 0 "A" right; round 1 shows [no, yes] so "A" picks "no" -> fails
    # question 2 (answer C = green): round 0 "green" (its text) right; round 1 shows [blue, green, red]: "B" right;
    #   round 2 shows [green, red, blue]: "A B" names two letters and no option text -> no answer -> fails
    result = answers(0, ["B", "A.", "The answer is D", "C"]) + answers(1, ["A", "A"]) \
        + answers(2, ["green", "B", "A B"])
    write_jsonl(tmp_path / "res" / "exp.jsonl", result)
    s = eval_mmbench.main(["--annotation-file", str(tsv), "--result-file", str(tmp_path / "res" / "exp.jsonl")])
    # circular: 1 of 3 questions; first rotation alone: 3 of 3; per category: color 1 of 2, shape 0 of 1
    assert s["circular"] == pytest.approx(100 / 3) and s["single"] == 100.0
    assert s["by_category"] == {"color": 50.0, "shape": 0.0}
    # a missing rotation fails its question too (question 0 without round 3 -> 0 of 3)
    write_jsonl(tmp_path / "short.jsonl", [a for a in result if (a["question_id"], a["round_id"]) != (0, 3)])
    assert eval_mmbench.main(["--annotation-file", str(tsv), "--result-file", str(tmp_path / "short.jsonl")])[
        "circular"] == 0.0

    path = script("convert_mmbench_for_submission").main([
        "--annotation-file", str(tsv), "--result-dir", str(tmp_path / "res"), "--upload-dir", str(tmp_path / "up"),
        "--experiment", "exp"])
    if path.endswith(".tsv"):
        with open(path, newline="") as f:
            table = list(csv.reader(f, delimiter="\t"))
    else:
        import openpyxl

        table = [[("" if v is None else str(v)) for v in r] for r in openpyxl.load_workbook(path).active.values]
    # hint, category, image, source, l2-category, comment dropped; prediction (round 0's reply) at column 6
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[1] == ["0", "Which colour?", "cyan", "red", "olive", "blue", "B", "B", "dev"]
    assert [r[6] for r in table[1:]] == ["B", "A", "green"]


# ------------------------------------------------------------------------------------------------ SEED-Bench


def test_seed_accuracy_per_type_and_upload(tmp_path):
    qs = [
        {"question_id": "101", "answer": "A", "question_type_id": 1, "data_type": "image", "choice_b": "a dog"},
        {"question_id": "102", "answer": "B", "question_type_id": 1, "data_type": "image", "choice_b": "a dog"},
        {"question_id": "103", "answer": "C", "question_type_id": 2, "data_type": "image"},
        {"question_id": "104", "answer": "D", "question_type_id": 3, "data_type": "video"},
    ]
    ann = tmp_path / "SEED-Bench.json"
    ann.write_text(json.dumps({"questions": qs, "question_type": {"Scene": 1, "Identity": 2, "Action": 3}}))
    res = write_jsonl(tmp_path / "merge.jsonl", [{"question_id": 101, "text": "A"},
                                                 {"question_id": 102, "text": "(B) a dog"},
                                                 {"question_id": 103, "text": "C"}])  # 104 unanswered
    up = tmp_path / "upload" / "u.jsonl"
    seed = script("convert_seed_for_submission")
    out = seed.main(["--annotation-file", str(ann), "--result-file", str(res), "--result-upload-file", str(up)])
    # exact letters: Scene 1 of 2 ("(B) a dog" != "B") = 50, Identity 1 of 1 = 100, Action 0 of 1 (no answer)
    # total 2 of 4 = 50; image questions 2 of 3; video 0 of 1
    assert out["by_type"] == {"Scene": 50.0, "Identity": 100.0, "Action": 0.0}
    assert out["total"] == 50.0 and out["image"] == pytest.approx(200 / 3) and out["video"] == 0.0
    assert [json.loads(line) for line in up.read_text().splitlines()][1:] == [
        {"question_id": "102", "prediction": "(B) a dog"}, {"question_id": "103", "prediction": "C"},
        {"question_id": "104", "prediction": ""}]
    # ours: --extract-letter reads "(B) a dog" as B -> Scene 2 of 2, total 3 of 4
    out = seed.main(["--annotation-file", str(ann), "--result-file", str(res), "--result-upload-file", str(up),
                     "--extract-letter"])
    assert out["by_type"]["Scene"] == 100.0 and out["total"] == 75.0


# ------------------------------------------------------------------------------------------------ MMBench runner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmbench")
    model = make_tiny_llava(root / "tiny-llava")
    images = [base64.b64encode(png(c, (24, 20))).decode() for c in ((255, 0, 0), (0, 0, 255))]
    return root, model, mmbench_tsv(root / "dev.tsv", images)


def mmbench_argv(tiny, answers, *extra):
    root, model, tsv = tiny
    return ["--model-path", str(model), "--question-file", str(tsv), "--answers-file", str(answers),
            "--conv-mode", "chatml_direct", "--temperature", "0", "--max_new_tokens", "5", "--dtype", "float32",
            "--quantization", "none", *extra]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mmbench_runner_rounds_fields_and_greedy_answer(tiny):
    root, model, _ = tiny
    answers = root / "all.jsonl"
    assert model_vqa_mmbench.main(mmbench_argv(tiny, answers, "--all-rounds", "--single-pred-prompt",
                                               "--lang", "cn")) == 4 + 2 + 3
    got = read(answers)
    assert list(got[0]) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                            "model_id", "metadata"]
    assert [(a["question_id"], a["round_id"]) for a in got] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1),
                                                               (2, 0), (2, 1), (2, 2)]
    assert got[5]["prompt"] == "Look closely.\nIs it a square?\nA. no\nB. yes"  # hint first; rotated options
    assert got[5]["options"] == ["no", "yes"] and got[5]["option_char"] == ["B", "A"]
    assert got[1]["prompt"] == "Which colour?\nA. red\nB. olive\nC. blue\nD. cyan"  # a "nan" hint is no hint
    # the text is greedy generate on the image, the prompt and the Chinese letter instruction
    lm = load_model(str(model), dtype="float32")
    template = get_template("chatml_direct")
    im = lm.process_images([Image.new("RGB", (24, 20), (0, 0, 255))])
    ids = render([{"role": "user", "content": "<image>\n" + got[5]["prompt"] + "\n请直接回答选项字母。"}], template,
                 lm.tokenizer, image_token_counts=[im[0].num_tokens], add_generation_prompt=True).input_ids
    with torch.no_grad():
        out = lm.model.generate(input_ids=torch.tensor([ids]), pixel_values=im[0].pixel_values[None],
                                max_new_tokens=5, do_sample=False, eos_token_id=stop_token_ids(template, lm.tokenizer),
                                pad_token_id=lm.tokenizer.pad_token_id)
    assert got[5]["text"] == lm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_mmbench_runner_shards_keep_rounds_together_and_resume(tiny):
    root, *_ = tiny
    parts = [root / f"part{k}.jsonl" for k in range(2)]
    for k, part in enumerate(parts):
        model_vqa_mmbench.main(mmbench_argv(tiny, part, "--all-rounds", "--num-chunks", "2", "--chunk-idx", str(k)))
    # ceil(3 rows / 2) = 2 rows in chunk 0 (4 + 2 rounds), 1 row in chunk 1 (3 rounds)
    assert [[(a["question_id"], a["round_id"]) for a in read(p)] for p in parts] == [
        [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)], [(2, 0), (2, 1), (2, 2)]]
    whole = root / "whole.jsonl"
    lines = parts[0].read_text().splitlines()
    whole.write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])  # killed after 3 answers, the 4th torn
    assert model_vqa_mmbench.main(mmbench_argv(tiny, whole, "--all-rounds")) == 9 - 3
    again = read(whole)
    assert [(a["question_id"], a["round_id"]) for a in again] == [(a["question_id"], a["round_id"])
                                                                  for p in parts for a in read(p)]
    assert [a["text"] for a in again] == [a["text"] for p in parts for a in read(p)]
    assert model_vqa_mmbench.main(mmbench_argv(tiny, root / "one.jsonl")) == 3  # without --all-rounds: round 0 only
    assert {a["round_id"] for a in read(root / "one.jsonl")} == {0}
