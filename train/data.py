"""LLaVA-format training data: validated rows, lazy images, labels from the one renderer, and a padding collator.

Promises:
- `read_rows(path)` reads LLaVA JSON (a list) or JSONL (one object a line) of
  `{id, image?, conversations: [{from: human|gpt, value}]}`; `image` is one path or a list of paths (several
  images per row, one `<image>` slot each, in order).
- `LlavaDataset` checks every row when it is built. A bad row (missing image file, wrong roles, an image without an
  `<image>` slot or a slot without an image, slots and images of different counts, an unreadable image file)
  raises `DatasetError` naming the file and the row -- or, with `skip_bad=True`, is dropped and counted in
  `dataset.skipped` (reason -> count). Nothing is masked silently.
- Labels come from `llava.templates.render` with `<image>` expanded to the image's token count, so only assistant
  tokens are trained.
- Images load lazily (`__getitem__` decodes and preprocesses) unless a feature cache is attached, in which case an
  item carries its images' cache keys instead of pixels (see train/features.py; each image is cached on its own).
- `Collator` right-pads to the longest row and stacks pixel values or cached features of the batch's images in
  order (row by row, each row's images in slot order: the order of the `<image>` token runs that the features are
  scattered into); text-only rows mix freely with image rows.
- With `independent_turns=True`, an image row's exchanges become independent single-turn samples packed into ONE
  sequence as a tree (`pack_tree`): the common prefix (system prompt + image tokens) once, then each exchange, which
  attends only to the prefix and to itself (`tree_mask`, a 4D mask, with positions restarting after the prefix).
  The loss equals that of the separate single-turn samples (tested) at the cost of one image per row.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from llava.images import ImageError, ImageProcessing, content_hash, load_image, num_image_tokens, preprocess
from llava.templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, TemplateError, normalize_messages, render


class DatasetError(ValueError):
    """A data file or one of its rows cannot be used; the message names the file and the row."""


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a LLaVA JSON list or a JSONL file (chosen by content: a leading `[` means JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON: {e}") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {n}: invalid JSON: {e}") from None
    return rows


@dataclass(frozen=True)
class Row:
    """One validated row: its messages (from/value) and the absolute paths of its images, in slot order."""

    index: int
    id: str
    messages: tuple[dict, ...]
    images: tuple[Path, ...] = ()


def check_row(raw: object, index: int, image_folder: Path | None) -> Row:
    """Validate one raw row; raises `DatasetError` (without the file name, which the caller adds)."""
    if not isinstance(raw, dict):
        raise DatasetError(f"row {index}: expected an object, got {type(raw).__name__}")
    rid = str(raw.get("id", index))
    where = f"row {index} (id {rid!r})"
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            raise DatasetError(f"{where}: every turn needs from=human|gpt and a string value, got {turn!r}")
    try:
        msgs = normalize_messages(conv)
    except TemplateError as e:
        raise DatasetError(f"{where}: wrong roles: {e}") from None
    if msgs[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: wrong roles: the last turn must be from gpt (nothing to learn otherwise)")
    slots = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    slots_in_gpt = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv if t["from"] == "gpt")
    image = raw.get("image")
    if slots_in_gpt:
        raise DatasetError(f"{where}: {IMAGE_PLACEHOLDER} appears in a gpt turn; it belongs in a human turn")
    if image is None:
        if slots:
            raise DatasetError(f"{where}: has {slots} {IMAGE_PLACEHOLDER} slot(s) but no 'image'")
        return Row(index, rid, tuple(conv))
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{where}: 'image' must be a relative path or a non-empty list of them, got {image!r}")
    if slots != len(names):
        raise DatasetError(f"{where}: has {len(names)} image(s) but {slots} {IMAGE_PLACEHOLDER} slot(s) "
                           "(need one slot per image)")
    paths = tuple((image_folder / n) if image_folder is not None else Path(n) for n in names)
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"{where}: missing image file {path}")
    return Row(index, rid, tuple(conv), paths)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one [3, S, S] per image when images load lazily
    image_keys: list[str] = field(default_factory=list)  # content keys (slot order) when a feature cache supplies them
    # Independent turns packed as a tree: segment 0 = the shared prefix, k = the k-th exchange (sees only the prefix
    # and itself); positions restart after the prefix for every exchange. None = one ordinary causal sequence.
    segments: list[int] | None = None
    positions: list[int] | None = None


def exchanges(messages: Sequence[dict]) -> list[list[dict]]:
    """A from/value conversation as single-turn conversations, each opening with all the conversation's image slots."""
    pairs = [list(messages[i:i + 2]) for i in range(0, len(messages), 2)]
    slot = IMAGE_PLACEHOLDER + "\n"
    slots = slot * sum(m["value"].count(IMAGE_PLACEHOLDER) for m in messages)
    out = []
    for human, gpt in pairs:
        text = human["value"].replace(slot, "").replace(IMAGE_PLACEHOLDER, "")
        out.append([{"from": "human", "value": slots + text}, {"from": "gpt", "value": gpt["value"]}])
    return out


def pack_tree(rendered: Sequence, image_token_id: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Renders of single-turn conversations about one image -> (ids, labels, segments, positions) of one sequence:
    their longest common prefix once, then each remainder. The prefix must hold every image token."""
    rows = [r.input_ids for r in rendered]
    n = 0
    while all(len(r) > n + 1 for r in rows) and all(r[n] == rows[0][n] for r in rows):
        n += 1
    if any(image_token_id in r[n:] for r in rows):
        raise DatasetError("independent turns need the image inside the shared prefix of every turn")
    ids, labels = list(rows[0][:n]), list(rendered[0].labels[:n])
    segments, positions = [0] * n, list(range(n))
    for k, r in enumerate(rendered, 1):
        rest = len(r.input_ids) - n
        ids += r.input_ids[n:]
        labels += r.labels[n:]
        segments += [k] * rest
        positions += list(range(n, n + rest))
    return ids, labels, segments, positions


class LlavaDataset(Dataset):
    """Validated LLaVA rows rendered with one template. See the module docstring for the error contract."""

    def __init__(
        self,
        data_path: str | Path,
        tokenizer,
        template: str,
        proc: ImageProcessing,
        *,
        image_folder: str | Path | None = None,
        skip_bad: bool = False,
        verify_images: bool = True,
        max_length: int | None = None,
        independent_turns: bool = False,
        offset: int = 0,
        limit: int | None = None,
    ):
        self.path = Path(data_path)
        self.tokenizer, self.template, self.proc = tokenizer, template, proc
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.max_length = max_length
        self.independent_turns = independent_turns
        self.skipped: Counter[str] = Counter()
        self.image_keys: dict[Path, str] = {}  # image path -> content hash (filled when images are verified)
        self.use_cache = False
        self.rows = self._validate(read_rows(self.path)[offset:][:limit], skip_bad, verify_images, offset)
        if not self.rows:
            raise DatasetError(f"{self.path}: no usable rows (skipped: {dict(self.skipped)})")
        self.lengths = [self._length(r) for r in self.rows]

    def _validate(self, raw_rows: list, skip_bad: bool, verify_images: bool, offset: int) -> list[Row]:
        rows = []
        for i, raw in enumerate(raw_rows, offset):
            try:
                row = check_row(raw, i, self.image_folder)
                for image in row.images if verify_images else ():
                    if image not in self.image_keys:
                        self.image_keys[image] = self._decode_key(row, image)
            except DatasetError as e:
                if not skip_bad:
                    raise DatasetError(f"{self.path}: {e}") from None
                self.skipped[_reason(str(e))] += 1
                continue
            rows.append(row)
        return rows

    def _decode_key(self, row: Row, image: Path) -> str:
        try:
            return content_hash(load_image(image))
        except ImageError as e:
            raise DatasetError(f"row {row.index} (id {row.id!r}): unreadable image file {image}: {e}") from None

    def _length(self, row: Row) -> int:
        """Approximate token count (words + image tokens), for length grouping without tokenizing everything."""
        words = sum(len(t["value"].split()) for t in row.messages)
        return words * 2 + len(row.images) * self._tokens_per_image(len(row.images) > 1)

    def _tokens_per_image(self, multi: bool) -> int:
        return num_image_tokens(self.proc, (self.proc.size, self.proc.size), multi)

    @property
    def modalities(self) -> list[bool]:
        return [bool(r.images) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        row = self.rows[i]
        counts, pixel_values, keys = None, [], []
        multi = len(row.images) > 1
        if row.images and self.use_cache:
            keys = [self.image_keys[p] for p in row.images]
            counts = [self._tokens_per_image(multi)] * len(keys)
        elif row.images:
            processed = [preprocess(self._load(row, p), self.proc, multi) for p in row.images]
            pixel_values, counts = [p.pixel_values for p in processed], [p.num_tokens for p in processed]
        if self.independent_turns and row.images and len(row.messages) > 2:
            rendered = [render(m, self.template, self.tokenizer, image_token_counts=counts) for m in exchanges(row.messages)]
            ids, labels, segments, positions = pack_tree(rendered, self.tokenizer.image_token_id)
        else:
            r = render(list(row.messages), self.template, self.tokenizer, image_token_counts=counts)
            ids, labels, segments, positions = r.input_ids, r.labels, None, None
        if self.max_length is not None and len(ids) > self.max_length:
            raise DatasetError(
                f"{self.path}: row {row.index} (id {row.id!r}) has {len(ids)} tokens > max_length {self.max_length}; "
                "truncating would cut image tokens or answers"
            )
        return Example(ids, labels, pixel_values, keys, segments, positions)

    def _load(self, row: Row, image: Path):
        try:
            return load_image(image)
        except ImageError as e:
            raise DatasetError(f"{self.path}: row {row.index} (id {row.id!r}): unreadable image file {image}: {e}") from None


def _reason(message: str) -> str:
    for reason in ("missing image file", "unreadable image file", "wrong roles", "slot", "conversations"):
        if reason in message:
            return reason
    return "other"


@dataclass
class Collator:
    """Right-pads a list of `Example`s into a batch; images go in batch order (the order of their slots)."""

    pad_token_id: int
    feature_lookup: object | None = None  # callable list[str] -> Tensor [n_images, T, D] (a FeatureCache)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e.input_ids)
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if any(e.segments is not None for e in examples):
            batch["attention_mask"], batch["position_ids"] = tree_mask(examples, width)
        keys = [k for e in examples for k in e.image_keys]
        pixels = [p for e in examples for p in e.pixel_values]
        if keys:
            batch["image_features"] = self.feature_lookup(keys)  # [n_images, T, D]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)  # [n_images, 3, S, S]
        return batch


def tree_mask(examples: Sequence[Example], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4D boolean mask [B, 1, L, L] (True = may attend) and position ids [B, L] for a batch with packed trees.

    Query q sees key k iff k <= q, both are real tokens, and k is in the prefix (segment 0) or in q's own segment.
    Every position sees itself, so padded rows never have an empty softmax (their labels are ignored).
    """
    mask = torch.zeros((len(examples), 1, width, width), dtype=torch.bool)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        seg = torch.tensor(e.segments if e.segments is not None else [0] * n)
        same = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])  # [n, n]
        mask[b, 0, :n, :n] = same & causal[:n, :n]
        positions[b, :n] = torch.tensor(e.positions if e.positions is not None else list(range(n)))
    mask |= torch.eye(width, dtype=torch.bool)
    return mask, positions


def token_counts(batch: dict[str, torch.Tensor], image_token_id: int | None = None) -> dict[str, int]:
    """What a collated batch costs: `slots` (rows x padded width, what the LLM computes over), `tokens` (the real
    ones), `image_tokens` (of those, `<image>` slots) and `label_tokens` (the positions the loss reads).
    A tree batch's real positions are those that see their row's first token (a padded one sees only itself)."""
    mask = batch["attention_mask"]
    real = mask[:, 0, :, 0] if mask.dim() == 4 else mask.bool()
    ids = batch["input_ids"]
    return {
        "slots": ids.numel(),
        "tokens": int(real.sum()),
        "image_tokens": int((ids == image_token_id).sum()) if image_token_id is not None else 0,
        "label_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
    }


@dataclass
class ModalityLengthSampler(Sampler[int]):
    """LLaVA's grouping: batches hold one modality (image or text-only) and rows of similar length.

    Each modality is shuffled, cut into mega-batches of `batch_size * mega` rows, each sorted by length and cut into
    batches; the batches of both modalities are then shuffled together. Deterministic in (seed, epoch), so a
    resumed run, and every process of a data-parallel run, sees the same order. `batch_size` is the global batch
    (per-device batch x processes x accumulation steps); the stream stops at a whole number of them (below).
    """

    lengths: list[int]
    modalities: list[bool]
    batch_size: int
    seed: int = 0
    mega: int = 8
    epoch: int = field(default=0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return whole_batches(len(self.lengths), self.batch_size)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        batches: list[list[int]] = []
        for modality in (True, False):
            idx = [i for i, m in enumerate(self.modalities) if m == modality]
            rng.shuffle(idx)
            step = self.batch_size * self.mega
            for start in range(0, len(idx), step):
                mega = sorted(idx[start:start + step], key=lambda i: -self.lengths[i])
                batches += [mega[j:j + self.batch_size] for j in range(0, len(mega), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for b in batches for i in b][:len(self)])


@dataclass
class ShuffleSampler(Sampler[int]):
    """A plain shuffle, deterministic in (seed, epoch) on every process, cut to whole global batches."""

    size: int
    batch_size: int  # the global batch
    seed: int = 0
    epoch: int = field(default=0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return whole_batches(self.size, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return iter(order[:len(self)])


def whole_batches(rows: int, global_batch: int) -> int:
    """Rows an epoch uses: a whole number of global batches. The last partial one is dropped (fewer than
    `global_batch` rows), so every optimizer step -- one process or many, with or without accumulation -- sees
    `global_batch` rows and a run's steps do not depend on how the batch is split."""
    return rows // global_batch * global_batch
