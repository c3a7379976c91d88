"""Token ids to text, one token at a time, and stop-string matching over the growing text."""

from __future__ import annotations

# Decode a few prompt tokens ahead of the first generated one so its leading space survives SentencePiece.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text deltas that concatenate to the same text as decoding all generated ids after the prompt."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        # A trailing U+FFFD is an unfinished multi-byte character: wait for its next byte unless at the end.
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]


class StopMatcher:
    """Holds back text that might be the start of a stop string; cuts the text before a full match."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.released = 0
        self.stopped = False

    def feed(self, delta: str, check: bool = True) -> str:
        """Append delta; return the text now safe to release. With check=False nothing can stop yet."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops or not check:
            return self._release(len(self.text))
        search_from = max(0, self.released - max(map(len, self.stops)) + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._partial_stop_suffix())

    def flush(self) -> str:
        return self._release(len(self.text))

    def _partial_stop_suffix(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released : upto], upto
        return out


class TokenTexts:
    """A token's text as it reads mid-sentence: SentencePiece drops a leading space when a token is decoded alone,
    so decode it after an anchor token and cut the anchor's text off."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode(self.anchor + [token_id])[len(self.anchor_text) :]
            self.cache[token_id] = text
        return text
