"""Key/value state for the engine: the running batch's left-padded KV cache, the prefix cache of finished
sequences and the image-feature cache.

Promises:
- `BatchKV` holds one KV tensor pair per layer, shaped [B, kv_heads, T, head_dim], each row left-padded so all
  rows end at column T. It hands the model a transformers `Cache` (writes go into preallocated buffers, so a
  decode step appends in place instead of copying the whole cache), the 2D attention mask and per-row
  position ids that make a padded row compute exactly what it would alone. Rows join (`add_rows`) and leave
  (`keep_rows`) between steps; columns that became padding in every row are trimmed.
- `PrefixCache` keeps the KV of finished sequences, LRU-bounded by token count. A lookup returns the entry
  sharing the longest prefix with the new ids *and* with the same images (by content key) at the image
  positions of that prefix, so equal ids with different pictures never match.
- `ImageFeatureCache` is an LRU of projected image features keyed by `ProcessedImage.key`, bounded in bytes.
All three keep hit / miss / eviction counters; none of them is thread-safe (the engine's scheduler owns them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Extra columns allocated beyond the current need, so most decode steps write in place.
_MIN_HEADROOM = 64


def _capacity_for(needed: int) -> int:
    return needed + max(_MIN_HEADROOM, needed // 2)


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a preallocated [B, H, capacity, D] buffer.

    transformers' DynamicLayer concatenates on every update (copying the whole cache each step); this layer writes
    the new columns into spare capacity and only reallocates when it runs out.
    """

    def __init__(self):
        super().__init__()
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def set_states(self, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None) -> None:
        """Replace the contents by copies of keys/values [B, H, T, D] in a buffer of at least `capacity` columns."""
        t = keys.shape[-2]
        cap = max(capacity or 0, _capacity_for(t))
        b, h, _, d = keys.shape
        self._k_buf = keys.new_empty((b, h, cap, d))
        self._v_buf = values.new_empty((b, values.shape[1], cap, values.shape[-1]))
        self._k_buf[:, :, :t].copy_(keys)
        self._v_buf[:, :, :t].copy_(values)
        self._len = t
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._refresh_views()

    def allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, batch: int, capacity: int, length: int) -> None:
        """Fresh zeroed buffers [batch, H, capacity, D] holding `length` positions (filled by write_right_aligned);
        zeros are what padding columns hold."""
        self._k_buf = like_k.new_zeros((batch, like_k.shape[1], capacity, like_k.shape[-1]))
        self._v_buf = like_v.new_zeros((batch, like_v.shape[1], capacity, like_v.shape[-1]))
        self._len = length
        if not self.is_initialized:
            self.lazy_initialization(like_k, like_v)
        self._refresh_views()

    def write_right_aligned(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy rows keys/values [b, H, t, D] into rows row..row+b so that they end at the current length."""
        b, t = keys.shape[0], keys.shape[-2]
        self._k_buf[row : row + b, :, self._len - t : self._len].copy_(keys)
        self._v_buf[row : row + b, :, self._len - t : self._len].copy_(values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, H, q, D] for the q new positions
        if self._k_buf is None:
            self.set_states(key_states, value_states)
            return self.keys, self.values
        q = key_states.shape[-2]
        if self._len + q > self._k_buf.shape[-2]:
            self.set_states(self.keys, self.values, capacity=_capacity_for(self._len + q))
        self._k_buf[:, :, self._len : self._len + q].copy_(key_states)
        self._v_buf[:, :, self._len : self._len + q].copy_(value_states)
        self._len += q
        self._refresh_views()
        return self.keys, self.values

    def _refresh_views(self) -> None:
        self.keys = self._k_buf[:, :, : self._len]
        self.values = self._v_buf[:, :, : self._len]

    def get_seq_length(self) -> int:
        return self._len

    def reset(self) -> None:
        self._k_buf = self._v_buf = None
        self._len = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BufferedLayer is reshaped through BatchKV, not crop()")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BufferedLayer is reshaped through BatchKV, not batch_select_indices()")

    @property
    def nbytes(self) -> int:
        if self._k_buf is None:
            return 0
        return self._k_buf.numel() * self._k_buf.element_size() + self._v_buf.numel() * self._v_buf.element_size()


# Per-layer (keys, values), each [1, H, L, D]: the KV of one sequence outside any batch (TransformersRunner's
# format; LlamaRunner exports one (keys, values) pair of [layers, H, L, D]). The prefix cache stores either.
SequenceKV = list[tuple[torch.Tensor, torch.Tensor]]


def kv_nbytes(kv) -> int:
    """Bytes of a runner's exported KV: nested tuples/lists of tensors."""
    if isinstance(kv, torch.Tensor):
        return kv.numel() * kv.element_size()
    return sum(kv_nbytes(part) for part in kv)


def new_cache(num_layers: int, prefix: SequenceKV | None = None, upto: int | None = None) -> Cache:
    """A cache of BufferedLayers, optionally starting from the first `upto` positions of a sequence's KV."""
    layers = [BufferedLayer() for _ in range(num_layers)]
    if prefix is not None:
        for layer, (k, v) in zip(layers, prefix):
            layer.set_states(k[:, :, :upto], v[:, :, :upto])
    return Cache(layers=layers)


def sequence_kv(cache: Cache, row: int = 0, length: int | None = None) -> SequenceKV:
    """Contiguous copies of one row's last `length` positions (all of them by default): [1, H, L, D] per layer."""
    out = []
    for layer in cache.layers:
        t = layer.keys.shape[-2]
        start = t - (t if length is None else length)
        out.append((layer.keys[row : row + 1, :, start:].clone(), layer.values[row : row + 1, :, start:].clone()))
    return out


class BatchKV:
    """The running batch's KV: rows left-padded to a common length T (see the module docstring)."""

    def __init__(self, num_layers: int, device: torch.device):
        self.num_layers = num_layers
        self.device = device
        self.cache: Cache | None = None
        self.pads: list[int] = []  # left-padding columns per row
        self.width = 0  # T, the common row length including padding

    @property
    def batch_size(self) -> int:
        return len(self.pads)

    def lengths(self) -> list[int]:
        """Real (unpadded) tokens per row = the position id of each row's next token."""
        return [self.width - p for p in self.pads]

    def add_rows(self, rows: list[SequenceKV]) -> None:
        """Append sequences (their KV [1, H, L_i, D] per layer) as new rows at the end of the batch."""
        if not rows:
            return
        new_lengths = [r[0][0].shape[-2] for r in rows]
        width = max([self.width, *new_lengths])
        shift = width - self.width  # existing rows gain this much left padding
        pads = [p + shift for p in self.pads] + [width - n for n in new_lengths]
        layers = []
        for li in range(self.num_layers):
            old = self.cache.layers[li] if self.pads else None
            sources_k = ([old.keys] if old else []) + [r[li][0] for r in rows]
            sources_v = ([old.values] if old else []) + [r[li][1] for r in rows]
            layer = BufferedLayer()
            layer.allocate(sources_k[0], sources_v[0], len(pads), _capacity_for(width), width)
            b = 0
            for k, v in zip(sources_k, sources_v):
                layer.write_right_aligned(b, k, v)
                b += k.shape[0]
            layers.append(layer)
        self.cache = Cache(layers=layers)
        self.pads = pads
        self.width = width

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the listed rows (in that order) and trim columns that are padding in every kept row."""
        if not keep:
            self.cache, self.pads, self.width = None, [], 0
            return
        pads = [self.pads[i] for i in keep]
        trim = min(pads)
        width = self.width - trim
        for li, old in enumerate(self.cache.layers):
            layer = BufferedLayer()
            layer.allocate(old.keys, old.values, len(keep), _capacity_for(width), width)
            for j, i in enumerate(keep):
                layer.write_right_aligned(j, old.keys[i : i + 1, :, trim:], old.values[i : i + 1, :, trim:])
            self.cache.layers[li] = layer
        self.pads = [p - trim for p in pads]
        self.width = width

    def row_kv(self, row: int) -> SequenceKV:
        return sequence_kv(self.cache, row, self.width - self.pads[row])

    def step_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Attention mask [B, T+1] (None when no row is padded) and position ids [B, 1] for one decode step."""
        lengths = torch.tensor(self.lengths(), device=self.device)
        position_ids = lengths.unsqueeze(1)
        if not any(self.pads):
            return None, position_ids
        cols = torch.arange(self.width + 1, device=self.device)
        pads = torch.tensor(self.pads, device=self.device)
        return (cols.unsqueeze(0) >= pads.unsqueeze(1)).long(), position_ids

    def after_step(self) -> None:
        """The cache grew by one column in every row (the model wrote it during the forward)."""
        self.width += 1

    @property
    def nbytes(self) -> int:
        return 0 if self.cache is None else sum(layer.nbytes for layer in self.cache.layers)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths())


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class ImageRun:
    """One image's token run inside a sequence: its content key, first position and token count."""

    key: str
    start: int
    num_tokens: int


@dataclass
class PrefixEntry:
    ids: tuple[int, ...]
    images: list[ImageRun]
    kv: SequenceKV = field(repr=False)
    namespace: str = ""  # entries match only requests of the same namespace (the same LoRA adapter)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


@dataclass
class PrefixMatch:
    entry: PrefixEntry
    length: int  # reusable positions: KV [:length] of the entry equals what the new sequence would compute


def common_prefix(a: Sequence[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    # compare in chunks first: long shared prefixes are the common case
    i, step = 0, 256
    while i + step <= n and list(a[i : i + step]) == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def images_agree(length: int, entry_images: list[ImageRun], images: list[ImageRun]) -> int:
    """Shorten `length` to the start of the first image inside it whose content differs between the sequences."""
    for i, mine in enumerate(images):
        if mine.start >= length:
            break
        if i >= len(entry_images) or mine != entry_images[i]:
            return mine.start
    return length


class PrefixCache:
    """LRU of finished sequences' KV, bounded by the total number of cached positions."""

    def __init__(self, max_tokens: int, min_match: int):
        self.max_tokens = max_tokens
        self.min_match = min_match
        self.counters = CacheCounters()
        self.reused_tokens = 0
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next_id = 0
        self.num_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(kv_nbytes(e.kv) for e in self._entries.values())

    def lookup(self, ids: list[int], images: list[ImageRun], *, longer_than: int = 0,
               count: bool = True, namespace: str = "") -> PrefixMatch | None:
        """The longest reusable prefix for `ids` (longer than `longer_than`); always leaves at least one position
        to compute. With count=False the caller records the outcome itself (`record`)."""
        best: tuple[int, int] | None = None
        if self.max_tokens > 0:
            for key, entry in self._entries.items():
                if entry.namespace != namespace:
                    continue
                n = common_prefix(entry.ids, ids)
                n = images_agree(min(n, len(ids) - 1), entry.images, images)
                if n >= self.min_match and n > longer_than and (best is None or n > best[1]):
                    best = (key, n)
        if best is None:
            if count:
                self.record(0)
            return None
        self._entries.move_to_end(best[0])
        if count:
            self.record(best[1])
        return PrefixMatch(self._entries[best[0]], best[1])

    def record(self, reused: int) -> None:
        """Count one lookup that reused `reused` positions (0 = a miss)."""
        if reused:
            self.counters.hits += 1
            self.reused_tokens += reused
        else:
            self.counters.misses += 1

    def would_keep(self, num_tokens: int) -> bool:
        """Whether a sequence of this length is worth caching (long enough to match, small enough to fit)."""
        return self.min_match <= num_tokens <= self.max_tokens

    def insert(self, ids: list[int], images: list[ImageRun], kv: SequenceKV, namespace: str = "") -> bool:
        """Cache a sequence's KV [1, H, len(ids), D]; entries it extends are dropped. False if it cannot fit."""
        n = len(ids)
        if not self.would_keep(n):
            return False
        entry = PrefixEntry(tuple(ids), list(images), kv, namespace)
        self._drop_superseded(entry)
        while self.num_tokens + n > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self.num_tokens -= old.num_tokens
            self.counters.evictions += 1
        self._entries[self._next_id] = entry
        self._next_id += 1
        self.num_tokens += n
        return True

    def _drop_superseded(self, new: PrefixEntry) -> None:
        # an entry that is a prefix of the new one (same images) can only ever match less than the new one
        for key, old in list(self._entries.items()):
            if (old.namespace == new.namespace and old.num_tokens <= new.num_tokens
                    and new.ids[: old.num_tokens] == old.ids):
                if images_agree(old.num_tokens, new.images, old.images) == old.num_tokens:
                    del self._entries[key]
                    self.num_tokens -= old.num_tokens

    def clear(self) -> None:
        self._entries.clear()
        self.num_tokens = 0


class ImageFeatureCache:
    """LRU of image features [num_tokens, hidden] keyed by the image's content + processing key, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.counters = CacheCounters()
        self.nbytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def peek(self, key: str) -> torch.Tensor | None:
        """The entry without counting a hit or refreshing it (safe from another thread: one dict read)."""
        return self._entries.get(key)

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._entries.get(key)
        if feats is None:
            self.counters.misses += 1
            return None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return  # larger than the whole budget: use it once, never cache it
        if key in self._entries:
            self.nbytes -= self._size(self._entries.pop(key))
        while self.nbytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= self._size(old)
            self.counters.evictions += 1
        self._entries[key] = feats
        self.nbytes += size

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
