"""`python -m train.probes --out DIR [--images 300] [--card]`: the default model's figures in the formats of POPE,
ScienceQA-IMG and MME, built from easy-VQA's test images and run through the original's runners and scorers.

Promises:
- Images: `--images` test images (seeded sample) whose colour and shape their own questions reveal
  (`train.easyvqa.image_attributes`); each holds one object, "<colour> <shape>" (8 colours x 3 shapes).
- POPE-style (`DIR/pope`): per image and split one positive ("Is there a <colour> <shape> in the image?" for the
  object shown) and one negative, so each split is 50 % yes, as POPE's. The negatives follow POPE's three rules:
  random: a uniformly drawn absent object; popular: the absent object most frequent among the probe images (POPE:
  the top ground-truth objects of the dataset); adversarial: the absent object most like the one shown, sharing its
  shape or its colour (POPE: the objects that co-occur most with the ones shown; here an image holds one object,
  so co-occurrence is replaced by sharing an attribute), the most frequent such, ties drawn. Files as the
  original's: the question JSONL `{question_id, image, text, category}` and `coco/coco_pope_<split>.json` label files
  (JSONL `{question_id, image, text, label}`), scored by `llava.eval.eval_pope`.
- ScienceQA-style (`DIR/scienceqa`): per image "What shape is in the image?" (the 3 shapes) and "What color is the
  shape?" (the colour shown and 3 drawn others), options in a seeded order. `problems.json`, `pid_splits.json` and
  the runner's `llava_test_CQM-A.json` (LLaVA-1.5's layout: `<image>`, question, `A. option` lines), answered by
  `llava.eval.model_vqa_science --single-pred-prompt` and scored by `llava.eval.eval_science_qa` (a reply that is
  not a letter is FAILED, as the original counts it).
- MME-style (`DIR/MME`): categories existence ("Is there a <shape> in this image?"), color ("Is the <shape>
  <colour>?") and count ("Is there one <shape>..." / "Are there two <shape>s..."); one yes and one no question per
  image, adjacent, with MME's " Please answer yes or no." and LLaVA's short-answer line, in MME's folder layout;
  converted as `scripts/convert_answer_to_mme.py` does and scored by `llava.eval.eval_mme --partial` (acc, acc+,
  score per category; easy-VQA has no posters, scenes, OCR... so the Perception total covers 3 of its 10).
- The runners are called through their command lines' `main` with the argv `DIR/commands.sh` records (one loaded
  model shared by the three runs; `--scores-only` scores the answers already there), greedy, the model's own
  conversation (`chatml_direct`), the original's default `--max_new_tokens`. Writes `DIR/summary.json`,
  `DIR/probes.md` (table) and `DIR/probes.png` (chart); `--card` also replaces the section of
  assets/default/MODEL_CARD.md and copies the chart next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from train import easyvqa

SPLITS = ("adversarial", "popular", "random")  # the order of the original's llava_pope_test.jsonl
MME_KINDS = ("existence", "color", "count")
LETTERS = "ABCDE"
CARD_HEADING = "## Probes in the formats of POPE, ScienceQA and MME"
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "default"


def probe_images(n: int, seed: int) -> list[tuple[int, str, str, str]]:
    """(image id, path, colour, shape) of `n` seeded test images whose colour and shape are known, by id."""
    known = []
    for image_id, qs in easyvqa.by_image(easyvqa.questions("test")).items():
        colour, shape = easyvqa.image_attributes(qs)
        if colour and shape:
            known.append((image_id, qs[0].image, colour, shape))
    if n < len(known):
        known = sorted(random.Random(seed).sample(known, n))
    return known


# ------------------------------------------------------------------------------------------------ POPE


def pope_negative(split: str, present: tuple[str, str], frequency: Counter, rng: random.Random) -> tuple[str, str]:
    """The absent (colour, shape) an image is asked about in `split` (see the module docstring)."""
    absent = [(c, s) for c in easyvqa.COLORS for s in easyvqa.SHAPES if (c, s) != present]
    if split == "random":
        return rng.choice(absent)
    if split == "adversarial":
        absent = [o for o in absent if o[0] == present[0] or o[1] == present[1]]
    rng.shuffle(absent)  # ties in frequency drawn
    return max(absent, key=lambda o: frequency[o])


def pope_files(images, root: Path, seed: int) -> None:
    frequency = Counter((c, s) for _, _, c, s in images)
    questions, labels = [], {split: [] for split in SPLITS}
    for split in SPLITS:
        rng = random.Random(f"{seed}-{split}")
        for image_id, path, colour, shape in images:
            negative = pope_negative(split, (colour, shape), frequency, rng)
            for (c, s), label in (((colour, shape), "yes"), (negative, "no")):
                qid = len(questions) + 1
                text = f"Is there a {c} {s} in the image?"
                image = os.path.basename(path)
                questions.append({"question_id": qid, "image": image, "text": f"{text}\n{easyvqa.SHORT_ANSWER}",
                                  "category": split})
                labels[split].append({"question_id": qid, "image": image, "text": text, "label": label})
    _jsonl(root / "llava_pope_test.jsonl", questions)
    for split, rows in labels.items():
        _jsonl(root / "coco" / f"coco_pope_{split}.json", rows)


# ------------------------------------------------------------------------------------------------ ScienceQA


def science_files(images, root: Path, seed: int) -> None:
    rng = random.Random(f"{seed}-scienceqa")
    problems, runner_rows = {}, []
    for image_id, path, colour, shape in images:
        asks = (("shape", "What shape is in the image?", shape, list(easyvqa.SHAPES)),
                ("color", "What color is the shape?", colour,
                 [colour, *rng.sample([c for c in easyvqa.COLORS if c != colour], 3)]))
        for kind, question, truth, choices in asks:
            rng.shuffle(choices)
            pid = f"{image_id}-{kind}"
            image = os.path.basename(path)
            problems[pid] = {"question": question, "choices": choices, "answer": choices.index(truth), "hint": "",
                             "image": image, "task": "closed choice", "grade": "", "subject": "easy-VQA",
                             "topic": kind, "category": kind, "skill": kind, "lecture": "", "solution": "",
                             "split": "test"}
            options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
            runner_rows.append({"id": pid, "image": image, "conversations": [
                {"from": "human", "value": f"<image>\n{question}\n{options}"},
                {"from": "gpt", "value": LETTERS[choices.index(truth)]}]})
    _json(root / "problems.json", problems)
    _json(root / "pid_splits.json", {"test": list(problems)})
    _json(root / "llava_test_CQM-A.json", runner_rows)


# ------------------------------------------------------------------------------------------------ MME


def mme_files(images, root: Path, seed: int) -> None:
    rng = random.Random(f"{seed}-mme")
    data = root / "MME_Benchmark_release_version"
    questions = []
    for kind in MME_KINDS:
        (data / kind).mkdir(parents=True, exist_ok=True)
        for image_id, path, colour, shape in images:
            other_shape = rng.choice([s for s in easyvqa.SHAPES if s != shape])
            other_colour = rng.choice([c for c in easyvqa.COLORS if c != colour])
            pair = {"existence": (f"Is there a {shape} in this image?", f"Is there a {other_shape} in this image?"),
                    "color": (f"Is the {shape} {colour}?", f"Is the {shape} {other_colour}?"),
                    "count": (f"Is there one {shape} in this image?", f"Are there two {shape}s in this image?")}[kind]
            name = f"{image_id}.png"
            link = data / kind / name
            if not link.exists():
                try:
                    link.symlink_to(path)
                except OSError:
                    shutil.copy(path, link)
            lines = []
            for question, truth in zip(pair, ("Yes", "No")):
                lines.append(f"{question} Please answer yes or no.\t{truth}\n")
                questions.append({"question_id": f"{kind}/{name}", "image": f"{kind}/{name}",
                                  "text": f"{question} Please answer yes or no.\n{easyvqa.SHORT_ANSWER}",
                                  "category": kind})
            (data / kind / f"{image_id}.txt").write_text("".join(lines))
    _jsonl(root / "llava_mme.jsonl", questions)


# ------------------------------------------------------------------------------------------------ running


def commands(out: Path, image_folder: str, model: str, conv: str) -> dict[str, list[list[str]]]:
    """The command lines (module, argv) of each benchmark, as the original's scripts/v1_5/eval/*.sh run them."""
    p, s, m = out / "pope", out / "scienceqa", out / "MME"
    common = ["--model-path", model, "--temperature", "0", "--conv-mode", conv]
    return {
        "pope": [["llava.eval.model_vqa_loader", *common, "--question-file", f"{p}/llava_pope_test.jsonl",
                  "--image-folder", image_folder, "--answers-file", f"{p}/answers/{model}.jsonl"],
                 ["llava.eval.eval_pope", "--annotation-dir", f"{p}/coco", "--question-file",
                  f"{p}/llava_pope_test.jsonl", "--result-file", f"{p}/answers/{model}.jsonl"]],
        "scienceqa": [["llava.eval.model_vqa_science", *common, "--question-file", f"{s}/llava_test_CQM-A.json",
                       "--image-folder", image_folder, "--answers-file", f"{s}/answers/{model}.jsonl",
                       "--single-pred-prompt"],
                      ["llava.eval.eval_science_qa", "--base-dir", str(s), "--result-file",
                       f"{s}/answers/{model}.jsonl", "--output-file", f"{s}/answers/{model}_output.jsonl",
                       "--output-result", f"{s}/answers/{model}_result.json"]],
        "mme": [["llava.eval.model_vqa_loader", *common, "--question-file", f"{m}/llava_mme.jsonl",
                 "--image-folder", f"{m}/MME_Benchmark_release_version", "--answers-file",
                 f"{m}/answers/{model}.jsonl"],
                ["scripts/convert_answer_to_mme.py", "--experiment", model, "--data-path",
                 f"{m}/MME_Benchmark_release_version", "--answers-dir", f"{m}/answers", "--out-dir",
                 f"{m}/eval_tool/answers"],
                ["llava.eval.eval_mme", "--results_dir", f"{m}/eval_tool/answers/{model}", "--partial"]],
    }


def shell_line(cmd: list[str]) -> str:
    head = ["python", cmd[0]] if cmd[0].endswith(".py") else ["python", "-m", cmd[0]]
    return " ".join(shlex.quote(a) for a in head + cmd[1:])


def run_command(cmd: list[str], loaded):
    """Run one recorded command line in this process (runners share `loaded`); returns what its main returns."""
    import importlib
    import runpy

    if cmd[0].endswith(".py"):
        module = runpy.run_path(str(Path(__file__).resolve().parent.parent / cmd[0]), run_name="probes")
        return module["main"](cmd[1:])
    main = importlib.import_module(cmd[0]).main
    if cmd[0].startswith("llava.eval.model_vqa"):
        return main(cmd[1:], loaded=loaded)
    return main(cmd[1:])


def summarize(scores: dict, n_images: int, seconds: dict, precision: str) -> dict:
    pope = {split: {k: scores["pope"][split][k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
            for split in SPLITS}
    return {"images": n_images, "precision": precision, "seconds": seconds, "pope": pope,
            "scienceqa": scores["scienceqa"],
            "mme": {k: v for k, v in scores["mme"]["categories"].items()},
            "mme_perception_partial": scores["mme"]["Perception"]}


def markdown(summary: dict) -> str:
    n = summary["images"]
    lines = [f"{n} easy-VQA test images ({summary['precision']}).", "",
             "| probe | split / category | questions | accuracy | precision | recall | F1 | yes ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for split in SPLITS:
        s = summary["pope"][split]
        lines.append(f"| POPE-style | {split} | {2 * n} | {100 * s['accuracy']:.1f} | {100 * s['precision']:.1f} | "
                     f"{100 * s['recall']:.1f} | {100 * s['f1']:.1f} | {100 * s['yes_ratio']:.1f} |")
    lines += ["", "| probe | split / category | questions | accuracy | accuracy+ | score |",
              "|---|---|---|---|---|---|"]
    sq = summary["scienceqa"]
    lines.append(f"| ScienceQA-style | shape (3 options) + colour (4 options), letters | {sq['count']} | "
                 f"{sq['acc']:.1f} (FAILED: {sq['failed']}) | | |")
    for kind, s in summary["mme"].items():
        lines.append(f"| MME-style | {kind} | {2 * n} | {s['acc']:.1f} | {s['acc_plus']:.1f} | {s['score']:.1f} |")
    lines.append(f"| MME-style | Perception, {len(summary['mme'])} of MME's 10 categories | | | | "
                 f"{summary['mme_perception_partial']:.1f} |")
    replies = ", ".join(f'"{k}" {v}' for k, v in sq.get("replies", {}).items())
    lines += ["", "Reading: the yes/no probes are what the model was trained on (easy-VQA's questions, though not "
              "these phrasings); POPE's three negative rules change precision and the yes ratio, not recall (the "
              "positives are the same questions in every split). MME's count pairs ask for a number easy-VQA never "
              "asks about. ScienceQA-style is outside its training: it never saw lettered options, and the "
              f"single-prediction prompt gets replies {replies} (a reply that is not a letter is FAILED under the "
              "original's rule; chance is "
              "about 29 %)."]
    return "\n".join(lines) + "\n"


def chart(summary: dict, path: Path) -> None:
    """A grouped bar chart of the three probes (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 1, 3]})
    ax = axes[0]
    metrics = ("accuracy", "f1", "yes_ratio")
    for j, m in enumerate(metrics):
        vals = [100 * summary["pope"][s][m] for s in SPLITS]
        bars = ax.bar([i + 0.27 * (j - 1) for i in range(len(SPLITS))], vals, 0.27, label=m.replace("_", " "))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(SPLITS)), SPLITS)
    ax.set_title("POPE-style yes/no")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    bars = ax.bar(["letters"], [summary["scienceqa"]["acc"]], 0.5, color="tab:purple")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_title("ScienceQA-style")
    ax = axes[2]
    kinds = list(summary["mme"])
    for j, m in enumerate(("acc", "acc_plus")):
        vals = [summary["mme"][k][m] for k in kinds]
        bars = ax.bar([i + 0.35 * (j - 0.5) for i in range(len(kinds))], vals, 0.35,
                      label={"acc": "accuracy", "acc_plus": "accuracy+"}[m])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_title("MME-style pairs")
    ax.legend(fontsize=7, loc="lower left")
    for ax in axes:
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
    fig.suptitle(f"Embedded default model, {summary['images']} easy-VQA test images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_card(card: Path, table: str, command: str, png: Path) -> None:
    """Replace (or append) the model card's probes section; the chart is copied next to the card."""
    shutil.copy(png, card.parent / "probes.png")
    section = "\n".join([
        CARD_HEADING, "",
        "Easy-VQA test images asked in the formats of three of LLaVA's benchmarks, answered by the original's "
        "runners and scored by its scorers (POPE-style negatives: random, popular, adversarial; ScienceQA-style "
        "lettered options with the single-prediction prompt; MME-style one yes and one no question per image). "
        "Rules and files: `train/probes.py`. Reproduce (files, answers, scores, this table and chart):", "",
        f"```\n{command}\n```", "", table, "![probes](probes.png)", ""])
    text = card.read_text()
    start = text.find(CARD_HEADING)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start].rstrip() + ("\n\n" + text[end + 1:] if end >= 0 else "")
    card.write_text(text.rstrip() + "\n\n" + section)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m train.probes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=300, help="easy-VQA test images (seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-path", default="default")
    p.add_argument("--conv-mode", default="chatml_direct")
    p.add_argument("--scores-only", action="store_true",
                   help="score the answers files already in --out (no model; table, chart and card again)")
    p.add_argument("--card", action="store_true", help="write the section of assets/default/MODEL_CARD.md")
    args = p.parse_args(argv)
    out = args.out.resolve()
    images = probe_images(args.images, args.seed)
    image_folder = os.path.dirname(images[0][1])
    pope_files(images, out / "pope", args.seed)
    science_files(images, out / "scienceqa", args.seed)
    mme_files(images, out / "MME", args.seed)
    cmds = commands(out, image_folder, args.model_path, args.conv_mode)
    (out / "commands.sh").write_text("\n".join(shell_line(c) for group in cmds.values() for c in group) + "\n")

    summary_path = out / "summary.json"
    if args.scores_only:
        previous = json.loads(summary_path.read_text())
        lm, seconds, precision = None, previous["seconds"], previous["precision"]
    else:
        from llava.loading import load_model

        lm = load_model(args.model_path, dtype="auto", quantization="auto")  # the runners' defaults
        from llava.hardware import cpu_info

        cpu = cpu_info()
        precision = (f"{str(lm.dtype).removeprefix('torch.')}, quantization {lm.quantization or 'none'} (the "
                     f"runners' `--dtype auto --quantization auto` on {cpu.model}, torch {cpu.torch_capability}, "
                     f"native bf16: {cpu.native_bf16}), --model-path {args.model_path}")
        seconds = {}
    scores = {}
    for name, group in cmds.items():
        if not args.scores_only:
            t0 = time.perf_counter()
            answers = Path(group[0][group[0].index("--answers-file") + 1])
            if answers.exists():
                answers.unlink()  # a fresh run (the runners would resume a partial file)
            run_command(group[0], lm)
            seconds[name] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {seconds[name]} s", file=sys.stderr)
        for cmd in group[1:]:
            scores[name] = run_command(cmd, lm)
    sqa_out = json.loads(Path(cmds["scienceqa"][1][cmds["scienceqa"][1].index("--output-file") + 1]).read_text())
    scores["scienceqa"]["failed"] = sum(r["parsed_ans"] == "FAILED" for r in sqa_out["incorrect"])
    replies = Counter(r["pred"] for r in sqa_out["correct"] + sqa_out["incorrect"])
    scores["scienceqa"]["replies"] = dict(replies.most_common(5))
    summary = summarize(scores, len(images), seconds, precision)
    summary_path.write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (out / "probes.md").write_text(table)
    chart(summary, out / "probes.png")
    print(table)
    if args.card:
        command = f"python -m train.probes --out {args.out} --images {args.images} --card"
        write_card(ASSETS / "MODEL_CARD.md", table, command, out / "probes.png")
    return summary


if __name__ == "__main__":
    main()
