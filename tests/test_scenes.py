"""train.scenes (the generated scenes data) and train.scenes_eval (its scorer): determinism, answers re-derived from
the scene descriptions, layout, held-out paraphrases, balance, fonts, and the scorer's figures on a fixture."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import scenes, scenes_eval
from train.easyvqa import SHORT_ANSWER

SIZE = 112


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    scenes.generate(out, seed=5, n_train=260, n_test=90, image_size=SIZE)
    return out


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


def question(row: dict) -> str:
    text = row["conversations"][0]["value"].replace("<image>\n", "")
    return text.replace("\n" + SHORT_ANSWER, "").lower()


def named(text: str) -> list[tuple[str, str]]:
    return re.findall(rf"\b({'|'.join(scenes.COLORS)}) ({'|'.join(scenes.SHAPES)})\b", text)


def word_in(text: str, vocab) -> str | None:
    hits = [w for w in vocab if re.search(rf"\b{w}s?\b", text)]
    assert len(hits) <= 1, (text, hits)
    return hits[0] if hits else None


def expected(row: dict, found: dict[str, scenes.Scene]) -> str:
    """The answer, from the question's words and the scene description alone."""
    q, fam = question(row), row["family"]
    images = row["image"] if isinstance(row["image"], list) else [row["image"]]
    s = [found[i] for i in images]
    objs = s[0].objects
    if fam == "count":
        colour, shape = word_in(q, scenes.COLORS), word_in(q, scenes.SHAPES)
        return str(sum((colour in (None, o.colour)) and (shape in (None, o.shape)) for o in objs))
    if fam == "position":
        key = {"left": lambda o: o.x, "right": lambda o: -o.x, "top": lambda o: o.y, "highest": lambda o: o.y,
               "bottom": lambda o: -o.y, "lowest": lambda o: -o.y}
        (d,) = [k for k in key if re.search(rf"\b{k}(most)?\b", q)]
        first, second = sorted(objs, key=key[d])[:2]
        assert abs(key[d](first) - key[d](second)) >= scenes.MARGIN * SIZE  # unambiguous
        return first.colour if "colo" in q else first.shape
    if fam == "relation":
        (a, b) = [next(o for o in objs if (o.colour, o.shape) == n) for n in named(q)]
        assert sum((o.colour, o.shape) == (a.colour, a.shape) for o in objs) == 1
        (rel,) = [r for r in ("left", "right", "above", "higher", "below", "lower") if re.search(rf"\b{r}\b", q)]
        yes = {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "higher": a.y < b.y, "below": a.y > b.y,
               "lower": a.y > b.y}[rel]
        return "yes" if yes else "no"
    if fam == "existence":
        ((c, sh),) = named(q)
        if any((o.colour, o.shape) == (c, sh) for o in objs):
            return "yes"
        assert any(o.colour == c or o.shape == sh for o in objs)  # POPE-adversarial negative
        return "no"
    if fam == "text":
        return s[0].word.text
    if fam == "two_image":
        if "both" in q or "each of the two" in q:
            colour, shape = word_in(q, scenes.COLORS), word_in(q, scenes.SHAPES)
            return "yes" if all(any(o.colour == colour or o.shape == shape for o in x.objects) for x in s) else "no"
        if "first or the second" in q or "first and the second" in q:
            assert len(s[0].objects) != len(s[1].objects)
            return "first" if len(s[0].objects) > len(s[1].objects) else "second"
        lone = s[0] if "first" in q else s[1]
        assert len(lone.objects) == 1
        return lone.objects[0].colour
    raise AssertionError(fam)


def test_same_seed_same_bytes_any_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert scenes.main(["--out", str(a), "--seed", "3", "--train", "40", "--test", "16", "--image-size", "96"]) == 0
    scenes.generate(b, 3, 40, 16, 96, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) > 56
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    scenes.generate(c, 4, 40, 16, 96, families=["count", "text"])
    assert (c / "train.json").read_bytes() != (a / "train.json").read_bytes()


def test_answers_follow_from_the_scenes(data):
    for split, files in (("train", ["train.json"]), ("test", ["test.json", "paraphrase_test.json"])):
        found = {k: scenes.scene_from_dict(v) for k, v in load(data, f"scenes-{split}.json").items()}
        for name in files:
            rows = load(data, name)
            assert {r["family"] for r in rows} == set(scenes.FAMILIES) - ({"easyvqa"} if "para" in name else set())
            for row in rows:
                answer = row["conversations"][-1]["value"]
                assert answer == answer.lower() or row["family"] == "caption"
                if row["family"] == "easyvqa":
                    assert (data / row["image"]).is_file() and answer in ("yes", "no", *scenes.easyvqa.COLORS,
                                                                          *scenes.easyvqa.SHAPES)
                elif row["family"] == "caption":
                    (s,) = [found[row["image"]]]
                    assert named(answer.lower()) == [(o.colour, o.shape) for o in s.left_to_right()]
                    assert row["conversations"][0]["value"].count("<image>") == 1
                else:
                    assert expected(row, found) == answer, row
                    n = 2 if row["family"] == "two_image" else 1
                    assert row["conversations"][0]["value"].count("<image>") == n
                    assert row["conversations"][0]["value"].endswith(SHORT_ANSWER)


def test_added_questions_follow_from_the_scenes(data):
    """Training rows with more questions per scene (independent turns): every added answer is re-derived from the
    scene description, kinds differ within a row, the row's own kind is not repeated, and yes/no stay balanced."""
    found = {k: scenes.scene_from_dict(v) for k, v in load(data, "scenes-train.json").items()}
    rows = load(data, "train.json")
    more = scenes.add_questions(rows, load(data, "scenes-train.json"), 6, seed=5)
    assert more != rows and [r["id"] for r in more] == [r["id"] for r in rows]
    assert more == scenes.add_questions(rows, load(data, "scenes-train.json"), 6, seed=5)  # deterministic
    added, answers, counted = Counter(), Counter(), Counter()
    for row, orig in zip(more, rows):
        conv = row["conversations"]
        assert conv[:2] == orig["conversations"]
        if row["family"] in ("caption", "easyvqa", "two_image"):
            assert conv == orig["conversations"]
            continue
        kinds = []
        for human, gpt in zip(conv[2::2], conv[3::2]):
            assert "<image>" not in human["value"] and human["value"].endswith(SHORT_ANSWER)
            single = {**row, "conversations": [{"from": "human", "value": "<image>\n" + human["value"]}, gpt]}
            family = next(f for f in scenes.SHORT_FAMILIES if question(single) and f in _kind_of(single))
            assert expected({**single, "family": family}, found) == gpt["value"], single
            kinds.append(_kind_of(single))
            answers[gpt["value"]] += gpt["value"] in ("yes", "no")
            if kinds[-1] in ("count/colour", "count/shape"):
                counted[gpt["value"]] += 1
        added[len(kinds)] += 1
        assert len(kinds) <= 6 and len(set(kinds)) == len(kinds) and _kind_of(orig) == orig["kind"] not in kinds
    assert sum(added.values()) > 100 and added[6] > 50
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6
    # counts by colour/shape: not mostly "1" (a random colour or shape of a scene of 1-5 objects gives "1" about
    # two times in three), some 0s, a quarter 2 or more
    total = sum(counted.values())
    assert total > 100 and counted["1"] < 0.55 * total and counted["0"] > 0.1 * total, counted
    assert sum(counted[str(n)] for n in range(2, 6)) > 0.2 * total, counted


def check_relation_or_half(row: dict, human: dict, gpt: dict, found: dict[str, scenes.Scene]) -> str:
    """Assert one relation or which-half exchange about the row's scene is answered by the scene; its kind."""
    single = {**row, "conversations": [{"from": "human", "value": "<image>\n" + human["value"].replace("<image>\n", "")}, gpt]}
    q = question(single)
    if " half" in q or q.endswith(("on the right?", "at the bottom?")):
        ((c, sh),) = named(q)
        (o,) = [o for o in found[row["image"]].objects if (o.colour, o.shape) == (c, sh)]
        axis = "x" if "left" in q else "y"
        assert abs(getattr(o, axis) - SIZE / 2) >= scenes.MARGIN * SIZE
        assert gpt["value"] == scenes.HALVES[axis][int(getattr(o, axis) > SIZE / 2)]
        return "half"
    assert _kind_of(single) == "relation"
    assert expected({**single, "family": "relation"}, found) == gpt["value"]
    return "relation"


def test_extra_relation_and_half_questions_follow_from_the_scenes(data):
    """relations=2, halves=3: the first k questions stay as they were; the extra relation questions are answered
    under the relation rules and not asked twice; half questions name a unique object clear of the centre line."""
    described = load(data, "scenes-train.json")
    found = {k: scenes.scene_from_dict(v) for k, v in described.items()}
    rows = load(data, "train.json")
    plain = scenes.add_questions(rows, described, 6, seed=5)
    more = scenes.add_questions(rows, described, 6, seed=5, relations=2, halves=3)
    assert more == scenes.add_questions(rows, described, 6, seed=5, relations=2, halves=3)
    kinds, halves = Counter(), Counter()
    for row, before in zip(more, plain):
        conv = row["conversations"]
        assert conv[:len(before["conversations"])] == before["conversations"]
        extra = conv[len(before["conversations"]):]
        if row["family"] in ("caption", "easyvqa", "two_image"):
            assert not extra
            continue
        asked = [t["value"].replace("<image>\n", "") for t in conv[::2]]
        assert len(asked) == len(set(asked))
        for human, gpt in zip(extra[::2], extra[1::2]):
            if check_relation_or_half(row, human, gpt, found) == "half":
                halves[gpt["value"]] += 1
            else:
                kinds[gpt["value"]] += 1
    assert sum(kinds.values()) > 50 and 0.35 < kinds["yes"] / sum(kinds.values()) < 0.65, kinds
    assert set(halves) == {"left", "right", "top", "bottom"} and sum(halves.values()) > 100, halves


def test_half_test_rows_ask_each_test_scene_where_one_named_object_is(data):
    """The build's which-half diagnostic: at most one question per test scene, each about an object named uniquely
    and clear of the centre line, answered by the scene; both axes asked; the same rows every time."""
    described = load(data, "scenes-test.json")
    rows = scenes.half_test_rows(described)
    assert rows == scenes.half_test_rows(described) and rows != scenes.half_test_rows(described, seed=1)
    assert len({r["image"] for r in rows}) == len(rows) == len({r["id"] for r in rows}) > 0.5 * len(described)
    axes = Counter()
    for row in rows:
        assert row["family"] == "halves" and (data / row["image"]).is_file()
        q, answer = question(row), row["conversations"][1]["value"]
        ((c, sh),) = named(q)
        (o,) = [o for o in scenes.scene_from_dict(described[row["image"]]).objects if (o.colour, o.shape) == (c, sh)]
        axis = row["kind"].split("/")[1]
        assert ("left" in q) == (axis == "x")
        assert abs(getattr(o, axis) - SIZE / 2) >= scenes.MARGIN * SIZE
        assert answer == scenes.HALVES[axis][int(getattr(o, axis) > SIZE / 2)]
        axes[axis] += 1
    assert axes["x"] > 10 and axes["y"] > 10, axes


def _kind_of(row: dict) -> str:
    """The family of a single question by its wording (training templates)."""
    q = question(row)
    for kind, (train, _) in scenes.TEMPLATES.items():
        for t in train:
            pattern = re.escape(t.lower()).replace(r"\{", "{").replace(r"\}", "}")
            pattern = re.sub(r"\{[a-z]+\}", ".+", pattern)
            if re.fullmatch(pattern, q):
                return kind
    raise AssertionError(q)


def test_objects_do_not_overlap_and_images_show_the_scene(data):
    fonts = scenes.Fonts([scenes.FontRef(**f) for f in load(data, "meta.json")["fonts"]])
    found = load(data, "scenes-train.json")
    for k, (name, d) in enumerate(found.items()):
        s = scenes.scene_from_dict(d)
        for i, o in enumerate(s.objects):
            assert o.bound <= o.x <= SIZE - o.bound and o.bound <= o.y <= SIZE - o.bound
            for p in s.objects[i + 1:]:
                assert math.hypot(o.x - p.x, o.y - p.y) > o.bound + p.bound
            if s.word:
                assert scenes._clear_of_box(s.word.box, o.x, o.y, o.bound)
        if s.word:
            assert 0 <= s.word.box[0] and s.word.box[2] <= SIZE and 0 <= s.word.box[1] and s.word.box[3] <= SIZE
        if k < 40:
            pixels = np.asarray(Image.open(data / name))
            assert pixels.shape == (SIZE, SIZE, 3)
            for o in s.objects:
                assert tuple(pixels[round(o.y), round(o.x)]) == o.rgb
            assert np.array_equal(pixels, np.asarray(scenes.render(s, fonts)))


def test_paraphrases_are_held_out(data):
    train_t = {t for kind in scenes.TEMPLATES.values() for t in kind[0]}
    para_t = {t for kind in scenes.TEMPLATES.values() for t in kind[1]}
    assert train_t.isdisjoint(para_t) and all(len(v[1]) >= 1 and len(v[0]) >= 2 for v in scenes.TEMPLATES.values())
    seen = {question(r) for name in ("train.json", "test.json") for r in load(data, name)}
    test = {r["id"].split("-")[1]: r for r in load(data, "test.json")}
    para = load(data, "paraphrase_test.json")
    assert len(para) == sum(r["family"] != "easyvqa" for r in test.values())
    for r in para:
        assert question(r) not in seen
        t = test[r["id"].split("-")[1]]
        assert (r["image"], r["conversations"][1], r["family"]) == (t["image"], t["conversations"][1], t["family"])


def test_answers_are_balanced():
    fonts = scenes.Fonts(scenes.discover_fonts())
    rows = scenes.build_split("train", 1400, 0, SIZE, fonts, [f for f in scenes.FAMILIES if f != "easyvqa"]).rows
    by = {}
    for r in rows:
        by.setdefault(r["kind"], Counter())[r["conversations"][1]["value"]] += 1
    for kind in ("relation", "existence", "two_image/both"):
        assert abs(by[kind]["yes"] - by[kind]["no"]) <= 2, by[kind]
    assert abs(by["two_image/more"]["first"] - by["two_image/more"]["second"]) <= 2
    counts = by["count/all"] + by["count/colour"] + by["count/shape"]
    assert set(counts) == set("012345") and min(counts.values()) >= 0.05 * sum(counts.values()), counts
    assert set(by["position/colour"]) == set(scenes.COLORS) and set(by["position/shape"]) == set(scenes.SHAPES)
    assert len(scenes.WORDS) >= 100 and len(by["text"]) >= 100
    assert len({r["conversations"][0]["value"] for r in rows if r["kind"] == "existence"}) > 100


def test_fonts_found_and_fallback():
    found = scenes.discover_fonts()
    assert len(found) >= scenes.MIN_FONTS and len({f.name for f in found}) == len(found)
    assert scenes.discover_fonts(dirs=[]) == [scenes.discover_fonts(dirs=[])[0]] * scenes.MIN_FONTS
    fallback = scenes.Fonts(scenes.discover_fonts(dirs=[]))
    (row,) = scenes.build_split("test", 1, 0, SIZE, fallback, ["text"]).rows
    assert row["family"] == "text"


def test_scorer_figures(tmp_path):
    def row(i, family, answer, image="a.png"):
        return {"id": f"q{i}", "image": image, "family": family, "kind": family,
                "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": answer}]}

    rows = [row(0, "count", "3"), row(1, "count", "2"), row(2, "text", "apple"), row(3, "existence", "yes"),
            row(4, "caption", "There are 3 shapes, from left to right: a red circle, a red circle and a blue star."),
            row(5, "two_image", "first", ["a.png", "b.png"])]
    answers = {"q0": "3.", "q1": "two", "q2": " Apple ", "q4": "Two red circles and a green star.", "q5": "first"}
    report = scenes_eval.score(rows, answers)
    assert report["families"]["count"] == {"n": 2, "score": 0.5}
    assert report["families"]["text"]["score"] == 1.0 and report["families"]["existence"]["score"] == 0.0
    assert report["families"]["caption"]["score"] == pytest.approx(0.6667, abs=1e-4)  # 2 of 3 pairs named
    assert report["missing"] == 1 and report["n"] == 6
    assert report["families"]["existence"] == {"n": 1, "score": 0.0, "answered_yes": 0.0}  # unanswered: not "yes"
    yes_no = [row(6, "relation", "no"), row(7, "relation", "yes"), row(8, "relation", "no"), row(9, "relation", "no")]
    said = scenes_eval.score(yes_no, {"q6": "Yes.", "q7": "yes", "q8": "no", "q9": "YES"})["families"]["relation"]
    assert said == {"n": 4, "score": 0.5, "answered_yes": 0.75}  # scores like a coin, answers mostly "yes"
    assert report["overall"] == pytest.approx((1 + 0 + 1 + 0 + 2 / 3 + 1) / 6, abs=1e-4)

    qfile = tmp_path / "test.json"
    qfile.write_text(json.dumps(rows))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n"
                                                    for k, v in answers.items()))
    assert scenes_eval.main(["--questions", str(qfile), "--answers", str(tmp_path / "answers.jsonl"),
                             "--out", str(tmp_path / "r.json"), "--to-questions", str(tmp_path / "q.jsonl")]) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == report
    single = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    multi = [json.loads(x) for x in (tmp_path / "q.multi.jsonl").read_text().splitlines()]
    assert [q["question_id"] for q in single] == ["q0", "q1", "q2", "q3", "q4"] and single[0]["text"] == "Q?"
    assert multi == [{"question_id": "q5", "image": ["a.png", "b.png"], "text": "<image>\nQ?", "answer": "first",
                      "category": "two_image"}]


def test_demo_examples_give_the_web_ui_one_example_per_family(data, tmp_path, monkeypatch):
    from serve.gradio_web_server import example_rows

    demo = tmp_path / "demo"
    demo.mkdir()
    examples = scenes.demo_examples(data, demo)
    assert [e["text"] for e in examples] and all("<image>" not in e["text"] for e in examples)
    manifest = json.loads((demo / "manifest.json").read_text())
    families = {manifest[e["files"][0]]["family"] for e in examples}
    assert families == set(scenes.FAMILIES) - {"easyvqa"}
    pair = next(e for e in examples if e["files"][0].startswith("scenes-two_image"))
    assert pair["files"] == ["scenes-two_image-1.png", "scenes-two_image-2.png"]
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "examples.json").write_text(json.dumps(examples))
    monkeypatch.setenv("LLAVA_ASSETS", str(tmp_path))
    rows = example_rows()
    assert [r[0]["text"] for r in rows] == [e["text"] for e in examples]  # photos/easy-VQA files absent here
    assert rows[[e["files"] for e in examples].index(pair["files"])][0]["files"] == [
        str(demo / "scenes-two_image-1.png"), str(demo / "scenes-two_image-2.png")]


def diag_questions(data, variant: str):
    """bench.scenes_relation_diag's training questions for `variant`: (question, answer, the objects it names)."""
    from bench import scenes_relation_diag as diag

    described = load(data, "scenes-train.json")
    rows = diag.training_rows(data, variant, seed=1, views=diag.Views(data, "original", data / "unused"))
    assert rows and all(Path(r["image"]).is_file() for r in rows)
    for row in rows:
        scene = scenes.scene_from_dict(described[str(Path(row["image"]).relative_to(data))])
        objs = {(o.colour, o.shape): o for o in scene.objects}
        conv = row["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            q = question({"conversations": [human]})
            yield q, gpt["value"], [objs[n] for n in named(q)]


def test_relation_diagnostic_rows_follow_from_the_scenes(data):
    """bench.scenes_relation_diag: its per-object half questions and relation questions are answered by the scene."""
    kinds = Counter()
    for q, answer, (a, *rest) in diag_questions(data, "relation+where"):
        if answer in ("left", "right", "top", "bottom"):
            kinds["where"] += 1
            axis = "x" if answer in ("left", "right") else "y"
            assert (getattr(a, axis) > SIZE / 2) == (answer in ("right", "bottom"))
            assert abs(getattr(a, axis) - SIZE / 2) >= scenes.MARGIN * SIZE
        else:
            kinds["relation"] += 1
            (b,) = rest
            rel = next(r for r, words in scenes.RELATIONS.items() if words[0] in q)
            assert scenes.holds(a, rel, b, scenes.MARGIN * SIZE) == (answer == "yes")
    assert kinds["where"] > 50 and kinds["relation"] > 50


def test_relation_diagnostic_which_questions_name_the_further_object(data):
    """relation+which: "Which is further to the left / higher up, the A or the B?" names the object the scene puts
    there, MARGIN apart, with the answer first in the question about half the time."""
    from bench import scenes_relation_diag as diag

    first = Counter()
    for q, answer, objs in diag_questions(data, "relation+which"):
        if not q.startswith("which"):
            continue
        a, b = objs
        axis = "x" if "left" in q else "y"
        further = min((a, b), key=lambda o: getattr(o, axis))
        assert answer == f"{further.colour} {further.shape}"
        assert abs(getattr(a, axis) - getattr(b, axis)) >= scenes.MARGIN * SIZE
        first[further is a] += 1
    assert min(first.values()) > 0.3 * sum(first.values()) and sum(first.values()) > 50
    test = diag.aside_test_rows(data, 1, diag.Views(data, "original", data / "unused"), "which")
    assert test and all(r["family"] == "which" for r in test)


def test_relation_diagnostic_views_show_the_transposed_image(data, tmp_path):
    """--view both: every row shows the image and its transpose (two <image>s); questions stay about the original."""
    from bench import scenes_relation_diag as diag

    views = diag.Views(data, "both", tmp_path / "t")
    row = diag.training_rows(data, "relation", seed=1, views=views)[0]
    original, transposed = (np.asarray(Image.open(p)) for p in row["image"])
    assert np.array_equal(transposed, original.transpose(1, 0, 2))
    assert row["conversations"][0]["value"].startswith("<image>\n<image>\n")
    assert not row["conversations"][2]["value"].startswith("<image>")
    test = next(r for r in json.loads((data / "test.json").read_text()) if isinstance(r["image"], str))
    shown = diag.Views(data, "transposed", tmp_path / "t").row(test)
    assert shown["image"] == str(tmp_path / "t" / test["image"]) and shown["conversations"] == test["conversations"]


def test_position_probe_reads_a_position_only_where_one_is_encoded():
    """bench.scenes_position_probe's probe: tokens that carry their column read 'left/right' right, noise does not."""
    from bench.scenes_position_probe import probe

    rng = np.random.default_rng(0)
    n, g, d = 120, 4, 6
    centres = [[tuple(rng.uniform(0.05, 0.95, 2)) for _ in range(2)] for _ in range(n)]
    noise = rng.normal(size=(n, g * g, d))
    placed = noise.copy()
    placed[:, :, 0] += np.tile(np.arange(g), g) * 8  # column code
    placed[:, :, 1] += np.repeat(np.arange(g), g) * 8  # row code
    got, none = probe(placed, centres, 90), probe(noise, centres, 90)
    assert got["patch_column_exact"] > 0.95 and got["patch_row_exact"] > 0.95
    assert got["object_half_x"] > 0.75 and got["object_half_y"] > 0.75
    assert none["patch_column_exact"] < 0.6 and none["object_half_x"] < 0.7


def test_reworded_training_questions_keep_answers_objects_and_directions_and_avoid_held_out_words(data):
    """train.scenes.reword_rows: other wordings of the training questions, never with the held-out paraphrase set's
    words (so that set still measures unseen wordings); each question keeps its answer, the objects it names, its
    direction, its `<image>` lines and the short-answer instruction; easy-VQA rows stay as they are."""
    rows = scenes.add_questions(load(data, "train.json"), load(data, "scenes-train.json"), 6, seed=5, relations=2)
    assert scenes.reword_rows(rows, 0.0, seed=5) is rows
    out = scenes.reword_rows(rows, 1.0, seed=5)
    assert out == scenes.reword_rows(rows, 1.0, seed=5)  # deterministic
    para_questions = {question(r) for r in load(data, "paraphrase_test.json")}
    directions = {"left": "left", "right": "right", "above": "up|over|above", "below": "down|under|beneath|below",
                  "top": "top", "bottom": "bottom"}
    changed = total = 0
    for row, orig in zip(out, rows):
        if row["family"] == "easyvqa":
            assert row == orig
            continue
        assert [t["from"] for t in row["conversations"]] == [t["from"] for t in orig["conversations"]]
        for new, old in zip(row["conversations"], orig["conversations"]):
            if new["from"] == "gpt":
                assert new == old
                continue
            a, b = new["value"], old["value"]
            assert a.count("<image>\n") == b.count("<image>\n") and a.startswith("<image>" if "<image>" in b else "")
            assert a.endswith(SHORT_ANSWER) == b.endswith(SHORT_ANSWER)
            qa, qb = a.replace("<image>\n", "").lower(), b.replace("<image>\n", "").lower()
            total += 1
            changed += qa != qb
            assert not any(w in qa for w in scenes.HELD_OUT_WORDS), qa
            assert question({"conversations": [new]}) not in para_questions
            assert named(qa) == named(qb), (qa, qb)
            for word, found in directions.items():
                if re.search(rf"\b{word}(most)?\b", qb) and not named(qb):  # a position question keeps its side
                    assert re.search(rf"\b({found})", qa), (qa, qb)
            rel = [w for w in ("left", "right", "above", "below") if re.search(rf"\b{w}\b", qb)]
            if len(named(qb)) == 2 and len(rel) == 1:  # a relation keeps its direction, whatever its words
                assert re.search(rf"\b({directions[rel[0]]})", qa), (qa, qb)
    assert total > 1000 and changed > 0.6 * total
    # every held-out template has a held-out word, and no training template has one
    assert all(any(w in t.lower() for w in scenes.HELD_OUT_WORDS) for kind in scenes.TEMPLATES.values() for t in kind[1])
    assert not any(w in t.lower() for kind in scenes.TEMPLATES.values() for t in kind[0] for w in scenes.HELD_OUT_WORDS)


def test_where_rows_ask_only_relations_and_halves_each_answered_by_its_scene(data):
    """The relation warm-up's rows (train.scenes.where_rows): one per one-image scene with a relation to ask, the
    image on the first turn only, relation answers re-derived under the relation rules, which-half answers from the
    object's place; yes and no balanced."""
    described = load(data, "scenes-train.json")
    found = {k: scenes.scene_from_dict(v) for k, v in described.items()}
    rows = load(data, "train.json")
    where = scenes.where_rows(rows, described, 4, 4, seed=5)
    assert where == scenes.where_rows(rows, described, 4, 4, seed=5)
    by_id = {r["id"]: r for r in rows}
    answers, halves = Counter(), Counter()
    for row in where:
        source = by_id[row["id"].removeprefix("where-")]
        assert row["image"] == source["image"] and isinstance(row["image"], str)
        assert source["family"] not in ("caption", "easyvqa", "two_image")
        conv = row["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in conv[1:])
        n_rel = 0
        for human, gpt in zip(conv[::2], conv[1::2]):
            assert human["value"].endswith(SHORT_ANSWER)
            if check_relation_or_half(row, human, gpt, found) == "half":
                halves["x" if gpt["value"] in scenes.HALVES["x"] else "y"] += 1
            else:
                answers[gpt["value"]] += 1
                n_rel += 1
        assert 1 <= n_rel <= 4 and len(conv) // 2 <= 8
    assert len(where) > 40 and 0.4 < answers["yes"] / sum(answers.values()) < 0.6, answers
    assert halves["x"] > 20 and halves["y"] > 20, halves
