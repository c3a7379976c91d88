"""Built-in chat templates (Jinja, Hugging Face `chat_template` dialect) for models that ship none."""

from __future__ import annotations

from pathlib import Path

_LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
_FALCON = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set messages = messages[1:] %}"
    "{% else %}{{ \"A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. \" }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_DOLLY = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% set messages = messages[1:] %}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\\n\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + '\\n\\n### End\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN = {
    "llama-2": _LLAMA_2,
    "mistral": _MISTRAL,
    "falcon": _FALCON,
    "vicuna": _VICUNA,
    "dolly": _DOLLY,
    "chatml": _CHATML,
}

# Strings that open or close a turn in each template: user text containing them could forge a turn.
CONTROL_STRINGS = {
    "llama-2": ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    "mistral": ("[INST]", "[/INST]"),
    "falcon": ("\nUser:", "\nAssistant:"),
    "vicuna": ("USER:", "ASSISTANT:"),
    "dolly": ("### Instruction:", "### Response:", "### End"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


def resolve_chat_template(setting: str | None, tokenizer) -> str | None:
    """The Jinja source to use: the --chat_template setting, else the tokenizer's own, else None."""
    if setting in BUILTIN:
        return BUILTIN[setting]
    if setting:
        return Path(setting).read_text()
    return getattr(tokenizer, "chat_template", None)
