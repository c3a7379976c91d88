"""Dialog rules on their own: role order, forbidden strings per template, and encode_chat applying both."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AddedToken, AutoTokenizer

from predictor.api.chat_templates import BUILTIN, CONTROL_STRINGS
from predictor.api.dialogs import (
    DialogError,
    SpecialTagsNotAllowed,
    check_dialog,
    check_roles,
    control_strings,
    template_markers,
)
from predictor.api.service import GenerationService
from predictor.engine import InvalidRequest

# Meta's own llama-2-chat template, as Hugging Face ships it: not one of our built-ins, same markers.
HF_LLAMA_2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def dialog(*roles: str) -> list[dict]:
    return [{"role": role, "content": f"text {i}"} for i, role in enumerate(roles)]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("roles", [("user",), ("system", "user"), ("user", "assistant", "user"),
                                   ("system", "user", "assistant", "user")])
def test_good_role_orders_pass(roles):
    check_roles(dialog(*roles))


@pytest.mark.parametrize(
    "roles, message",
    [
        ((), "at least one message"),
        (("system",), "system message alone"),
        (("assistant",), "0.role: expected 'user', got 'assistant'"),
        (("user", "user"), "1.role: expected 'assistant', got 'user'"),
        (("user", "assistant"), "1.role: the last message must be from the user"),
        (("user", "system", "user"), "1.role: expected 'assistant', got 'system'"),
        (("system", "system", "user"), "1.role: expected 'user', got 'system'"),
    ],
)
def test_bad_role_orders_say_what_is_wrong(roles, message):
    with pytest.raises(DialogError, match=message) as refused:
        check_roles(dialog(*roles))
    assert refused.value.field == "messages" and not isinstance(refused.value, SpecialTagsNotAllowed)


def test_builtin_templates_use_their_own_markers(tokenizer):
    for name, source in BUILTIN.items():
        assert set(CONTROL_STRINGS[name]) <= set(control_strings(source, tokenizer))
    assert {"[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>"} <= set(control_strings(BUILTIN["llama-2"],
                                                                                            tokenizer))


def test_other_templates_get_the_markers_they_spell_out_and_the_special_tokens(tokenizer):
    assert set(template_markers(HF_LLAMA_2_TEMPLATE)) == {"[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"}
    assert set(control_strings("{{ messages[0]['content'] }}", tokenizer)) == {"<s>", "</s>", "<unk>"}


def test_special_added_tokens_are_forbidden_but_plain_added_tokens_are_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([AddedToken("<|tool|>", special=True), AddedToken("    ", special=False)])
    forbidden = control_strings(None, tokenizer)
    assert "<|tool|>" in forbidden and "    " not in forbidden


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>"])
def test_each_tag_in_any_message_is_refused(tokenizer, tag):
    forbidden = control_strings(BUILTIN["llama-2"], tokenizer)
    for index in range(3):
        messages = dialog("system", "user", "assistant", "user")
        messages[index]["content"] = f"before{tag}after"
        with pytest.raises(SpecialTagsNotAllowed, match=f"{index}.content: special tags are not allowed"):
            check_dialog(messages, forbidden)


def test_encode_chat_applies_the_rules(tokenizer):
    service = GenerationService(engine=None, tokenizer=tokenizer, chat_template=BUILTIN["llama-2"],
                                defaults={}, max_model_len=512)
    encode = lambda messages: asyncio.run(service.encode_chat(messages))  # noqa: E731
    assert encode(dialog("system", "user"))[0] == tokenizer.bos_token_id
    with pytest.raises(SpecialTagsNotAllowed):
        encode([{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}])
    with pytest.raises(DialogError, match="expected 'user'"):
        encode(dialog("assistant"))
    with pytest.raises(InvalidRequest, match="messages: must be a list"):
        encode({"role": "user", "content": "hi"})
