"""Engine events to OpenAI responses: one whole response, or a stream of chunks, per request.

Events arrive as (choice index, Delta | Finished) pairs from every choice of a request (n choices per prompt).
With vLLM's continuous_usage_stats every chunk carries usage as vLLM reports it: the prompt tokens and the tokens
generated so far of the choice the chunk is about.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_choice import Logprobs
from openai.types.completion_usage import PromptTokensDetails

from predictor.api.errors import INTERNAL_ERROR, error_body
from predictor.api.service import GenerationFailed, failure
from predictor.engine import Delta, EngineUnavailable, Finished, TokenLogprob
from predictor.engine.detokenizer import TokenTexts

Events = AsyncIterator[tuple[int, Delta | Finished]]


class ResponseBuilder:
    """What completions and chat share: collecting events per choice, token accounting, the stream's shape."""

    id_prefix = "cmpl"

    def __init__(self, model_name: str, tokenizer, n: int, include_usage: bool, prompt_lens: list[int],
                 continuous_usage: bool = False):
        self.model_name = model_name
        self.n = n
        self.include_usage = include_usage
        self.prompt_lens = prompt_lens  # per prompt; choice i answers prompt i // n
        self.continuous_usage = continuous_usage
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.token_texts = TokenTexts(tokenizer)
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, those the prefix cache held
        self.completion_tokens = 0
        self.generated: dict[int, int] = defaultdict(int)  # per choice, so far
        self._skeleton: dict | None = None  # a chunk with no choices, as the openai type serialises it

    async def collect(self, events: Events) -> Callable[[], Completion | ChatCompletion]:
        """Every choice's events; what builds the whole answer from them (json_response runs it off the loop)."""
        texts: dict[int, list[str]] = defaultdict(list)
        logprobs: dict[int, list[tuple[TokenLogprob, str]]] = defaultdict(list)
        reasons: dict[int, str] = {}
        async for index, event in events:
            if isinstance(event, Delta):
                texts[index].append(event.text)
                if event.logprobs:
                    logprobs[index].extend(zip(event.logprobs, event.token_texts))
            else:
                reasons[index] = self._finish(index, event)
        return lambda: self.response({i: "".join(texts[i]) for i in reasons}, logprobs, reasons)

    async def chunks(self, events: Events):
        for chunk in self.opening_chunks():
            yield chunk
        async for index, event in events:
            if isinstance(event, Delta):
                self.generated[index] += len(event.token_ids)
                if event.text or event.logprobs:
                    pairs = list(zip(event.logprobs, event.token_texts)) if event.logprobs else None
                    yield self.delta_chunk(index, event.text, pairs)
                continue
            try:
                reason = self._finish(index, event)
            except GenerationFailed:
                yield error_body(500, INTERNAL_ERROR)
                return
            except EngineUnavailable as err:  # the shutdown's grace period ended it
                yield error_body(503, str(err))
                return
            yield self.final_chunk(index, reason)
        if self.include_usage:
            yield self.usage_chunk()

    def _finish(self, index: int, event: Finished) -> str:
        if event.finish_reason == "error":
            raise failure(event)
        if index % self.n == 0:  # n choices of one prompt count its tokens once
            self.prompt_tokens += event.prompt_tokens
            self.cached_tokens += event.cached_tokens
        self.completion_tokens += event.completion_tokens
        self.generated[index] = event.completion_tokens
        return "length" if event.finish_reason == "length" else "stop"

    def _fast_chunk(self, choice: dict) -> dict:
        if self._skeleton is None:
            self._skeleton = self.usage_chunk().model_dump(mode="json", warnings=False)
            self._skeleton["usage"] = None
        usage = self.chunk_usage(choice["index"])
        return {**self._skeleton, "choices": [choice], "usage": usage and usage.model_dump()}

    def usage(self) -> CompletionUsage:
        return CompletionUsage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                               total_tokens=self.prompt_tokens + self.completion_tokens,
                               prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    def chunk_usage(self, index: int) -> CompletionUsage | None:
        """What a chunk about choice index carries as usage: nothing, unless continuous_usage_stats."""
        if not self.continuous_usage:
            return None
        prompt, generated = self.prompt_lens[index // self.n], self.generated[index]
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

    def opening_chunks(self) -> list:
        return []

    def response(self, texts: dict[int, str], logprobs: dict, reasons: dict[int, str]): ...

    def delta_chunk(self, index: int, text: str, logprobs: list[tuple[TokenLogprob, str]] | None): ...

    def final_chunk(self, index: int, reason: str): ...

    def usage_chunk(self): ...


class CompletionResponses(ResponseBuilder):
    id_prefix = "cmpl"

    def __init__(self, model_name: str, tokenizer, n: int, include_usage: bool, prompt_lens: list[int],
                 continuous_usage: bool, echoed: list[str] | None):
        super().__init__(model_name, tokenizer, n, include_usage, prompt_lens, continuous_usage)
        self.echoed = echoed
        self.offsets: dict[int, int] = defaultdict(int)  # text offset of each choice's next token

    def _prefix(self, index: int) -> str:
        return self.echoed[index // self.n] if self.echoed else ""

    def _completion(self, choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> Completion:
        return Completion.model_construct(id=self.id, object="text_completion", created=self.created,
                                          model=self.model_name, choices=choices, usage=usage)

    def response(self, texts, logprobs, reasons) -> Completion:
        choices = [
            CompletionChoice(index=i, text=self._prefix(i) + texts[i], finish_reason=reasons[i],
                             logprobs=self._logprobs(i, logprobs[i]) if i in logprobs else None)
            for i in sorted(reasons)
        ]
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.model_name,
                          choices=choices, usage=self.usage())

    def opening_chunks(self) -> list:
        if not self.echoed:
            return []
        return [self._chunk(i, self._prefix(i), None, None) for i in range(len(self.echoed) * self.n)]

    def delta_chunk(self, index, text, logprobs) -> Completion | dict:
        if logprobs is None:  # the per-token hot path: a dict over the type's own skeleton, no model building
            return self._fast_chunk({"index": index, "text": text, "finish_reason": None, "logprobs": None})
        return self._chunk(index, text, None, self._logprobs(index, logprobs))

    def final_chunk(self, index, reason) -> Completion:
        return self._chunk(index, "", reason, None)

    def usage_chunk(self) -> Completion:
        return self._completion([], self.usage())

    def _chunk(self, index: int, text: str, reason: str | None, logprobs: Logprobs | None) -> Completion:
        # Streamed choices carry finish_reason None until the last; the type only allows that when constructed.
        choice = CompletionChoice.model_construct(index=index, text=text, finish_reason=reason, logprobs=logprobs)
        return self._completion([choice], self.chunk_usage(index))

    def _logprobs(self, index: int, pairs: list[tuple[TokenLogprob, str]]) -> Logprobs:
        offsets = []
        for _, text in pairs:
            offsets.append(len(self._prefix(index)) + self.offsets[index])
            self.offsets[index] += len(text)
        return Logprobs(
            tokens=[text for _, text in pairs],
            token_logprobs=[lp.logprob for lp, _ in pairs],
            top_logprobs=[{self.token_texts(t): v for t, v in lp.top} for lp, _ in pairs],
            text_offset=offsets,
        )


class ChatResponses(ResponseBuilder):
    id_prefix = "chatcmpl"

    def response(self, texts, logprobs, reasons) -> ChatCompletion:
        choices = [
            ChatChoice(index=i, finish_reason=reasons[i], message=ChatCompletionMessage(role="assistant",
                                                                                        content=texts[i]),
                       logprobs=ChoiceLogprobs(content=self._logprobs(logprobs[i])) if i in logprobs else None)
            for i in sorted(reasons)
        ]
        return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.model_name,
                              choices=choices, usage=self.usage())

    def opening_chunks(self) -> list:
        return [self._chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))],
                            self.chunk_usage(i))
                for i in range(self.n)]

    def delta_chunk(self, index, text, logprobs) -> ChatCompletionChunk | dict:
        if logprobs is None:  # the per-token hot path: a dict over the type's own skeleton, no model building
            return self._fast_chunk({"index": index, "delta": {"content": text}, "finish_reason": None,
                                     "logprobs": None})
        chunk_logprobs = ChunkLogprobs(content=self._logprobs(logprobs)) if logprobs else None
        return self._chunk([ChunkChoice(index=index, delta=ChoiceDelta(content=text), logprobs=chunk_logprobs)],
                           self.chunk_usage(index))

    def final_chunk(self, index, reason) -> ChatCompletionChunk:
        return self._chunk([ChunkChoice(index=index, delta=ChoiceDelta(), finish_reason=reason)],
                           self.chunk_usage(index))

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], self.usage())

    def _chunk(self, choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, object="chat.completion.chunk", created=self.created,
                                   model=self.model_name, choices=choices, usage=usage)

    def _logprobs(self, pairs: list[tuple[TokenLogprob, str]]) -> list[ChatCompletionTokenLogprob]:
        return [
            ChatCompletionTokenLogprob(
                token=text, bytes=list(text.encode()), logprob=lp.logprob,
                top_logprobs=[self._top(t, v) for t, v in lp.top],
            )
            for lp, text in pairs
        ]

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_texts(token_id)
        return TopLogprob(token=text, bytes=list(text.encode()), logprob=logprob)
