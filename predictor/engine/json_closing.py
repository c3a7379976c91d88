"""Closing a constrained JSON within its token budget.

A grammar only says what may come next, not when to stop: a model that never picks the closing quote (a random
one, or a real one rambling) writes one endless string until max_new_tokens cuts it, and the client gets
unfinished JSON. So each constrained sequence watches its budget. While the tokens it has left are more than a
short way of finishing the JSON needs, nothing changes; once they are not, only the tokens that spell the next
piece of that way stay allowed, and the JSON ends, complete, within the budget.

The way to finish is found on a fork of the sequence's grammar matcher, a character at a time: the text the
grammar forces (a required key, a separator), else the first character the grammar accepts of: a closing quote
inside a string; outside one `}`, `]`, `,`, then the shortest values (`""`, `0`, `null`, `false`, `true`, `[`,
`{`), then any printable ASCII (an enum's or pattern's first character), then a UTF-8 continuation byte (after a
byte token that began a character). Each token spells at least one byte, so the way's length in bytes bounds
the tokens it takes. Looking takes some 50-150 us (a few bytes of grammar per byte of the way), so a sequence
looks only in its budget's last HORIZON tokens, every LOOK_EVERY tokens while the way is far out of reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import xgrammar as xgr

HORIZON = 256  # look for a way to finish only this many tokens from the budget's end, and no longer a way
MARGIN = 4  # tokens to spare when closing begins: one token (a quote, a brace) can lengthen the way before the next
LOOK_EVERY = 8  # tokens between looks for a way while it is out of reach; every token once it is within this
OUTSIDE_STRINGS = [c.encode() for c in ("}", "]", ",", '"', "0", "n", "f", "t", "[", "{", "-")]
IN_STRINGS = [b'"']
# Then any printable ASCII, then a UTF-8 continuation byte (to finish a character a byte token began).
ANY_CHARACTER = [bytes([b]) for b in (*range(0x20, 0x7F), *range(0x80, 0xC0))]
QUOTE, BACKSLASH = 0x22, 0x5C


@dataclass
class StringState:
    """Where the JSON text so far stands lexically: inside a string, and just after a backslash in one."""

    in_string: bool = False
    escaped: bool = False

    def feed(self, text: bytes) -> None:
        for byte in text:
            if self.escaped:
                self.escaped = False
            elif self.in_string and byte == BACKSLASH:
                self.escaped = True
            elif byte == QUOTE:
                self.in_string = not self.in_string

    def copy(self) -> StringState:
        return StringState(self.in_string, self.escaped)


def way_to_finish(matcher: xgr.GrammarMatcher, state: StringState, limit: int = HORIZON) -> bytes | None:
    """Text that completes the grammar from the matcher's state (left untouched); None past limit bytes."""
    fork, state, text = matcher.fork(), state.copy(), bytearray()
    while not fork.is_completed():
        if len(text) > limit:
            return None
        step = fork.find_jump_forward_string().encode()
        if step:
            fork.accept_string(step)
        else:
            firsts = IN_STRINGS if state.in_string else OUTSIDE_STRINGS
            step = next((c for c in firsts + ANY_CHARACTER if fork.accept_string(c)), None)
            if step is None:
                return None
        state.feed(step)
        text += step
    return bytes(text)


class Spellings:
    """Which tokens spell which bytes (special tokens left out), for the tokens that begin a given text."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo):
        self.token_bytes: list[bytes] = tokenizer_info.decoded_vocab
        special = set(tokenizer_info.special_token_ids)
        self._tokens: dict[bytes, list[int]] = {}
        for token, spelled in enumerate(self.token_bytes):
            if spelled and token not in special:
                self._tokens.setdefault(spelled, []).append(token)
        self._longest = max(map(len, self._tokens), default=0)

    def beginning(self, text: bytes) -> list[int]:
        """The tokens whose bytes are a non-empty prefix of text."""
        ends = range(1, min(len(text), self._longest) + 1)
        return [token for end in ends for token in self._tokens.get(text[:end], ())]


class Closing:
    """One sequence's budget: the tokens it has left, and once they run short, the way it finishes.

    decide() runs once per step, before the step's token is accepted, on the live sequence and on a preempted
    one's replay alike, so a resumed sequence closes exactly where it would have.
    """

    def __init__(self, spellings: Spellings, max_tokens: int):
        self.spellings = spellings
        self.left = max_tokens
        self.state = StringState()
        self.way: bytes | None = None  # what is left of the way to finish, once closing
        self._look_from = HORIZON  # look for a way once left is at most this
        self._decided = False

    def decide(self, matcher: xgr.GrammarMatcher) -> None:
        if self._decided:
            return
        self._decided = True
        if self.way is not None or self.left > self._look_from:
            return
        way = way_to_finish(matcher, self.state)
        reach = len(way) + 1 + MARGIN if way is not None else 0  # + 1: the stop token
        if self.left <= reach:
            self.way = way
        else:
            self._look_from = max(self.left - LOOK_EVERY, min(self.left - 1, reach + LOOK_EVERY))

    def allowed(self) -> list[int] | None:
        """The tokens this step may take beyond the grammar's say; None: whatever the grammar allows."""
        return self.spellings.beginning(self.way) if self.way else None

    def accepted(self, token: int) -> None:
        spelled = self.spellings.token_bytes[token]
        self.left -= 1
        self.state.feed(spelled)
        if self.way is not None:
            self.way = self.way[len(spelled):] if self.way.startswith(spelled) else None
        self._decided = False
