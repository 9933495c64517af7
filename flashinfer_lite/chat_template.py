"""Chat templates: the GGUF's own (tokenizer.chat_template), rendered with jinja2 the way
Hugging Face renders them, or a known template for the architecture when the file has none.
"""

from __future__ import annotations

from datetime import datetime

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidArgumentError

# Gemma 3's published template, text-only: a system message is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{{ ((first_user_prefix if loop.first else '') + message['content']) | trim }}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FALLBACK_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}


class ChatTemplate:
    def __init__(self, source: str):
        def raise_exception(message):
            raise InvalidArgumentError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)

    @classmethod
    def for_model(cls, gguf_template: str | None, architecture: str) -> ChatTemplate:
        if gguf_template:
            return cls(gguf_template)
        return cls(FALLBACK_TEMPLATES.get(architecture, CHATML_TEMPLATE))

    def render(self, messages, bos_token: str = "", eos_token: str = "",
               add_generation_prompt: bool = True) -> str:
        if not isinstance(messages, list) or not messages:
            raise InvalidArgumentError("messages must be a non-empty list of {role, content}")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidArgumentError(
                    f"each message needs 'role' and 'content'; got {m!r}"
                )
        return self._template.render(messages=messages, bos_token=bos_token,
                                     eos_token=eos_token,
                                     add_generation_prompt=add_generation_prompt)
