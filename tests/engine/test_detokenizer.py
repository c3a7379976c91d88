"""Incremental detokenization and stop-string matching, on the real Llama-2 tokenizer."""

from __future__ import annotations

from predictor.engine.detokenizer import IncrementalDetokenizer, StopMatcher


def test_stop_matcher_holds_back_a_partial_stop_and_cuts_before_it():
    matcher = StopMatcher(["o w"])
    released = [matcher.feed("Hel"), matcher.feed("lo"), matcher.feed(" wo"), matcher.feed("rld")]
    assert "".join(released) == "Hell" and matcher.stopped
    assert released[1] == "l"  # "o" might start "o w": held back


def test_stop_matcher_releases_everything_without_a_match():
    matcher = StopMatcher(["STOP"])
    text = "".join(matcher.feed(piece) for piece in ["ab", "ST", "OX", "yz"]) + matcher.flush()
    assert text == "abSTOXyz" and not matcher.stopped


def test_incremental_detokenizer_matches_decoding_all(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tokenizer("Hello").input_ids
    generated = tokenizer("Hello world, héllo wörld 你好 🙂 end", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detok.push(t) for t in generated) + detok.flush()
    full = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert text == full[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
