"""The benchmark's requests: deterministic prompts of exact token lengths cut from one fixed paragraph."""

from __future__ import annotations

import random
from dataclasses import dataclass

PARAGRAPH = (
    "The river begins as a thin stream high in the hills, where snow lingers long into the spring and the air "
    "smells of pine and wet stone. It gathers water from a hundred small springs as it falls, cutting narrow "
    "valleys through the rock and turning the wheels of old mills that once ground grain for the villages below. "
    "By the time it reaches the plain it has grown wide and slow, carrying silt that farmers have relied on for "
    "centuries to keep their fields rich. Towns grew up at the places where it could be crossed, first by ferry "
    "and later by bridges of timber, then stone, then steel. Merchants followed the water, and with them came "
    "news, songs, quarrels and new ideas. Today the barges are fewer and the mills are museums, but people still "
    "walk along the banks in the evening, watching the light change on the water and talking about the weather, "
    "the harvest and the small events that make up the history of a place."
)
LENGTH_SEARCH = 8  # how far from the target a cut may be moved to make the re-tokenised prompt exact


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_ids: list[int]  # what the server's tokenizer makes of `prompt`, special tokens included
    max_tokens: int


def parse_range(text: str) -> tuple[int, int]:
    """'64-128' -> (64, 128); '128' -> (128, 128)."""
    low, _, high = text.partition("-")
    bounds = (int(low), int(high or low))
    if bounds[0] < 1 or bounds[0] > bounds[1]:
        raise ValueError(f"not a range of positive integers: {text!r}")
    return bounds


def build_workload(tokenizer, count: int, prompt_tokens: tuple[int, int], max_tokens: tuple[int, int],
                   seed: int = 0) -> list[BenchRequest]:
    """`count` requests; the first n of them are the workload at concurrency n, so every sweep point shares them."""
    rng = random.Random(seed)
    words = PARAGRAPH.split()
    requests = []
    for _ in range(count):
        length = rng.randint(*prompt_tokens)
        new_tokens = rng.randint(*max_tokens)
        start = rng.randrange(len(words))
        prompt, prompt_ids = prompt_of_length(tokenizer, words_from(words, start, length), length)
        requests.append(BenchRequest(prompt, prompt_ids, new_tokens))
    return requests


def words_from(words: list[str], start: int, length: int) -> str:
    """Enough text from word `start` on, wrapping around the paragraph, for `length` tokens and some slack."""
    wanted = 2 * length + 2 * LENGTH_SEARCH  # a word is at least one token
    repeats = wanted // len(words) + 2
    return " ".join((words * repeats)[start:start + wanted])


def prompt_of_length(tokenizer, text: str, length: int) -> tuple[str, list[int]]:
    body_ids = tokenizer(text, add_special_tokens=False).input_ids
    specials = len(tokenizer("a").input_ids) - len(tokenizer("a", add_special_tokens=False).input_ids)
    target = length - specials
    # Decoding a cut and encoding it again can merge or split a token at the edges: move the cut until exact.
    for shift in sorted(range(-LENGTH_SEARCH, LENGTH_SEARCH + 1), key=abs):
        cut = target + shift
        if cut < 1:
            continue
        prompt = tokenizer.decode(body_ids[:cut], skip_special_tokens=True).strip()
        prompt_ids = tokenizer(prompt).input_ids
        if len(prompt_ids) == length:
            return prompt, prompt_ids
    raise ValueError(f"cannot cut a prompt of exactly {length} tokens from the benchmark paragraph")
