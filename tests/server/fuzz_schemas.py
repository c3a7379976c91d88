"""What the served OpenAPI document leaves out, for the fuzz test to add: KServe's V1 `:predict` reads its body
raw (the document has no request body for it), V2 `/infer` documents any tensor, and neither documents what it
answers. These schemas describe what predictor/api/kserve_model.py takes and gives, with the engine's own bounds
(SamplingParams' JSON schema), so the fuzzer sends both well-formed and broken text requests to them."""

from __future__ import annotations

import copy

from predictor.api.service import ChatMessage
from predictor.engine import SamplingParams

V1_PREDICT = "/v1/models/{model_name}:predict"
V2_INFER = "/v2/models/{model_name}/infer"
SCALAR_TYPES = {"integer", "number", "boolean", "string"}


def sampling_parameters() -> dict:
    return _inline(SamplingParams.model_json_schema())


def v2_parameters() -> dict:
    """KServe's V2 parameters hold scalars only: SamplingParams' scalar fields, stop as one string."""
    schema = sampling_parameters()
    properties = {name: field for name, field in schema["properties"].items() if _scalar(field)}
    properties["stop"] = {"type": "string"}
    return {**schema, "properties": properties}


def v1_request() -> dict:
    parameters = sampling_parameters()
    prompt = {"type": "object", "additionalProperties": False, "required": ["prompt"],
              "properties": {"prompt": {"type": "string"}, "parameters": parameters}}
    chat = {"type": "object", "additionalProperties": False, "required": ["messages"],
            "properties": {"messages": {"type": "array", "minItems": 1, "maxItems": 4,
                                        "items": _inline(ChatMessage.model_json_schema())},
                           "parameters": parameters}}
    return {"type": "object", "additionalProperties": False, "required": ["instances"],
            "properties": {"instances": {"type": "array", "minItems": 1, "maxItems": 4,
                                         "items": {"anyOf": [prompt, chat]}}}}


def v2_text_request() -> dict:
    text_input = {"type": "object", "additionalProperties": False, "required": ["name", "datatype", "shape", "data"],
                  "properties": {"name": {"const": "text_input"}, "datatype": {"const": "BYTES"},
                                 "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                           "maxItems": 1},
                                 "data": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                          "maxItems": 4}}}
    return {"type": "object", "additionalProperties": False, "required": ["inputs"],
            "properties": {"id": {"type": "string"}, "parameters": v2_parameters(),
                           "inputs": {"type": "array", "items": text_input, "minItems": 1, "maxItems": 1}}}


USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {key: {"type": "integer", "minimum": 0}
                        for key in ("prompt_tokens", "completion_tokens", "total_tokens")}}
V1_RESPONSE = {"type": "object", "required": ["predictions"], "properties": {"predictions": {
    "type": "array", "items": {"type": "object", "required": ["generated_text", "finish_reason", "usage"],
                               "properties": {"generated_text": {"type": "string"},
                                              "finish_reason": {"enum": ["stop", "length"]}, "usage": USAGE}}}}}
V2_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "id": {"type": "string"},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape", "data"],
                                           "properties": {"name": {"const": "text_output"},
                                                          "datatype": {"const": "BYTES"},
                                                          "data": {"type": "array", "items": {"type": "string"}}}}}}}


def completed(document: dict) -> dict:
    """The served document with the V1/V2 text bodies and answers described."""
    document = copy.deepcopy(document)
    predict = document["paths"][V1_PREDICT]["post"]
    predict["requestBody"] = _json_body(v1_request())
    predict["responses"]["200"] = _json_answer(V1_RESPONSE)
    infer = document["paths"][V2_INFER]["post"]
    generic = {"$ref": "#/components/schemas/InferenceRequest"}  # any tensor: refused unless it is text_input
    infer["requestBody"] = _json_body({"anyOf": [v2_text_request(), generic]})
    infer["responses"]["200"] = _json_answer(V2_RESPONSE)
    return document


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _json_answer(schema: dict) -> dict:
    return {"description": "Successful Response", "content": {"application/json": {"schema": schema}}}


def _scalar(field: dict) -> bool:
    types = {field.get("type")} | {option.get("type") for option in field.get("anyOf", ())}
    return bool(types & SCALAR_TYPES) and "array" not in types


def _inline(schema: dict) -> dict:
    """A pydantic model's schema as a plain JSON schema: its nested models' $refs replaced by their $defs, so
    that it can sit inside another document."""
    definitions = schema.get("$defs", {})

    def resolved(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolved(definitions[node["$ref"].removeprefix("#/$defs/")])
            return {key: resolved(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolved(item) for item in node]
        return node

    return {key: resolved(value) for key, value in schema.items() if key not in ("title", "description", "$defs")}
