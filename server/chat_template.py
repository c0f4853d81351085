"""Chat templates: the built-in BitNet b1.58 2B4T format and sandboxed jinja2 rendering.

Model files carry their chat format as a jinja2 template (GGUF `tokenizer.chat_template`, Hugging Face
`tokenizer_config.json`). The official 2B4T GGUF carries a placeholder instead ("Human: ...
BITNETAssistant:"), which the model was never trained on, so `resolve_template` swaps it for the format
of the model's own `tokenizer_config.json` (BITNET.md section 3). Templates come from files we do not
control: they render in jinja2's immutable sandbox.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# BitNet b1.58 2B4T: "Role: content<|eot_id|>" per message (role capitalised, content trimmed as in the
# model's tokenizer_config.json), generation prompt "Assistant: ", BOS first.
BITNET_2B4T_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

# For vocabularies without an end-of-turn token (base models such as the 1bitLLM checkpoints): the same
# turn layout, each turn closed by EOS. A guess, reported as a correction when used.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

# Text that only appears in converter placeholders, never in a template a model was trained with.
PLACEHOLDER_MARKERS = ("BITNETAssistant",)


class ChatTemplateError(ValueError):
    """The template could not be compiled or rendered (including its own `raise_exception` calls)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Templates written for transformers expect non-ASCII text to stay readable.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks/lstrip_blocks and loop controls: the settings the templates in the wild are written for.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text (a server renders the same one for every request)."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def render(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with the template text `source`."""
    template = compile_template(source)
    try:
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def is_placeholder(source: str) -> bool:
    return any(marker in source for marker in PLACEHOLDER_MARKERS)


def _usable(source: object) -> bool:
    if not isinstance(source, str) or not source.strip() or is_placeholder(source):
        return False
    try:
        compile_template(source)
    except ChatTemplateError:
        return False
    return True


def resolve_template(source: object, *, has_eot_token: bool, origin: str) -> tuple[str, str | None]:
    """The template to use and, if it is not the file's own, a sentence saying why.

    `origin` names where the template came from (e.g. the GGUF key) for that sentence.
    """
    if _usable(source):
        return source, None  # type: ignore[return-value]
    if not isinstance(source, str) or not source.strip():
        problem = f"{origin} is missing"
    elif is_placeholder(source):
        problem = f"{origin} is a converter placeholder ('Human: ... BITNETAssistant:')"
    else:
        problem = f"{origin} does not compile"
    if has_eot_token:
        return BITNET_2B4T_TEMPLATE, (
            f"{problem}: using the BitNet b1.58 2B4T chat format "
            "('Role: content<|eot_id|>' per message, generation prompt 'Assistant: ')"
        )
    return PLAIN_TEMPLATE, (
        f"{problem}: using a plain 'Role: content' format with turns ended by the EOS token"
    )
