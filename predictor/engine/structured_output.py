"""Structured output: a sequence's text held to JSON that matches a schema, by masking at each step the tokens
that would break it.

xgrammar (vLLM's grammar backend) compiles a schema against the tokenizer's vocabulary once (compiled grammars
are cached); each constrained sequence has a matcher that says which tokens may come next, as a bitmask, and
advances with each token drawn. The sampler writes the constrained rows' masks into one batch bitmask and
applies it to the logits in one call, so constrained and free sequences share every step.

JSON is written compactly (", " and ": " between items, no other whitespace): a model cannot wander into
endless whitespace, and the output is one line. Properties the schema does not name are not generated.
Once the JSON is complete only a stop token is allowed; accepting it ends the matcher. As a sequence's token
budget runs out, its matcher steers it to finish the JSON in time (predictor/engine/json_closing.py).

Compiling costs grow faster than the schema (1,000 optional properties: ~5 s on a CPU core; 30,000 enum values:
~40 s) and xgrammar has no deadline, so the schema's serialized size is bounded (max_schema_bytes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
import xgrammar as xgr

from predictor.engine.errors import InvalidRequest
from predictor.engine.json_closing import Closing, Spellings

ANY_JSON_OBJECT = {"type": "object"}
CACHE_BYTES = 64 << 20  # compiled grammars kept for reuse; distinct schemas beyond this evict the oldest
MAX_SCHEMA_BYTES = 32 << 10
_CPP_LOCATION = re.compile(r"^\[[^\]]*\] \S+:\d+: ")  # "[22:33:58] /project/cpp/x.cc:4944: " before a message


class Grammars:
    """Compiles JSON schemas against one tokenizer's vocabulary (thread-safe; compiled grammars are cached)."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, stop_token_ids: list[int], max_threads: int = 2,
                 max_schema_bytes: int = MAX_SCHEMA_BYTES):
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_schema_bytes = max_schema_bytes
        self.spellings = Spellings(tokenizer_info)
        self._compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=max_threads, cache_limit_bytes=CACHE_BYTES)

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, stop_token_ids: set[int],
                      max_schema_bytes: int = MAX_SCHEMA_BYTES) -> Grammars:
        """From a Hugging Face tokenizer; vocab_size is the model's (its logits may be wider than the vocab)."""
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        return cls(info, sorted(stop_token_ids), max_schema_bytes=max_schema_bytes)

    def check_size(self, json_schema: dict, field: str) -> str:
        """The schema serialized, if it is within max_schema_bytes; else an InvalidRequest naming field."""
        return schema_text(json_schema, field, self.max_schema_bytes)

    def compile(self, json_schema: dict, field: str) -> Grammar:
        """The schema's grammar; a schema too large or that xgrammar cannot use is an InvalidRequest naming
        field."""
        return self.compile_text(self.check_size(json_schema, field), field)

    def compile_text(self, text: str, field: str) -> Grammar:
        """The grammar of a schema schema_text() wrote; one that xgrammar cannot use is an InvalidRequest naming
        field."""
        try:
            compiled = self._compiler.compile_json_schema(text, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as err:  # xgrammar's refusals of a schema it cannot use
            raise InvalidRequest(field, f"unusable JSON schema: {_CPP_LOCATION.sub('', str(err)).strip()}") from None
        return Grammar(compiled, self.stop_token_ids, self.spellings)


def schema_text(json_schema: dict, field: str, max_schema_bytes: int) -> str:
    """The schema serialized, if it is within max_schema_bytes; else an InvalidRequest naming field."""
    text = json.dumps(json_schema)
    size = len(text.encode())
    if size > max_schema_bytes:
        raise InvalidRequest(field, f"the JSON schema is {size} bytes, more than max_schema_bytes "
                                    f"({max_schema_bytes})")
    return text


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, the tokens that end it (the model's EOS), and what each token spells."""

    compiled: xgr.CompiledGrammar
    stop_token_ids: list[int]
    spellings: Spellings

    def matcher(self, tokens: list[int], max_tokens: int | None = None) -> Matcher:
        """A matcher that has accepted tokens, the output so far (so a preempted sequence resumes where it was);
        with max_tokens, the output's budget, it steers the output to finish within it."""
        return Matcher(self, tokens, max_tokens)


class Matcher:
    """One sequence's place in its grammar, and in its token budget."""

    def __init__(self, grammar: Grammar, tokens: list[int], max_tokens: int | None = None):
        self._matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=grammar.stop_token_ids)
        self._closing = Closing(grammar.spellings, max_tokens) if max_tokens is not None else None
        for token in tokens:
            if self._closing is not None:
                self._closing.decide(self._matcher)  # as when this token was drawn
            if not self.accept(token):
                raise ValueError(f"token {token} of the output so far breaks its grammar")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._closing is not None:
            self._closing.decide(self._matcher)
            keep_only(bitmask, row, self._closing.allowed())

    def accept(self, token: int) -> bool:
        if not self._matcher.accept_token(token):
            return False
        if self._closing is not None:
            self._closing.accepted(token)
        return True

    @property
    def terminated(self) -> bool:
        """The output is complete and its stop token accepted: nothing more may follow."""
        return self._matcher.is_terminated()


def keep_only(bitmask: torch.Tensor, row: int, tokens: list[int] | None) -> None:
    """Narrow row's allowed tokens (a bit each, 32 to an int32 word) to those of tokens it allows; unchanged if
    tokens is None or it allows none of them."""
    if not tokens:
        return
    words: dict[int, int] = {}
    for token in tokens:
        word, bit = token >> 5, token & 31
        if (int(bitmask[row, word]) >> bit) & 1:
            words[word] = words.get(word, 0) | 1 << bit
    if not words:
        return
    bitmask[row].zero_()
    signed = [value - (1 << 32) if value >= 1 << 31 else value for value in words.values()]
    bitmask[row, list(words)] = torch.tensor(signed, dtype=bitmask.dtype)


class BatchMask:
    """The tokens each constrained row may take next, written into one bitmask reused every step."""

    def __init__(self, max_rows: int, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)  # on the CPU, where matchers write

    def apply(self, scores: torch.Tensor, rows: list[tuple[int, Matcher]]) -> None:
        """Set to -inf, in place, every token of scores [B, V] that row i's matcher does not allow."""
        for row, matcher in rows:
            matcher.fill(self._bitmask, row)
        bitmask = self._bitmask[: scores.shape[0]].to(scores.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=self.vocab_size, indices=[r for r, _ in rows])
