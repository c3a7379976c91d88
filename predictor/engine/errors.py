"""What Engine.submit() and Engine.embed() refuse with. The front-ends map each kind to a response."""

from __future__ import annotations

import re

SHUTTING_DOWN = "server is shutting down"  # why a request is refused, or ended, once a shutdown started


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked; `field` names the parameter at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def renamed(self, names: dict[str, str]) -> InvalidRequest:
        """The same refusal in a front-end's words: every field name that is a key of names, in the field and in
        the message, becomes its value (max_new_tokens -> OpenAI's max_tokens)."""
        if not names:
            return self
        words = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        field = words.sub(lambda m: names[m.group()], self.field)
        return InvalidRequest(field, words.sub(lambda m: names[m.group()], self.detail))


class EngineOverloaded(EngineError):
    """The waiting queue is full: try again later."""


class EngineUnavailable(EngineError):
    """The engine is loading, draining for shutdown, or has failed."""
