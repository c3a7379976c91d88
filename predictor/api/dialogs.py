"""Chat dialog rules: the order of roles, and no message text that could forge a turn of the chat template.

Every chat route (Kaito /chat, OpenAI chat, KServe V1 messages) goes through GenerationService.encode_chat, which
applies these rules, so they hold the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

from predictor.api.chat_templates import BUILTIN, CONTROL_STRINGS
from predictor.engine import InvalidRequest

# The answer Meta's llama chat_completion (served by Kaito's llama-2-chat) gives for such a dialog, word for word.
SPECIAL_TAGS_ERROR = "Error: special tags are not allowed as part of the prompt."
ROLE_RULE = "an optional system message first, then user and assistant alternating, ending with user"


class DialogError(InvalidRequest):
    """A dialog that breaks the rules; the field is 'messages'."""

    def __init__(self, message: str):
        super().__init__("messages", message)
        self.detail = message


class SpecialTagsNotAllowed(DialogError):
    """A message holds a template control string or a special token, which could forge a turn."""


def check_dialog(messages: list[dict], forbidden: Iterable[str]) -> None:
    """Raise DialogError unless the roles are in order and no message contains a forbidden string."""
    check_roles(messages)
    check_no_control_strings(messages, forbidden)


def check_roles(messages: list[dict]) -> None:
    if not messages:
        raise DialogError("must hold at least one message")
    first_turn = 1 if messages[0]["role"] == "system" else 0
    if first_turn == len(messages):
        raise DialogError(f"a system message alone is not a dialog ({ROLE_RULE})")
    for index in range(first_turn, len(messages)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        role = messages[index]["role"]
        if role != expected:
            raise DialogError(f"{index}.role: expected {expected!r}, got {role!r} ({ROLE_RULE})")
    if messages[-1]["role"] != "user":
        raise DialogError(f"{len(messages) - 1}.role: the last message must be from the user ({ROLE_RULE})")


def check_no_control_strings(messages: list[dict], forbidden: Iterable[str]) -> None:
    # Client-sent assistant turns are checked too: they are rendered into the same prompt (Meta checks them all).
    for index, message in enumerate(messages):
        found = next((s for s in forbidden if s in message["content"]), None)
        if found is not None:
            raise SpecialTagsNotAllowed(
                f"{index}.content: special tags are not allowed as part of the prompt (found {found!r})"
            )


def control_strings(chat_template: str | None, tokenizer) -> tuple[str, ...]:
    """What no message may contain: the template's turn markers and the tokenizer's special tokens."""
    return tuple(sorted({*template_markers(chat_template), *special_tokens(tokenizer)} - {""}))


def template_markers(chat_template: str | None) -> tuple[str, ...]:
    if not chat_template:
        return ()
    for name, source in BUILTIN.items():
        if chat_template == source:
            return CONTROL_STRINGS[name]
    # Another template (the tokenizer's own or a file): the built-ins' markers that its source spells out.
    return tuple(marker for markers in CONTROL_STRINGS.values() for marker in markers
                 if _spelled_in(marker, chat_template))


def special_tokens(tokenizer) -> set[str]:
    """Special tokens, added ones included: the tokenizer turns their text into control ids, whatever the template.

    Added tokens that are not special (e.g. runs of spaces some tokenizers add) are ordinary text and stay allowed.
    """
    tokens = set(getattr(tokenizer, "all_special_tokens", ()))
    tokens.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return tokens


def _spelled_in(marker: str, source: str) -> bool:
    # In Jinja source a newline inside a string literal is usually written as the two characters \n.
    return marker in source or marker.replace("\n", "\\n") in source
