"""The sampler's logits processors, incremental detokenization and stop-string matching, on real tensors."""

from __future__ import annotations

import torch

from predictor.detokenizer import IncrementalDetokenizer, StopMatcher
from predictor.sampling import SamplingParams, SequenceSampler, sample_batch


def sampler(**params) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), prompt_ids=[5, 6], stop_ids={2}, device=torch.device("cpu"))


def test_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    for seed in range(5):
        assert sampler(temperature=1.5, top_k=1, seed=seed).choose(logits.clone(), 10) == best
        assert sampler(temperature=1.5, top_p=1e-6, seed=seed).choose(logits.clone(), 10) == best


def test_typical_p_keeps_the_token_closest_to_the_entropy():
    logits = torch.tensor([4.0, 2.0, 1.9, -3.0])
    log_probs = torch.log_softmax(logits, -1)
    entropy = -(log_probs.exp() * log_probs).sum()
    typical = int((-log_probs - entropy).abs().argmin())
    picks = {sampler(typical_p=1e-6, seed=s).choose(logits.clone(), 10) for s in range(10)}
    assert picks == {typical}


def test_min_new_tokens_suppresses_eos_and_repetition_penalty_demotes_seen_tokens():
    logits = torch.zeros(10)
    logits[2] = 10.0  # EOS would win
    assert sampler(temperature=0, min_new_tokens=3).choose(logits.clone(), 0) != 2
    assert sampler(temperature=0, min_new_tokens=3).choose(logits.clone(), 3) == 2
    logits = torch.zeros(10)
    logits[5], logits[7] = 3.0, 2.0  # 5 is in the prompt
    assert sampler(temperature=0, repetition_penalty=2.0).choose(logits.clone(), 0) == 7


def test_batch_mixes_greedy_and_seeded_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rows = [sampler(temperature=0), sampler(temperature=1.0, seed=7), sampler(temperature=0)]
    tokens = sample_batch(logits, rows, [0, 0, 0])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    again = sample_batch(logits, [sampler(temperature=0), sampler(temperature=1.0, seed=7), sampler(temperature=0)],
                         [0, 0, 0])
    assert again == tokens


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
