"""Structured output: decoding constrained to a JSON schema, any JSON object, a regular expression, a list of
choices or a Lark grammar, through llguidance (a token mask per step and row, so constrained requests batch with
everything else).

Promises:
- `Constraint` names what the output must match; `Constraint.grammar()` is llguidance's grammar for it.
- `Guide.matcher` checks the constraint against the tokenizer when the request is submitted: an invalid schema,
  regex or grammar raises `ConstraintError` naming the cause, before any token is generated.
- `Guide.mask` sets every token the matcher forbids to -inf in the rows' logits, in place; the end-of-sequence
  tokens are allowed exactly when the output so far is complete. A matcher that is stopped (the grammar cannot
  continue) ends its request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class ConstraintError(ValueError):
    """A constraint that cannot be used (bad schema / regex / grammar, or llguidance missing); names the cause."""


@dataclass(frozen=True)
class Constraint:
    """kind: json_schema (spec: the schema, JSON text or a dict), json_object (any JSON object), regex (spec: the
    pattern), choice (spec: the strings), grammar (spec: a Lark grammar)."""

    kind: str
    spec: object = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.kind == "json_schema":
            spec = json.loads(self.spec) if isinstance(self.spec, str) else self.spec
            if not isinstance(spec, dict):
                raise ConstraintError(f"a JSON schema must be an object, got {type(spec).__name__}")
            object.__setattr__(self, "spec", json.dumps(spec))  # hashable; property order kept (it is the output order)
        elif self.kind == "choice":
            if isinstance(self.spec, str) or not isinstance(self.spec, Sequence) or not self.spec or not all(
                    isinstance(c, str) and c for c in self.spec):
                raise ConstraintError("choice needs a non-empty list of non-empty strings")
            object.__setattr__(self, "spec", tuple(self.spec))
        elif self.kind in ("regex", "grammar") and (not isinstance(self.spec, str) or not self.spec):
            raise ConstraintError(f"{self.kind} needs a non-empty string")

    def grammar(self) -> str:
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults={"whitespace_flexible": False})
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.spec))
        return LLMatcher.grammar_from_lark(self.spec)


class Guide:
    """llguidance for one tokenizer: its token table (built once, about a second) and the per-request matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        try:
            import llguidance
            import llguidance.hf
        except ImportError as e:
            raise ConstraintError(f"structured output needs llguidance (pip install llguidance): {e}") from None
        self.vocab_size = vocab_size
        self._lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._bits = torch.arange(32, dtype=torch.int32)
        self._executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))

    def matcher(self, constraint: Constraint):
        from llguidance import LLMatcher

        try:
            grammar = constraint.grammar()
        except ValueError as e:
            raise ConstraintError(f"invalid {constraint.kind}: {e}") from None
        error = LLMatcher.validate_grammar(grammar, self._lltok)
        if error and not error.startswith("WARNING"):
            raise ConstraintError(f"invalid {constraint.kind}: {error}")
        m = LLMatcher(self._lltok, grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(f"invalid {constraint.kind}: {m.get_error()}")
        return m

    def mask(self, logits: torch.Tensor, matchers: Sequence) -> None:
        """Forbidden tokens of each row with a matcher -> -inf, in place (logits [B, V])."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(rows), words, dtype=torch.int32)
        if len(rows) == 1:
            matchers[rows[0]].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        else:  # llguidance's thread pool computes the rows' masks in parallel, outside the GIL
            self._executor.unsafe_compute_mask_ptr([(matchers[i], j) for j, i in enumerate(rows)],
                                                   bitmask.data_ptr(), words * 4, len(rows))
        allowed = ((bitmask.unsqueeze(-1) >> self._bits) & 1).reshape(len(rows), -1)[:, : logits.shape[-1]]
        sub = logits[rows]
        width = min(sub.shape[-1], allowed.shape[-1])
        sub[:, :width].masked_fill_(allowed[:, :width] == 0, float("-inf"))
        if sub.shape[-1] > width:
            sub[:, width:] = float("-inf")
        logits[rows] = sub

