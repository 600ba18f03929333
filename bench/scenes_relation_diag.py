"""Why relation questions stay at chance (issue 14): train a scenes model on relation questions alone, or with an
easier per-object question beside them, and score relation (test + paraphrases) and the per-object question.

    python -m bench.scenes_relation_diag --data runs/build/scenesB/data --init runs/build/default/stage2b \
        --out runs/diag/where --variant relation+where --max-minutes 30

Variants (training rows: every one-image training scene of `--data` that has a relation to ask):
- relation        up to 4 relation questions per scene (the generator's training templates, independent turns)
- relation+where  the same, plus up to 4 "Is the red circle in the left or the right half of the image?" questions
                  about single objects (answer left/right/top/bottom; objects within 10 % of the centre line skipped):
                  reading one object's position is a step of every relation question, and far easier to learn alone
- relation+which  the same, plus up to 4 "Which is further to the left, the red circle or the blue square?" /
                  "Which is higher up, ...?" questions (answer the object's name, "red circle"; the pair MARGIN apart
                  on that axis, their order in the question random). A yes/no relation answer is an XOR: it flips with
                  the relation word and with the order of the two objects, so no single position correlates with it and
                  training can sit on a plateau at chance; naming the further-left object has no such flip
`--tune full` trains every LLM weight (starting from the init's merged export, <init>/hf) instead of LoRA.
`--layers '[0, 6, -2]'` starts instead from a new base with those vision feature layers (a new projector, a new LoRA;
no --init): hidden state 0 is DINOv2's patch embedding plus its position embedding, so each token then carries its
own column and row; run it beside the same with the default '[6, -2]' to compare.
`--pos2d zero|sincos` continues --init on a base whose projector is `mlp2x_gelu_pos2d` (llava/projector.py): the init's
projector and adapter, plus a new trained embedding per grid cell added to the image tokens, starting at zero or at
fixed 2-D sine/cosine codes (`--pos2d-rms`, default 0.1; the init's projected tokens have RMS ~0.24).
`--view transposed|both` shows the model the transposed image (so it reads the picture column by column) or the image
and its transpose as two `<image>`s, questions and answers unchanged (about the original image). The recipe's way to
the same end is a `_rowcol` projector (llava/projector.py: the one image's tokens by rows, then by columns, one encoder
pass): give `--base` a base assembled with it (e.g. `python -m train.build_default --recipe scenes --projector
mlp2x_gelu_rowcol` writes one to runs/scenes/base) and keep `--view original`.

Writes <out>/report.json: the run's steps, loss curve summary, and scores. A diagnostic, not part of the recipe.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file, save_file

from llava.assemble import assemble
from llava.projector import sincos_2d
from train import scenes
from train.build_default import default_spec, evaluate_rows
from train.train import TrainConfig, run

where_questions = scenes.half_questions  # "Is the red circle in the left or the right half of the image?"


WHICH = {"x": ["Which is further to the left, the {a} or the {b}?", "Which one is more to the left: the {a} or the {b}?"],
         "y": ["Which is higher up, the {a} or the {b}?", "Which one is nearer the top: the {a} or the {b}?"]}


def which_questions(rng: random.Random, scene: scenes.Scene, k: int) -> list[tuple[str, str]]:
    """Up to k (question, answer) pairs naming the further-left or higher of two uniquely named objects."""
    unique = scenes.unique_objects(scene)
    margin = scenes.MARGIN * scene.size
    options = [(a, b, axis) for i, a in enumerate(unique) for b in unique[i + 1:] for axis in WHICH
               if abs(getattr(a, axis) - getattr(b, axis)) >= margin]
    rng.shuffle(options)
    out = []
    for a, b, axis in options[:k]:
        first = min((a, b), key=lambda o: getattr(o, axis))  # smaller x: further left; smaller y: higher up
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        name = lambda o: f"{o.colour} {o.shape}"  # noqa: E731
        out.append((rng.choice(WHICH[axis]).format(a=name(a), b=name(b)), name(first)))
    return out


def relation_questions(rng: random.Random, scene: scenes.Scene, k: int, paraphrase: bool = False) -> list[tuple[str, str]]:
    """Up to k relation (question, answer) pairs, drawn as train.scenes.scene_questions draws them."""
    out = []
    for _ in range(k):
        qs = [q for q in scenes.scene_questions(rng, scene, 20) if q.kind == "relation"]
        if not qs:
            break
        q = qs[0]
        template = rng.choice(scenes.TEMPLATES["relation"][int(paraphrase)])
        out.append((template.format(**scenes.fields(q.slots, paraphrase)), q.answer))
    return out


def turns(pairs: list[tuple[str, str]], images: int = 1) -> list[dict]:
    conv = []
    for i, (q, a) in enumerate(pairs):
        conv += [{"from": "human", "value": scenes.human(q, images if i == 0 else 0, True)}, {"from": "gpt", "value": a}]
    return conv


class Views:
    """What the model is shown of a scene image: the image itself, its transpose (rows become columns: the LLM then
    reads the image column after column), or both (two `<image>`s, the original first). Transposed copies are
    written once under `root`; questions and answers stay about the original image."""

    def __init__(self, data: Path, view: str, root: Path):
        self.data, self.view, self.root = data, view, root

    @property
    def count(self) -> int:
        return 2 if self.view == "both" else 1

    def transposed(self, rel: str) -> str:
        out = self.root / rel
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(self.data / rel) as im:
                im.transpose(Image.Transpose.TRANSPOSE).save(out)
        return str(out)

    def image(self, rel: str) -> str | list[str]:
        if self.view == "original":
            return str(self.data / rel)
        if self.view == "transposed":
            return self.transposed(rel)
        return [str(self.data / rel), self.transposed(rel)]

    def row(self, row: dict) -> dict:
        """A test row of the generator shown this way."""
        conv = [dict(t) for t in row["conversations"]]
        conv[0]["value"] = "<image>\n" * (self.count - 1) + conv[0]["value"]
        return {**row, "image": self.image(row["image"]), "conversations": conv}


def training_rows(data: Path, variant: str, seed: int, views: Views) -> list[dict]:
    described = json.loads((data / "scenes-train.json").read_text())
    rows = []
    for image, d in sorted(described.items()):
        scene = scenes.scene_from_dict(d)
        if len(scene.objects) < 2:
            continue
        rng = random.Random(f"diag:{seed}:{image}")
        pairs = relation_questions(rng, scene, 4)
        if not pairs:
            continue
        if variant != "relation":
            pairs += (where_questions if variant == "relation+where" else which_questions)(rng, scene, 4)
            rng.shuffle(pairs)
        rows.append({"id": f"diag-{image}", "image": views.image(image), "conversations": turns(pairs, views.count)})
    return rows


def aside_test_rows(data: Path, seed: int, views: Views, kind: str = "where") -> list[dict]:
    """One `where` (or `which`) question per test scene that has one to ask."""
    make = where_questions if kind == "where" else which_questions
    described = json.loads((data / "scenes-test.json").read_text())
    rows = []
    for image, d in sorted(described.items()):
        rng = random.Random(f"diag:{seed}:test:{image}")
        for i, (q, a) in enumerate(make(rng, scenes.scene_from_dict(d), 1)):
            rows.append({"id": f"{kind}-{image}-{i}", "image": views.image(image),
                         "conversations": turns([(q, a)], views.count), "family": kind, "kind": kind})
    return rows


def evaluate(model: Path, rows: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows))
    r = evaluate_rows(model, out / "rows.json", out, max_new_tokens=8)
    return {"overall": r["overall"], "n": r["n"], "by_axis": by_axis(rows, out / "answers.jsonl")}


def by_axis(rows: list[dict], answers: Path) -> dict:
    """Exact match split by the axis a question asks about: x (left/right) or y (top/bottom, above/below)."""
    gold = {r["id"]: (r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in rows}
    hits: dict[str, list[int]] = {"x": [], "y": []}
    for line in answers.read_text().splitlines():
        a = json.loads(line)
        question, answer = gold[a["question_id"]]
        axis = "x" if any(w in question for w in ("left", "right")) else "y"  # "which": left / higher, top
        hits[axis].append(int(a["text"].strip().lower().rstrip(".") == answer))
    return {axis: {"score": round(sum(h) / len(h), 4), "n": len(h)} for axis, h in hits.items() if h}


def pos2d_base(out: Path, init: Path) -> Path:
    """The init's base model with a `_pos2d` projector (same encoder, layers and LLM)."""
    if not (out / "config.json").is_file():
        layers = json.loads((init / "hf" / "config.json").read_text())["vision_feature_layer"]
        assemble(default_spec(layers, "mlp2x_gelu_pos2d"), out)
    return out


def pos2d_init(out: Path, init: Path, how: str, rms: float) -> Path:
    """A stage folder to continue from: the init's adapter and projector, plus the position embedding's start for
    `sincos` (for `zero` the training run starts it at zero itself: train.train.load_projector)."""
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(init / "projector.safetensors")
    if how == "sincos":
        width = state["model.multi_modal_projector.linear_2.weight"].shape[0]
        grid = int(json.loads((init / "hf" / "config.json").read_text())["image_seq_length"] ** 0.5)  # CLS dropped
        state["model.multi_modal_projector.position_embedding"] = sincos_2d(grid, width, rms).contiguous()
    save_file(state, out / "projector.safetensors")
    if (init / "adapter").is_dir() and not (out / "adapter").is_dir():
        shutil.copytree(init / "adapter", out / "adapter")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a scenes data folder (python -m train.scenes)")
    p.add_argument("--init", type=Path, help="the stage the run continues (projector + adapter, hf/)")
    p.add_argument("--layers", type=json.loads, help="JSON vision feature layer(s): start from a new base instead")
    p.add_argument("--base", type=Path, help="the assembled base model (default: <init>/../base)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", choices=["relation", "relation+where", "relation+which"], default="relation")
    p.add_argument("--tune", choices=["lora", "full"], default="lora")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--projector-lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-minutes", type=float, default=30)
    p.add_argument("--feature-cache", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pos2d", choices=["zero", "sincos"], help="add a trained 2-D position embedding (see above)")
    p.add_argument("--pos2d-rms", type=float, default=0.1)
    p.add_argument("--view", choices=["original", "transposed", "both"], default="original",
                   help="show the image, its transpose, or both (see Views)")
    a = p.parse_args(argv)
    a.data = a.data.resolve()  # rows name their images by absolute path
    a.out.mkdir(parents=True, exist_ok=True)
    views = Views(a.data, a.view, (a.out / "transposed").resolve())  # rows name images by absolute path
    rows = training_rows(a.data, a.variant, a.seed, views)
    (a.out / "train.json").write_text(json.dumps(rows))
    if a.layers is not None:
        if not (a.out / "base" / "config.json").is_file():
            assemble(default_spec(a.layers), a.out / "base")
        start = dict(model=str(a.out / "base"), init_from=None)
    elif a.init is None:
        raise SystemExit("give --init (a stage to continue) or --layers (a new base)")
    elif a.pos2d:
        start = dict(model=str(pos2d_base(a.out / "base", a.init)), init_from=str(pos2d_init(a.out / "init", a.init, a.pos2d, a.pos2d_rms)))
    elif a.tune == "full":
        start = dict(model=str(a.init / "hf"), init_from=None)
    else:
        start = dict(model=str(a.base or a.init.parent / "base"), init_from=str(a.init))
    m = run(TrainConfig(stage="stage2", data=str(a.out / "train.json"), output_dir=str(a.out / "stage"), lr=a.lr,
                        projector_lr=a.projector_lr, epochs=1.0, tune=a.tune, independent_turns=True,
                        lora_r=a.lora_r, lora_alpha=2 * a.lora_r, export=True, max_minutes=a.max_minutes,
                        batch_size=8, logging_steps=5, save_steps=10_000,
                        feature_cache_dir=str(a.feature_cache) if a.feature_cache else None, **start))
    test = [views.row(r) for r in json.loads((a.data / "test.json").read_text()) if r["family"] == "relation"]
    para = [views.row(r) for r in json.loads((a.data / "paraphrase_test.json").read_text()) if r["family"] == "relation"]
    model = a.out / "stage" / "hf"
    report = {"variant": a.variant, "view": a.view, "tune": a.tune, "pos2d": a.pos2d, "pos2d_rms": a.pos2d_rms if a.pos2d == "sincos" else None, "init": str(a.init) if a.init else None, "layers": a.layers, "lr": a.lr, "rows": len(rows),
              "questions": sum(len(r["conversations"]) // 2 for r in rows),
              "stage": {k: m.get(k) for k in ("global_step", "seconds_per_step", "final_loss", "train_seconds")},
              "relation_test": evaluate(model, test, a.out / "eval-test"),
              "relation_paraphrase": evaluate(model, para, a.out / "eval-para"),
              "where_test": evaluate(model, aside_test_rows(a.data, a.seed, views), a.out / "eval-where")}
    if a.variant == "relation+which":
        report["which_test"] = evaluate(model, aside_test_rows(a.data, a.seed, views, "which"), a.out / "eval-which")
    (a.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
