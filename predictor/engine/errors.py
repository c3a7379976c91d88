"""What Engine.submit() and Engine.embed() refuse with. The front-ends map each kind to a response."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked; `field` names the parameter at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineOverloaded(EngineError):
    """The waiting queue is full: try again later."""


class EngineUnavailable(EngineError):
    """The engine is loading, draining for shutdown, or has failed."""
