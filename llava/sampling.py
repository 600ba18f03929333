"""Per-request decoding rules: sampling parameters, next-token choice, incremental detokenisation and stop strings.

Promises:
- `SamplingParams` validates itself on construction; a bad value raises `InvalidSamplingParamsError` (a
  `ValueError`) whose `.field` names the offending field.
- `choose_next_tokens` picks one token per row of a logits batch: greedy when temperature is 0, otherwise
  temperature / top-k / top-p sampling drawn from the row's own seeded `torch.Generator`, so a seeded request
  yields the same tokens whether it runs alone or inside a batch, given the same logits (in float32; in bf16 a batch
  row's logits can round differently from a lone row's and now and then flip a draw).
- `IncrementalDetokenizer` turns a growing token list into text deltas without ever splitting a multi-byte
  character, and `StopStringMatcher` finds stop strings even when they straddle token boundaries, holding back
  only the text that could still become a stop string.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from llava.config import MAX_TOP_LOGPROBS
from llava.structured import Constraint

# A top-k of 0 and a top-p of 1.0 both mean "no truncation", as in transformers and vLLM.
NO_TOP_K = 0
MAX_SEED = 2**63 - 1


class InvalidSamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type; `.field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"invalid sampling parameter {field_name!r}: {message}")
        self.field = field_name


def _check_number(name: str, value, *, integer: bool = False) -> None:
    # bool is an int subclass; True as a temperature is a caller bug, not 1.0.
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidSamplingParamsError(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise InvalidSamplingParamsError(name, f"must be finite, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 = greedy; top_k 0 and top_p 1.0 disable truncation."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = NO_TOP_K
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no log-probabilities; k >= 0: each generated token's log-probability and the k likeliest alternatives
    # (log-softmax of the model's logits before any penalty, temperature or truncation), OpenAI's `top_logprobs`
    logprobs: int | None = None
    # the output must match this (JSON schema, any JSON object, regex, choices, Lark grammar; llava.structured)
    constraint: Constraint | None = None

    def __post_init__(self):
        _check_number("max_new_tokens", self.max_new_tokens, integer=True)
        if self.max_new_tokens < 1:
            raise InvalidSamplingParamsError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidSamplingParamsError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise InvalidSamplingParamsError("top_k", f"must be >= 0 (0 = disabled), got {self.top_k}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidSamplingParamsError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
            if not 0 <= self.seed <= MAX_SEED:
                raise InvalidSamplingParamsError("seed", f"must be in [0, 2**63 - 1], got {self.seed}")
        self._normalise_stop()
        self._normalise_stop_token_ids()
        if not isinstance(self.ignore_eos, bool):
            raise InvalidSamplingParamsError("ignore_eos", f"expected a bool, got {self.ignore_eos!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise InvalidSamplingParamsError("constraint", f"expected a llava.structured.Constraint, got "
                                                           f"{type(self.constraint).__name__}")
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, integer=True)
            if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidSamplingParamsError(
                    "logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {self.logprobs}")

    def _normalise_stop(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise InvalidSamplingParamsError("stop", f"expected a string or a list of strings, got {self.stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidSamplingParamsError("stop", f"stop strings must be non-empty strings, got {s!r}")
        # frozen dataclass: normalising a field needs object.__setattr__
        object.__setattr__(self, "stop", tuple(stop))

    def _normalise_stop_token_ids(self) -> None:
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise InvalidSamplingParamsError("stop_token_ids", f"expected a list of ints, got {ids!r}")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise InvalidSamplingParamsError("stop_token_ids", f"token ids must be ints >= 0, got {i!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator for a sampling request (None for greedy). Unseeded requests get a fresh random seed."""
    if params.is_greedy:
        return None
    gen = torch.Generator(device="cpu")
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on a [V] logits row: seen tokens' positive logits are divided, negative ones multiplied."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    picked = logits.gather(0, seen_ids)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(0, seen_ids, picked)


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask a [V] row to its top-k tokens and then to the smallest set whose probability mass reaches top_p."""
    if top_k != NO_TOP_K and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


@dataclass
class RowSampler:
    """The state one running request needs to choose its next token."""

    params: SamplingParams
    generator: torch.Generator | None
    # ids the repetition penalty looks at (prompt + generated); kept as a set so growth is O(1)
    seen: set[int] = field(default_factory=set)

    def choose(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 on the CPU."""
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen:
            seen = torch.tensor(sorted(self.seen), dtype=torch.long)
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if p.is_greedy:
            return int(torch.argmax(logits))
        logits = _truncate(logits / p.temperature, p.top_k, p.top_p)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def observe(self, token_id: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token_id)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the likeliest alternatives at its position, as (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: list[int], samplers: list[RowSampler]) -> list[TokenLogprob | None]:
    """For the rows whose request asked for them: log-softmax of the raw logits [B, V] at the chosen token, and
    the top-k alternatives. Rows that did not ask get None (and cost nothing)."""
    rows = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(samplers)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
    k = max(samplers[i].params.logprobs for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    for j, i in enumerate(rows):
        n = samplers[i].params.logprobs
        top = tuple(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist()))
        out[i] = TokenLogprob(tokens[i], float(lp[j, tokens[i]]), top)
    return out


def choose_next_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """One token per row of logits [B, V] (any device / dtype). Plain greedy rows are decided in one argmax."""
    plain_greedy = [s.params.is_greedy and s.params.repetition_penalty == 1.0 for s in samplers]
    out = [0] * len(samplers)
    if any(plain_greedy):
        greedy_ids = torch.argmax(logits, dim=-1).tolist()
        for i, g in enumerate(plain_greedy):
            if g:
                out[i] = greedy_ids[i]
    rest = [i for i, g in enumerate(plain_greedy) if not g]
    if rest:
        rows = logits[rest].float().cpu()
        for j, i in enumerate(rest):
            out[i] = samplers[i].choose(rows[j])
    for s, t in zip(samplers, out):
        s.observe(t)
    return out


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-ins byte-level BPE vocabularies (GPT-2, Qwen, SmolLM, Llama 3) use for the 256 bytes:
    printable Latin-1 bytes stand for themselves, the others map to code points from 256 upward, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact UTF-8 bytes one token contributes (a token may hold part of a character): byte-level BPE pieces
    mapped back through their byte alphabet, SentencePiece pieces with `▁` as space and `<0xNN>` byte fallback;
    special tokens as their text."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    if m := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    if token_id in getattr(tokenizer, "all_special_ids", ()):
        return piece.encode()
    if _is_byte_level(tokenizer) and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return piece.replace("\u2581", " ").encode()


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return "ByteLevel" in repr(decoder)


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids; a delta never ends inside a multi-byte character.

    Decodes only a short window (from the last point where text was complete) instead of the whole output, so
    the cost per token stays constant. Special tokens are skipped.
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoding from here is known to be clean
        self._read_offset = 0  # tokens before this are already turned into text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        done = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(window, skip_special_tokens=True)
        # U+FFFD at the end means the last token(s) hold only part of a character's bytes: wait for the rest
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(done) :]
        return ""

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete character decodes to U+FFFD), for the end of output."""
        done = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(done) :]


class StopStringMatcher:
    """Finds the first stop string in streamed text and decides how much text is safe to emit.

    `feed(delta)` returns (text_to_emit, stopped). Text that could be the beginning of a stop string is held back
    until it is disproven; once a stop string is found, the text before it is emitted and the rest dropped.
    """

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._text = ""
        self._emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        self._text += delta
        if not self._stops:
            return self._take(len(self._text)), False
        # emitted text holds no complete stop string, so a match can only start in its last (longest - 1) chars
        search_from = max(0, self._emitted - self._longest + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        return self._take(len(self._text) - self._held_back()), False

    def flush(self) -> str:
        """Everything still held back (call when generation ends for another reason)."""
        return self._take(len(self._text))

    def _held_back(self) -> int:
        # the longest suffix of the text that is a proper prefix of some stop string
        for n in range(min(self._longest - 1, len(self._text) - self._emitted), 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
