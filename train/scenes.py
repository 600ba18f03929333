"""Synthetic scenes and questions (issue 14): counting, positions, relations, existence, printed words, image pairs,
captions and easy-VQA, written as LLaVA training data and reproducible from a seed.

Promises:
- `python -m train.scenes --out DIR --seed S --train N --test M [--image-size PX]` writes DIR/train.json,
  DIR/test.json and DIR/paraphrase_test.json: LLaVA JSON rows `{id, image, conversations, family, kind}`, one
  question each. `image` is a path relative to DIR (train.data's default image folder is the file's own folder), or
  a list of two paths for two-image rows, whose human turn then holds `<image>` twice. Beside them: the PNGs
  (DIR/images/), the scene descriptions DIR/scenes-{train,test}.json (image path -> objects, word, background;
  every answer follows from them and the image is rendered from them alone) and DIR/meta.json (seed, counts, fonts
  used, library versions).
- Scenes hold 1-5 objects (8 colours x 5 shapes, two sizes) at random positions whose bounding circles do not
  touch, on plain, noisy, striped or chequered light grounds; text scenes add one printed word (WORDS) in one of
  the fonts `discover_fonts` finds. Every sample draws from its own generator seeded by (seed, split, index): the
  same arguments, fonts and library versions give byte-identical files, with any `--workers`.
- Answers are exact and lower case: count -> a digit; position -> a colour or shape word; relation, existence and
  "both images" -> yes / no (50/50; existence negatives share the colour or the shape of an object present, POPE's
  adversarial kind); text -> the word; "more shapes" -> first / second; caption -> one sentence naming every object
  with its colour, left to right (`caption`); easy-VQA -> its own answers (rows from train.easyvqa).
- Geometry is unambiguous where a question depends on it: "leftmost"/"left of" need the two objects MARGIN apart on
  that axis, relation objects are the only ones of their colour and shape.
- paraphrase_test.json asks the test rows' questions (same images and answers; easy-VQA left out) with templates
  that never appear in train.json or test.json (the second list of every TEMPLATES entry).
- `add_questions(rows, scenes, k, seed)` (used by `train.build_default --scenes-questions`) appends up to k more
  questions about each one-image training scene as further exchanges, each of another kind and answered under the
  same rules; trained as independent turns, one image's tokens then serve k + 1 questions. A word present in the
  scene is always asked. The files written by `generate` do not change. `relations=R, halves=H` add up to R more
  relation questions and H "is the X in the left or the right half" questions (a training aid for relations);
  `half_test_rows(scenes)` asks one such question of each test scene, a diagnostic outside the test families.
- `demo_examples(data, demo)` copies the first test row of every family (easy-VQA aside) into the demo folder as
  `scenes-<family>[-n].png` (+ manifest.json entries naming the row and answer) and returns them as web UI examples
  `{"files": [names], "text": question}`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from train import easyvqa

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 220), "yellow": (235, 200, 20),
          "orange": (245, 130, 20), "purple": (140, 60, 190), "black": (25, 25, 25), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 0.075, "large": 0.115}  # radius, a fraction of the image side
BOUND = 1.15  # every shape fits in a circle of BOUND * radius (the square's corners reach 1.13)
GAP = 0.02  # least gap between bounding circles (and to a word), a fraction of the side
SEP = 0.03  # least distance of any two centres on each axis, so left-to-right and top-to-bottom orders are strict
MARGIN = 0.1  # axis distance behind "leftmost", "left of", ... (a fraction of the side)
MAX_OBJECTS = 5
WORD_SHARE = 0.25  # scenes of the count/position/relation/existence families that also carry a word
# a word's font size, a fraction of the side: at 112 px (DINOv2 patch 14) letters must span about a patch to be
# readable from the features (probe: 122 words, 34 images each: 0.13-0.17 -> 3 %, 0.22-0.30 -> 63 % after 5 epochs)
WORD_FONT = (0.22, 0.30)
BACKGROUNDS = ("plain", "noise", "stripes", "checker")
COLOUR_JITTER = 15
WORDS = tuple("""
apple bread chair table house water music river happy light night smile plant horse mouse train cloud stone sugar
paper money dream beach bird book cake door fish frog game hand kite lamp leaf lion milk moon nose park rain ring
road rose salt ship shoe snow sock soup tree wind wolf baby ball bell boat cat cow cup dog egg fox hat key pen pig
sun box car bus bag bed map cook farm gift gold hill king lake meat nest note rice seed song star sand tiger zebra
piano robot pizza lemon honey juice clock phone glass spoon knife plate money window garden winter summer spring
friend school doctor family number letter city town road ocean forest desert island bridge castle rocket planet
""".split())
WORDS = tuple(dict.fromkeys(w for w in WORDS if w not in COLORS and w not in SHAPES))  # unique, no answer words
# font files tried in this order (matplotlib bundles the DejaVu and STIX ones, so most environments find the same
# four); PIL's built-in font fills in when fewer than MIN_FONTS are found
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneralBol.ttf",
              "LiberationSans-Bold.ttf", "LiberationSerif-Bold.ttf", "LiberationMono-Bold.ttf", "FreeSansBold.ttf",
              "FreeSerifBold.ttf", "DejaVuSans.ttf", "DejaVuSerif.ttf")
MIN_FONTS, MAX_FONTS = 3, 4
PIL_DEFAULT = "pil-default"

SHORT_FAMILIES = ("count", "position", "relation", "existence", "text", "two_image")
FAMILIES = SHORT_FAMILIES + ("caption", "easyvqa")
WEIGHTS = {"count": 3, "position": 2, "relation": 2, "existence": 2, "text": 2, "two_image": 3, "caption": 1.5,
           "easyvqa": 1.5}
EXTREME = {  # direction -> (training "most", training "at", paraphrase "far")
    "left": ("leftmost", "on the far left", "furthest to the left"),
    "right": ("rightmost", "on the far right", "furthest to the right"),
    "top": ("topmost", "at the top", "highest up"),
    "bottom": ("bottommost", "at the bottom", "lowest down"),
}
RELATIONS = {"left": ("to the left of", "on the left side of"), "right": ("to the right of", "on the right side of"),
             "above": ("above", "higher than"), "below": ("below", "lower than")}
TEMPLATES = {  # kind -> (training templates, held-out paraphrase templates)
    "count/all": (["How many shapes are there?", "How many shapes are in the image?", "How many objects can you see?",
                   "Count the shapes in the image."],
                  ["What is the number of figures shown in this picture?",
                   "Tell me the total number of shapes present."]),
    "count/colour": (["How many {colour} shapes are there?", "How many {colour} objects are in the image?",
                      "Count the {colour} shapes."],
                     ["What is the number of {colour} figures in this picture?",
                      "Tell me how many shapes here are {colour}."]),
    "count/shape": (["How many {shapes} are there?", "How many {shapes} are in the image?", "Count the {shapes}."],
                    ["What is the number of {shapes} in this picture?",
                     "Tell me how many {shapes} this picture contains."]),
    "position/colour": (["What color is the {most} shape?", "What is the color of the {most} object?",
                         "Which color does the shape {at} have?"],
                        ["Name the colour of the figure that is {far}.", "The figure {far} has which colour?"]),
    "position/shape": (["What shape is {at}?", "What is the {most} shape?", "Which shape is the {most} one?"],
                       ["Name the figure that is {far}.", "The figure {far} is which kind of shape?"]),
    "relation": (["Is the {a} {rel} the {b}?", "Is the {a} located {rel} the {b}?", "Is the {a} placed {rel} the {b}?"],
                 ["Does the {a} appear {rel} the {b}?", "Would you say the {a} sits {rel} the {b}?"]),
    "existence": (["Is there a {colour} {shape} in the image?", "Is there a {colour} {shape}?",
                   "Does the image contain a {colour} {shape}?", "Can you see a {colour} {shape}?"],
                  ["Is any {colour} {shape} visible in this picture?",
                   "Does this picture show a {colour} {shape} anywhere?"]),
    "text": (["What word is written in the image?", "What does the text say?", "Read the word in the image.",
              "What is the word in the image?"],
             ["Which word appears in this picture?", "Tell me the printed word."]),
    "two_image/both": (["Do both images contain {thing}?", "Is there {thing} in both images?"],
                       ["Does each of the two pictures include {thing}?", "Can {thing} be found in both pictures?"]),
    "two_image/more": (["Which image has more shapes, the first or the second?",
                        "Which of the two images contains more shapes, the first or the second?"],
                       ["Between the first and the second picture, which one shows a greater number of figures?"]),
    "two_image/colour": (["What color is the shape in the {which} image?",
                          "What is the color of the shape in the {which} image?"],
                         ["In the {which} picture, which colour does the lone figure have?"]),
    "caption": (["Describe the image.", "What is in this image?", "Describe the shapes in the image.",
                 "List the shapes you see from left to right."],
                ["Give a short description of this picture.", "Tell me what this picture shows."]),
}


class ScenesError(RuntimeError):
    """Bad generator arguments or a scene that cannot be laid out."""


# ---------------------------------------------------------------------------------------------------------- fonts
@dataclass(frozen=True)
class FontRef:
    name: str  # family and style, as the font names itself
    path: str | None  # None: PIL's built-in font
    source: str  # matplotlib | system | pil | user


def _font_dirs(use_fc_list: bool) -> list[tuple[str, Path]]:
    dirs = []
    try:
        import matplotlib

        dirs.append(("matplotlib", Path(matplotlib.get_data_path()) / "fonts" / "ttf"))
    except ImportError:
        pass
    if use_fc_list and shutil.which("fc-list"):
        out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True).stdout
        dirs += [("system", d) for d in sorted({Path(f).parent for f in out.splitlines() if f.strip()})]
    dirs += [("system", Path(d)) for d in ("/usr/share/fonts", "/usr/local/share/fonts")]
    return dirs


def discover_fonts(dirs: list[tuple[str, Path]] | None = None, max_fonts: int = MAX_FONTS) -> list[FontRef]:
    """Up to `max_fonts` fonts of FONT_FILES found in `dirs` (default: matplotlib's bundled fonts, fc-list's folders,
    /usr/share/fonts), in FONT_FILES order; PIL's built-in font fills in up to MIN_FONTS (the deterministic
    fallback)."""
    dirs = _font_dirs(use_fc_list=True) if dirs is None else dirs
    found: list[FontRef] = []
    for name in FONT_FILES:
        for source, d in dirs:
            hits = sorted(d.rglob(name)) if d.is_dir() else []
            if hits:
                font = ImageFont.truetype(str(hits[0]), 12)
                found.append(FontRef(" ".join(font.getname()), str(hits[0]), source))
                break
        if len(found) == max_fonts:
            break
    while len(found) < MIN_FONTS:  # PIL's built-in typeface, repeated: one font, but the same on every machine
        found.append(FontRef(f"{' '.join(ImageFont.load_default(12).getname())} (PIL built-in)", None, "pil"))
    return found


class Fonts:
    """FreeType fonts by (index, pixel size), loaded once per process."""

    def __init__(self, refs: list[FontRef]):
        self.refs = refs
        self._loaded: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}

    def get(self, index: int, size: int) -> ImageFont.FreeTypeFont:
        if (index, size) not in self._loaded:
            path = self.refs[index].path
            self._loaded[index, size] = ImageFont.load_default(size) if path is None else ImageFont.truetype(path, size)
        return self._loaded[index, size]


# ---------------------------------------------------------------------------------------------------------- scenes
@dataclass
class Obj:
    colour: str
    shape: str
    size: str  # small | large
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    r: float  # radius: the shape's vertices lie on this circle (the square's half side is 0.8 r)
    rgb: tuple[int, int, int]  # the colour's RGB, jittered

    @property
    def bound(self) -> float:
        return BOUND * self.r


@dataclass
class Word:
    text: str
    font: int  # index into meta.json's fonts
    size: int  # pixels
    x: float  # where the text is drawn (PIL's left-ascender anchor)
    y: float
    box: tuple[float, float, float, float]  # inked box (x0, y0, x1, y1)
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    size: int
    background: dict  # kind, rgb, seed, and the kind's parameters
    objects: list[Obj] = field(default_factory=list)
    word: Word | None = None

    def left_to_right(self) -> list[Obj]:
        return sorted(self.objects, key=lambda o: o.x)


def scene_from_dict(d: dict) -> Scene:
    word = Word(**{**d["word"], "box": tuple(d["word"]["box"]), "rgb": tuple(d["word"]["rgb"])}) if d["word"] else None
    return Scene(d["size"], d["background"], [Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"]], word)


def _jitter(rng: random.Random, rgb) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)


def _background(rng: random.Random) -> dict:
    kind = rng.choice(BACKGROUNDS)
    bg = {"kind": kind, "rgb": [rng.randint(200, 250) for _ in range(3)], "seed": rng.getrandbits(32)}
    if kind == "noise":
        bg.update(cell=rng.choice((1, 2, 3)), amount=rng.randint(6, 18))
    elif kind in ("stripes", "checker"):
        bg.update(cell=rng.randint(5, 14), delta=rng.randint(12, 30), angle=rng.choice((0, 45, 90, 135)))
    return bg


def _clear_of_box(box, x: float, y: float, reach: float) -> bool:
    dx = max(box[0] - x, 0, x - box[2])
    dy = max(box[1] - y, 0, y - box[3])
    return math.hypot(dx, dy) >= reach


def _word(rng: random.Random, fonts: Fonts, size: int, text: str | None = None, font: int | None = None) -> Word:
    text = text if text is not None else rng.choice(WORDS)
    font = font if font is not None else rng.randrange(len(fonts.refs))
    px = round(size * rng.uniform(*WORD_FONT))
    while True:  # shrink until the word fits in 90 % of the width
        b = fonts.get(font, px).getbbox(text)
        if b[2] - b[0] <= 0.9 * size or px <= 6:
            break
        px -= 1
    pad = GAP * size
    x = rng.uniform(pad - b[0], size - pad - b[2])
    y = rng.uniform(pad - b[1], size - pad - b[3])
    x, y = round(x, 1), round(y, 1)
    dark = rng.choice(((10, 10, 10), (40, 40, 40), (20, 20, 60)))
    return Word(text, font, px, x, y, (x + b[0], y + b[1], x + b[2], y + b[3]), dark)


def _place(rng: random.Random, specs: list[tuple[str, str, str]], size: int, word: Word | None,
           tries: int = 60) -> list[Obj] | None:
    """Objects for (colour, shape, size) specs at random positions, or None when one does not fit."""
    objs: list[Obj] = []
    gap, sep = GAP * size, SEP * size
    for colour, shape, sz in specs:
        r = SIZES[sz] * size
        reach = BOUND * r
        for _ in range(tries):
            x = round(rng.uniform(reach + gap, size - reach - gap), 1)
            y = round(rng.uniform(reach + gap, size - reach - gap), 1)
            if all(math.hypot(x - o.x, y - o.y) >= reach + o.bound + gap and abs(x - o.x) >= sep and abs(y - o.y) >= sep
                   for o in objs) and (word is None or _clear_of_box(word.box, x, y, reach + gap)):
                objs.append(Obj(colour, shape, sz, x, y, round(r, 2), _jitter(rng, COLORS[colour])))
                break
        else:
            return None
    return objs


def make_scene(rng: random.Random, fonts: Fonts, size: int, specs: list[tuple[str, str, str]], *, word: bool = False,
               word_text: str | None = None, word_font: int | None = None, check=None) -> Scene:
    """A scene of these objects (shuffled, laid out at random) that satisfies `check(scene)`; retried until it does."""
    for _ in range(200):
        w = _word(rng, fonts, size, word_text, word_font) if word else None
        order = list(specs)
        rng.shuffle(order)
        objs = _place(rng, order, size, w)
        if objs is None:
            continue
        scene = Scene(size, _background(rng), objs, w)
        if check is None or check(scene):
            return scene
    raise ScenesError(f"cannot lay out {len(specs)} objects (word: {word}) at {size} px; use a larger --image-size")


def _spec(rng: random.Random, colour: str | None = None, shape: str | None = None, avoid=()) -> tuple[str, str, str]:
    """(colour, shape, size), random where not given, never a (colour, shape) in `avoid` nor with an avoided colour
    or shape given as a plain string."""
    while True:
        c = colour or rng.choice(list(COLORS))
        s = shape or rng.choice(SHAPES)
        if (c, s) not in avoid and c not in avoid and s not in avoid:
            return c, s, rng.choice(list(SIZES))


# ---------------------------------------------------------------------------------------------------------- questions
@dataclass
class Question:
    kind: str  # a TEMPLATES key
    slots: dict  # what the question is about (colour, shape, dir, rel, a, b, thing, which)
    answer: str


def fields(slots: dict, paraphrase: bool) -> dict:
    """Template fields for a question's slots (training or paraphrase wording of directions and relations)."""
    f = dict(slots)
    if "shape" in slots:
        f["shapes"] = slots["shape"] + "s"
    if "dir" in slots:
        f["most"], f["at"], f["far"] = EXTREME[slots["dir"]]
    if "rel" in slots:
        f["rel"] = RELATIONS[slots["rel"]][int(paraphrase)]
    for k in ("a", "b"):
        if k in slots:
            f[k] = " ".join(slots[k])
    if "thing" in slots:
        attr, value = slots["thing"]
        f["thing"] = f"a {value}" if attr == "shape" else f"a {value} shape"
    return f


def caption(scene: Scene) -> str:
    """One sentence naming every object with its colour, left to right."""
    names = [f"a {o.colour} {o.shape}" for o in scene.left_to_right()]
    if len(names) == 1:
        return f"There is 1 shape: {names[0]}."
    return f"There are {len(names)} shapes, from left to right: {', '.join(names[:-1])} and {names[-1]}."


def _maybe_word(rng: random.Random) -> bool:
    return rng.random() < WORD_SHARE


def build_count(rng, fonts, size, target) -> tuple[list[Scene], Question]:
    kind, answer = target
    if kind == "all":
        specs = [_spec(rng) for _ in range(answer)]
        slots = {}
    else:
        value = rng.choice(list(COLORS) if kind == "colour" else SHAPES)
        given = {kind: value}
        n = rng.randint(max(answer, 1), MAX_OBJECTS)
        specs = [_spec(rng, **given) for _ in range(answer)] + [_spec(rng, avoid=(value,)) for _ in range(n - answer)]
        slots = given
    return [make_scene(rng, fonts, size, specs, word=_maybe_word(rng))], Question(f"count/{kind}", slots, str(answer))


def _extreme(scene: Scene, direction: str) -> Obj | None:
    """The object furthest in `direction`, if it is at least MARGIN ahead of the next one."""
    axis, sign = {"left": ("x", 1), "right": ("x", -1), "top": ("y", 1), "bottom": ("y", -1)}[direction]
    objs = sorted(scene.objects, key=lambda o: sign * getattr(o, axis))
    if len(objs) > 1 and abs(getattr(objs[0], axis) - getattr(objs[1], axis)) < MARGIN * scene.size:
        return None
    return objs[0]


def build_position(rng, fonts, size, target):
    direction, ask = target
    specs = [_spec(rng) for _ in range(rng.randint(2, MAX_OBJECTS))]
    scene = make_scene(rng, fonts, size, specs, word=_maybe_word(rng), check=lambda s: _extreme(s, direction))
    obj = _extreme(scene, direction)
    return [scene], Question(f"position/{ask}", {"dir": direction}, obj.colour if ask == "colour" else obj.shape)


def holds(a: Obj, rel: str, b: Obj, margin: float = 0.0) -> bool:
    """a is `rel` (left/right/above/below) of b, by at least `margin` pixels on that axis."""
    d = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
    return d >= margin


def build_relation(rng, fonts, size, target):
    rel, yes = target
    specs: list[tuple[str, str, str]] = []
    for _ in range(rng.randint(2, MAX_OBJECTS)):  # every (colour, shape) once, so "the red circle" is one object
        specs.append(_spec(rng, avoid=[s[:2] for s in specs]))

    def pairs(s: Scene):
        return [(a, b) for a in s.objects for b in s.objects if holds(a, rel, b, MARGIN * size)]

    scene = make_scene(rng, fonts, size, specs, word=_maybe_word(rng), check=pairs)
    a, b = rng.choice(pairs(scene))
    if not yes:
        a, b = b, a
    slots = {"a": (a.colour, a.shape), "b": (b.colour, b.shape), "rel": rel}
    return [scene], Question("relation", slots, "yes" if yes else "no")


def build_existence(rng, fonts, size, target):
    answer, shared = target  # shared: what a negative has in common with an object present (colour | shape)
    for _ in range(100):
        specs = [_spec(rng) for _ in range(rng.randint(1, MAX_OBJECTS))]
        present = {s[:2] for s in specs}
        c, s, _ = rng.choice(specs)
        if answer == "no":
            options = [(c, t) for t in SHAPES] if shared == "colour" else [(t, s) for t in COLORS]
            options = [o for o in options if o not in present]
            if not options:
                continue
            c, s = rng.choice(options)
        scene = make_scene(rng, fonts, size, specs, word=_maybe_word(rng))
        return [scene], Question("existence", {"colour": c, "shape": s}, answer)
    raise ScenesError("no adversarial negative found")


def build_text(rng, fonts, size, target):
    word, font = target
    specs = [_spec(rng) for _ in range(rng.randint(0, 3))]
    scene = make_scene(rng, fonts, size, specs, word=True, word_text=word, word_font=font)
    return [scene], Question("text", {}, word)


def build_caption(rng, fonts, size, target):
    scene = make_scene(rng, fonts, size, [_spec(rng) for _ in range(target)])
    return [scene], Question("caption", {}, caption(scene))


def build_two_image(rng, fonts, size, target):
    kind, answer = target
    if kind == "both":
        attr = rng.choice(("shape", "colour"))
        value = rng.choice(SHAPES if attr == "shape" else list(COLORS))
        has = [True, True] if answer == "yes" else rng.choice(([True, False], [False, True], [False, False]))
        specs = []
        for h in has:
            n = rng.randint(1, 4)
            with_it = [_spec(rng, **{attr: value})] if h else []
            specs.append(with_it + [_spec(rng, avoid=(value,)) for _ in range(n - len(with_it))])
        slots = {"thing": (attr, value)}
    elif kind == "more":
        big, small = sorted(rng.sample(range(1, MAX_OBJECTS + 1), 2), reverse=True)
        counts = (big, small) if answer == "first" else (small, big)
        specs = [[_spec(rng) for _ in range(n)] for n in counts]
        slots = {}
    else:  # colour of the single shape in the first/second image
        which = answer
        lone = _spec(rng)
        other = [_spec(rng) for _ in range(rng.randint(1, 4))]
        specs = [[lone], other] if which == "first" else [other, [lone]]
        slots, answer = {"which": which}, lone[0]
    scenes = [make_scene(rng, fonts, size, s) for s in specs]
    return scenes, Question(f"two_image/{kind}", slots, answer)


BUILDERS = {"count": build_count, "position": build_position, "relation": build_relation,
            "existence": build_existence, "text": build_text, "two_image": build_two_image, "caption": build_caption}


def targets(family: str, n_fonts: int) -> list:
    """One cycle of a family's planned answers; cycling through it balances them (yes/no 50/50, counts spread)."""
    return {
        "count": [("all", a) for a in range(1, 6)] + [(k, a) for k in ("colour", "shape") for a in range(5)],
        "position": [(d, ask) for d in EXTREME for ask in ("colour", "shape")],
        "relation": [(r, yes) for r in RELATIONS for yes in (True, False)],
        "existence": [("yes", "colour"), ("no", "colour"), ("yes", "shape"), ("no", "shape")],
        "text": [(w, f) for w in WORDS for f in range(n_fonts)],
        "two_image": [("both", "yes"), ("both", "no"), ("more", "first"), ("more", "second"), ("colour", "first"),
                      ("colour", "second")],
        "caption": list(range(1, MAX_OBJECTS + 1)),
    }[family]


def allocate(n: int, families: list[str]) -> dict[str, int]:
    """Samples per family in proportion to WEIGHTS (largest remainders, ties in FAMILIES order)."""
    total = sum(WEIGHTS[f] for f in families)
    exact = {f: n * WEIGHTS[f] / total for f in families}
    out = {f: int(v) for f, v in exact.items()}
    for f in sorted(families, key=lambda f: (-(exact[f] - out[f]), FAMILIES.index(f)))[: n - sum(out.values())]:
        out[f] += 1
    return out


# ---------------------------------------------------------------------------------------------------------- splits
def human(question: str, images: int, short: bool) -> str:
    return "<image>\n" * images + (easyvqa.prompt(question) if short else question)


@dataclass
class Split:
    rows: list[dict] = field(default_factory=list)
    paraphrase: list[dict] = field(default_factory=list)
    scenes: dict[str, Scene] = field(default_factory=dict)  # image path (relative to the output folder) -> scene
    copies: dict[str, str] = field(default_factory=dict)  # easy-VQA image path -> its source file


def build_split(split: str, n: int, seed: int, size: int, fonts: Fonts, families: list[str]) -> Split:
    """Rows (and paraphrased rows) and scenes of one split; nothing is rendered or written."""
    counts = allocate(n, families)
    plan_rng = random.Random(f"scenes:{seed}:{split}:plan")
    plan = []
    for f in families:
        if f == "easyvqa":
            continue
        cycle = targets(f, len(fonts.refs))
        plan_rng.shuffle(cycle)
        plan += [(f, cycle[k % len(cycle)]) for k in range(counts[f])]
    plan += [("easyvqa", q) for q in _easyvqa_questions(split, seed, counts.get("easyvqa", 0))]
    plan_rng.shuffle(plan)
    out = Split()
    for index, (family, target) in enumerate(plan):
        rid = f"{split}-{index:06d}"
        if family == "easyvqa":
            image = f"images/easyvqa-{split}/{target.image_id}.png"
            out.copies[image] = target.image
            text = human(target.text, 1, True)
            out.rows.append(_row(rid, image, text, target.answer, family, f"easyvqa/{target.type}"))
            continue
        rng = random.Random(f"scenes:{seed}:{split}:{index}")
        scenes, q = BUILDERS[family](rng, fonts, size, target)
        train_t, para_t = TEMPLATES[q.kind]
        ti, pi = rng.randrange(len(train_t)), rng.randrange(len(para_t))
        names = [f"images/{split}/{index:06d}.png"] if len(scenes) == 1 else \
            [f"images/{split}/{index:06d}-{k}.png" for k in (1, 2)]
        out.scenes.update(zip(names, scenes))
        image = names[0] if len(names) == 1 else names
        short = family != "caption"
        text = human(train_t[ti].format(**fields(q.slots, False)), len(names), short)
        out.rows.append(_row(rid, image, text, q.answer, family, q.kind))
        text = human(para_t[pi].format(**fields(q.slots, True)), len(names), short)
        out.paraphrase.append(_row(f"paraphrase-{index:06d}", image, text, q.answer, family, q.kind))
    return out


def _row(rid: str, image, question: str, answer: str, family: str, kind: str) -> dict:
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "family": family, "kind": kind}


def _easyvqa_questions(split: str, seed: int, n: int) -> list:
    if not n:
        return []
    qs = easyvqa.questions(split)
    return sorted(random.Random(f"scenes:{seed}:{split}:easyvqa").sample(qs, min(n, len(qs))), key=lambda q: q.qid)


# ---------------------------------------------------------------------------------------------------------- more questions
def scene_questions(rng: random.Random, scene: Scene, k: int, skip: str = "") -> list[Question]:
    """Up to `k` more questions about one scene, each of a different kind (never `skip`, the row's own kind), drawn
    from every kind the scene can answer unambiguously under the same rules as the builders (margins, unique
    relation objects, adversarial existence negatives, yes/no 50/50)."""
    objs = scene.objects
    options: dict[str, callable] = {}
    if objs:
        options["count/all"] = lambda: Question("count/all", {}, str(len(objs)))

        def count_by(attr: str):
            # the answer first, then a colour/shape with that many objects: a random value would give "1" to two
            # thirds of these questions (few scenes repeat a colour or shape) and teach that prior, not counting;
            # half the time the scene's largest count, which brought 2+ from 17 % to 28 % of the answers
            counts = {v: sum(getattr(o, attr) == v for o in objs) for v in (COLORS if attr == "colour" else SHAPES)}
            answers = sorted(set(counts.values()))
            answer = answers[-1] if rng.random() < 0.5 else rng.choice(answers)
            value = rng.choice([v for v, n in counts.items() if n == answer])
            return Question(f"count/{attr}", {attr: value}, str(answer))

        options["count/colour"] = lambda: count_by("colour")
        options["count/shape"] = lambda: count_by("shape")

        def existence():
            present = {(o.colour, o.shape) for o in objs}
            o = rng.choice(objs)
            if rng.random() < 0.5:
                return Question("existence", {"colour": o.colour, "shape": o.shape}, "yes")
            negatives = [(o.colour, s) for s in SHAPES] + [(c, o.shape) for c in COLORS]
            negatives = [n for n in negatives if n not in present]
            c, s = rng.choice(negatives)
            return Question("existence", {"colour": c, "shape": s}, "no")

        options["existence"] = existence
    if len(objs) > 1:
        for ask in ("colour", "shape"):
            dirs = [d for d in EXTREME if _extreme(scene, d) is not None]
            if dirs:
                def position(ask=ask, dirs=dirs):
                    d = rng.choice(dirs)
                    return Question(f"position/{ask}", {"dir": d}, getattr(_extreme(scene, d), ask))

                options[f"position/{ask}"] = position
        unique = unique_objects(scene)
        pairs = [(a, rel, b) for rel in RELATIONS for a in unique for b in unique
                 if holds(a, rel, b, MARGIN * scene.size)]
        if pairs:
            def relation():
                a, rel, b = rng.choice(pairs)
                yes = rng.random() < 0.5
                if not yes:
                    a, b = b, a
                return Question("relation", {"a": (a.colour, a.shape), "b": (b.colour, b.shape), "rel": rel},
                                "yes" if yes else "no")

            options["relation"] = relation
    if scene.word is not None:
        options["text"] = lambda: Question("text", {}, scene.word.text)
    kinds = [kind for kind in options if kind != skip]
    rng.shuffle(kinds)
    kinds.sort(key=lambda kind: kind != "text")  # a word is always read (the scarcest kind)
    return [options[kind]() for kind in kinds[:k]]


def unique_objects(scene: Scene) -> list[Obj]:
    """The objects no other object shares colour and shape with ("the red circle" names one of them only)."""
    return [o for o in scene.objects if sum((p.colour, p.shape) == (o.colour, o.shape) for p in scene.objects) == 1]


HALVES = {"x": ("left", "right"), "y": ("top", "bottom")}
HALF_TEMPLATES = {"x": ["Is the {o} in the left or the right half of the image?", "Is the {o} on the left or on the right?"],
                  "y": ["Is the {o} in the top or the bottom half of the image?", "Is the {o} at the top or at the bottom?"]}


def half_questions(rng: random.Random, scene: Scene, k: int) -> list[tuple[str, str]]:
    """Up to k (question, answer) pairs: which half of the image (left/right, top/bottom) one object is in. Only
    objects named uniquely by colour and shape and at least MARGIN from the centre line on that axis. A training aid,
    not a test family: reading one object's place is a step of every relation question and far easier to learn."""
    unique = unique_objects(scene)
    half, margin = scene.size / 2, MARGIN * scene.size
    options = [(o, axis) for o in unique for axis in HALVES if abs(getattr(o, axis) - half) >= margin]
    rng.shuffle(options)
    return [(rng.choice(HALF_TEMPLATES[axis]).format(o=f"{o.colour} {o.shape}"), HALVES[axis][int(getattr(o, axis) > half)])
            for o, axis in options[:k]]


def half_test_rows(scenes: dict[str, dict], seed: int = 0) -> list[dict]:
    """One which-half question per scene that has one to ask (`half_questions`, its own seeded draw per image), as
    rows {family "halves", kind "halves/x" (left/right) or "halves/y" (top/bottom)}: what `train.build_default`
    asks of the test scenes to tell whether a model reads where one object is, the step relation questions build
    on. Not a test family (the targets leave it out)."""
    rows = []
    for image, d in sorted(scenes.items()):
        for text, answer in half_questions(random.Random(f"scenes:{seed}:halves:{image}"), scene_from_dict(d), 1):
            axis = "x" if answer in HALVES["x"] else "y"
            rows.append(_row(f"halves-{Path(image).stem}", image, human(text, 1, True), answer, "halves", f"halves/{axis}"))
    return rows


def relation_questions(rng: random.Random, scene: Scene, k: int) -> list[Question]:
    """Up to k relation questions about one scene, each about another (a, relation, b) triple, yes/no 50/50, under
    the builders' rules (objects unique by colour and shape, MARGIN apart on the axis)."""
    unique = unique_objects(scene)
    triples = [(a, rel, b) for rel in RELATIONS for a in unique for b in unique if holds(a, rel, b, MARGIN * scene.size)]
    rng.shuffle(triples)
    out = []
    for a, rel, b in triples[:k]:
        yes = rng.random() < 0.5
        if not yes:
            a, b = b, a
        out.append(Question("relation", {"a": (a.colour, a.shape), "b": (b.colour, b.shape), "rel": rel}, "yes" if yes else "no"))
    return out


def add_questions(rows: list[dict], scenes: dict[str, dict], k: int, seed: int, relations: int = 0,
                  halves: int = 0) -> list[dict]:
    """Training rows with up to `k` more questions about each one-image scene appended as further exchanges (each
    with the short-answer instruction, for `independent_turns` tree packing: every exchange sees the image and
    itself only). Two-image, caption and easy-VQA rows are kept as they are; images stay the same files.
    `relations` / `halves`: up to that many more relation questions (other triples than the row's own) and "which
    half is the X in" questions (`half_questions`) per scene, after the k (which they leave as they were)."""
    out = []
    for row in rows:
        image = row.get("image")
        if not (k or relations or halves) or not isinstance(image, str) or image not in scenes or row["family"] == "caption":
            out.append(row)
            continue
        rng = random.Random(f"scenes:{seed}:more:{row['id']}")
        scene = scene_from_dict(scenes[image])
        conv = list(row["conversations"])

        def ask(question: str, answer: str) -> None:
            conv.extend([{"from": "human", "value": human(question, 0, True)}, {"from": "gpt", "value": answer}])

        for q in scene_questions(rng, scene, k, skip=row["kind"]) if k else []:
            ask(rng.choice(TEMPLATES[q.kind][0]).format(**fields(q.slots, False)), q.answer)
        if relations or halves:
            extra = random.Random(f"scenes:{seed}:extra:{row['id']}")
            asked = {t["value"].replace("<image>\n", "") for t in conv if t["from"] == "human"}
            fresh = [q for q in relation_questions(extra, scene, relations + 2)
                     if not any(human(t.format(**fields(q.slots, False)), 0, True) in asked for t in TEMPLATES["relation"][0])]
            for q in fresh[:relations]:
                ask(extra.choice(TEMPLATES["relation"][0]).format(**fields(q.slots, False)), q.answer)
            for text, answer in half_questions(extra, scene, halves):
                ask(text, answer)
        out.append({**row, "conversations": conv})
    return out


def where_rows(rows: list[dict], scenes: dict[str, dict], relations: int, halves: int, seed: int) -> list[dict]:
    """A relation curriculum: for each one-image training scene with a relation to ask, one row of up to `relations`
    relation questions and up to `halves` which-half questions (independent turns, shuffled together), nothing
    else. Reading where each object is comes first, comparing two builds on it (bench.scenes_relation_diag: trained
    on these alone, relation rose from chance to 85 % in 785 steps, while inside the full mix it stayed at chance)."""
    out = []
    for row in rows:
        image = row.get("image")
        if not isinstance(image, str) or image not in scenes or row["family"] in ("caption", "easyvqa"):
            continue
        rng = random.Random(f"scenes:{seed}:where:{row['id']}")
        scene = scene_from_dict(scenes[image])
        qa = [(rng.choice(TEMPLATES["relation"][0]).format(**fields(q.slots, False)), q.answer)
              for q in relation_questions(rng, scene, relations)]
        if not qa:
            continue
        qa += half_questions(rng, scene, halves)
        rng.shuffle(qa)
        conv = []
        for i, (question, answer) in enumerate(qa):
            conv += [{"from": "human", "value": human(question, int(i == 0), True)}, {"from": "gpt", "value": answer}]
        out.append({"id": f"where-{row['id']}", "image": image, "conversations": conv, "family": "relation",
                    "kind": "relation"})
    return out


# ---------------------------------------------------------------------------------------------------------- rewording
# Training-only wordings: the same question in other words, so that a model keys on colours, shapes and directions
# rather than on the few templates above. None of these use the held-out paraphrase set's words (HELD_OUT_WORDS):
# that set measures wordings the model never saw, and must keep doing so.
REWORDINGS = [  # (pattern, replacements): each matching rule fires with probability 1/2
    (r"\bin the image\b", ["in this photo", "in the scene", "here", "in this image"]),
    (r"\bthe image\b", ["the photo", "the scene", "this image"]),
    (r"\bin the first image\b", ["in the first photo", "in image one"]),
    (r"\bin the second image\b", ["in the second photo", "in image two"]),
    (r"\bshapes\b", ["objects", "items", "things"]),
    (r"\b(the|leftmost|rightmost|topmost|bottommost) shape\b", [r"\1 object", r"\1 item"]),
    (r"\bcolor\b", ["colour"]),
    (r"\bto the left of\b", ["left of", "further left than"]),
    (r"\bto the right of\b", ["right of", "further right than"]),
    (r"\babove\b", ["over", "further up than"]),
    (r"\bbelow\b", ["under", "beneath", "further down than"]),
    (r"\bthe leftmost (shape|object|item)\b", [r"the \1 most to the left"]),
    (r"\bthe rightmost (shape|object|item)\b", [r"the \1 most to the right"]),
    (r"\bthe topmost (shape|object|item)\b", [r"the \1 nearest the top"]),
    (r"\bthe bottommost (shape|object|item)\b", [r"the \1 nearest the bottom"]),
    (r"\bon the far (left|right)\b", [r"at the \1 end", r"at the far \1"]),
    (r"\bat the (top|bottom)\b", [r"at the very \1"]),
    (r"^Can you see a\b", ["Do you see a", "Is there a"]),
    (r"^Is there a (\w+ \w+)\?$", [r"Is a \1 present?", r"Do you see a \1?"]),
    (r"\bwritten\b", ["shown", "written there"]),
    (r"^Do both images contain\b", ["Do the two images both contain", "Does each image contain"]),
]
FORMS = ["{q}", "{q}", "Question: {q}", "Please answer: {q}", "Look at the image. {q}", "{lower}", "{bare}"]
HELD_OUT_WORDS = ("picture", "figure", "tell me", "name the", "appear", "sits", "visible", "anywhere", "printed",
                  "furthest", "highest", "lowest", "side of", "higher than", "lower than", "lone", "include",
                  "be found", "greater number", "short description", "number of")


def reword(rng: random.Random, question: str) -> str:
    """One training question in other words (REWORDINGS, then one of FORMS); the answer stays what it was."""
    for pattern, options in REWORDINGS:
        if re.search(pattern, question) and rng.random() < 0.5:
            question = re.sub(pattern, rng.choice(options), question)
    bare = question[:1].lower() + question[1:]
    return rng.choice(FORMS).format(q=question, lower=bare, bare=bare.rstrip("?"))


def reword_rows(rows: list[dict], share: float, seed: int) -> list[dict]:
    """Training rows with `share` of the generated scenes' questions reworded (`reword`; each human turn drawn on
    its own, seeded by the row id). easy-VQA and text-only rows are kept as they are; the `<image>` lines and the
    short-answer instruction stay where they were."""
    if share <= 0:
        return rows
    out = []
    for row in rows:
        if row.get("family") in (None, "easyvqa") or "image" not in row:
            out.append(row)
            continue
        rng = random.Random(f"scenes:{seed}:reword:{row['id']}")
        conv = []
        for turn in row["conversations"]:
            if turn["from"] == "human" and rng.random() < share:
                text = turn["value"]
                body = text.replace("<image>\n", "")
                head = "<image>\n" * text.count("<image>\n")
                tail = "\n" + easyvqa.SHORT_ANSWER if body.endswith("\n" + easyvqa.SHORT_ANSWER) else ""
                body = body[: len(body) - len(tail)]
                turn = {**turn, "value": head + reword(rng, body) + tail}
            conv.append(turn)
        out.append({**row, "conversations": conv})
    return out


# ---------------------------------------------------------------------------------------------------------- rendering
def background(bg: dict, size: int) -> np.ndarray:
    """[size, size, 3] uint8 ground of a scene."""
    rng = np.random.default_rng(bg["seed"])
    base = np.array(bg["rgb"], dtype=np.float32)
    kind = bg["kind"]
    if kind == "plain":
        shade = np.zeros((size, size), np.float32)
    elif kind == "noise":  # grey noise in cells of `cell` pixels
        cells = -(-size // bg["cell"])
        shade = rng.normal(0, bg["amount"], (cells, cells)).astype(np.float32)
        shade = np.repeat(np.repeat(shade, bg["cell"], 0), bg["cell"], 1)[:size, :size]
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = math.radians(bg["angle"])
        if kind == "stripes":
            band = np.floor((xx * math.cos(a) + yy * math.sin(a)) / bg["cell"])
        else:
            band = np.floor(xx / bg["cell"]) + np.floor(yy / bg["cell"])
        shade = -bg["delta"] * (band % 2)
    return np.clip(base[None, None, :] + shade[:, :, None], 0, 255).round().astype(np.uint8)


def _polygon(o: Obj) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, start: float):
        angles = [start + 2 * math.pi * k / n for k in range(n)]
        return [(o.x + radius * math.cos(a), o.y + radius * math.sin(a)) for a in angles]

    if o.shape == "triangle":
        return ring(3, o.r, -math.pi / 2)
    if o.shape == "diamond":
        return ring(4, o.r, -math.pi / 2)
    if o.shape == "star":
        outer, inner = ring(5, o.r, -math.pi / 2), ring(5, 0.45 * o.r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    h = 0.8 * o.r  # square
    return [(o.x - h, o.y - h), (o.x + h, o.y - h), (o.x + h, o.y + h), (o.x - h, o.y + h)]


def render(scene: Scene, fonts: Fonts) -> Image.Image:
    image = Image.fromarray(background(scene.background, scene.size), "RGB")
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        if o.shape == "circle":
            draw.ellipse((o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r), fill=o.rgb)
        else:
            draw.polygon(_polygon(o), fill=o.rgb)
    if scene.word is not None:
        w = scene.word
        draw.text((w.x, w.y), w.text, font=fonts.get(w.font, w.size), fill=w.rgb)
    return image


def _render_batch(job: tuple[list[FontRef], list[tuple[str, dict]]]) -> int:
    refs, items = job
    fonts = Fonts(refs)
    for path, scene in items:
        render(scene_from_dict(scene), fonts).save(path, format="PNG")
    return len(items)


def render_all(out: Path, scenes: dict[str, Scene], refs: list[FontRef], workers: int) -> None:
    items = [(str(out / name), asdict(scene)) for name, scene in scenes.items()]
    for d in sorted({Path(p).parent for p, _ in items}):
        d.mkdir(parents=True, exist_ok=True)
    jobs = [(refs, items[i:i + 256]) for i in range(0, len(items), 256)]
    if workers > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_batch, jobs):
                pass
    else:
        for job in jobs:
            _render_batch(job)


# ---------------------------------------------------------------------------------------------------------- writing
def generate(out: Path, seed: int, n_train: int, n_test: int, image_size: int = 224, families: list[str] | None = None,
             workers: int = 1, fonts: list[FontRef] | None = None) -> dict:
    """Write the data set (see the module docstring); returns the contents of meta.json."""
    families = list(families or FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ScenesError(f"unknown families {unknown}; valid: {', '.join(FAMILIES)}")
    if image_size < 48:
        raise ScenesError(f"--image-size {image_size} is too small to lay out 5 objects and a word (>= 48)")
    refs = fonts or discover_fonts()
    fonts_ = Fonts(refs)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seed": seed, "image_size": image_size, "families": families, "counts": {},
            "fonts": [asdict(f) for f in refs], "colours": COLORS, "shapes": SHAPES, "sizes": SIZES,
            "words": len(WORDS), "versions": {"pillow": Image.__version__, "numpy": np.__version__}}
    for split, n in (("train", n_train), ("test", n_test)):
        data = build_split(split, n, seed, image_size, fonts_, families)
        render_all(out, data.scenes, refs, workers)
        for dst, src in data.copies.items():
            (out / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out / dst)
        easyvqa.write_json(data.rows, out / f"{split}.json")
        easyvqa.write_json({k: asdict(v) for k, v in data.scenes.items()}, out / f"scenes-{split}.json")
        if split == "test":
            easyvqa.write_json(data.paraphrase, out / "paraphrase_test.json")
        meta["counts"][split] = dict(Counter(r["family"] for r in data.rows))
        meta["counts"][split]["images"] = len(data.scenes) + len(data.copies)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def demo_examples(data: Path, demo: Path) -> list[dict]:
    """One held-out test row per family as web UI examples (see the module docstring)."""
    rows = json.loads((data / "test.json").read_text())
    seed = json.loads((data / "meta.json").read_text())["seed"]
    manifest_file = demo / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    examples = []
    for family in (f for f in FAMILIES if f != "easyvqa"):  # easy-VQA has its own examples
        row = next((r for r in rows if r["family"] == family), None)
        if row is None:
            continue
        images = row["image"] if isinstance(row["image"], list) else [row["image"]]
        names = [f"scenes-{family}{f'-{i + 1}' if len(images) > 1 else ''}.png" for i, _ in enumerate(images)]
        question, answer = row["conversations"][0]["value"], row["conversations"][1]["value"]
        for src, name in zip(images, names):
            shutil.copyfile(data / src, demo / name)
            manifest[name] = {"source": f"train.scenes seed {seed}, test row {row['id']}", "family": family,
                              "kind": row["kind"], "question": question, "answer": answer}
        examples.append({"files": names, "text": question.replace("<image>", "").strip()})
    manifest_file.write_text(json.dumps(manifest, indent=1) + "\n")
    return examples


def main(argv: list[str] | None = None) -> int:
    """`python -m train.scenes --out DIR --seed S --train N --test M`: write the scenes data set."""
    p = argparse.ArgumentParser(prog="python -m train.scenes", description=main.__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, required=True, help="training questions (one row each)")
    p.add_argument("--test", type=int, required=True, help="test questions (and as many paraphrased, easy-VQA aside)")
    p.add_argument("--image-size", type=int, default=224, help="pixels (DINOv2's input side is 224)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (the output does not depend on it)")
    p.add_argument("--font", action="append", type=Path, help="use these font files instead of discovering them")
    args = p.parse_args(argv)
    refs = None
    if args.font:
        refs = [FontRef(" ".join(ImageFont.truetype(str(f), 12).getname()), str(f.resolve()), "user")
                for f in args.font]
    start = time.perf_counter()
    try:
        meta = generate(args.out, args.seed, args.train, args.test, args.image_size,
                        [f for f in args.families.split(",") if f], args.workers, refs)
    except (ScenesError, easyvqa.EasyVQAError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: meta[k] for k in ("counts", "fonts", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
