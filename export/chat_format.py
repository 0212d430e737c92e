"""The chat format a model was trained with, written once for every server that renders it.

A served prompt must be exactly what training saw. Each supported family gives the Ollama
``TEMPLATE`` (Go template), the Python ``render`` that produces the same text for llama.cpp, the
default system prompt the tokenizer's template inserts, and the end-of-turn stop strings. The
family is detected from the tokenizer's Jinja template and checked by rendering: an unknown or
mismatching template is an error, never a silent raw ``{{ .Prompt }}`` (docs/serving.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError


class ChatTemplateError(UserError):
    pass


@dataclass(frozen=True)
class ChatFormat:
    """``ollama_template`` ranges over ``.Messages``, so Ollama renders every conversation shape
    itself (multi-turn, an explicitly empty system message) the way the tokenizer's template
    does. Ollama builds ``.Messages`` as: the request's messages, with the Modelfile's ``SYSTEM``
    (``default_system``) put first when the first message is not a system message (for
    ``generate``: the request's ``system``, else ``SYSTEM``, then the prompt); consecutive
    messages of one role are merged with a blank line. The BOS token is not in the template:
    llama.cpp adds it when tokenizing (``bos``)."""

    family: str
    ollama_template: str
    stops: tuple[str, ...]
    system_open: str
    system_close: str
    user_open: str
    user_close: str
    assistant_open: str
    bos: str = ""
    default_system: str | None = None

    def render(self, prompt: str, system: str | None = None) -> str:
        """The single-turn prompt up to the assistant's first token, as ``ollama_template``
        renders it: ``system`` None means no system message (the default one, if any, is put
        first), ``""`` an explicitly empty one, whose block stays (as in the tokenizer's template)."""
        system = self.default_system if system is None else system
        head = "" if system is None else f"{self.system_open}{system}{self.system_close}"
        return f"{self.bos}{head}{self.user_open}{prompt}{self.user_close}{self.assistant_open}"


CHATML = ChatFormat(
    family="chatml",
    ollama_template=(
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    stops=("<|im_end|>", "<|im_start|>"),
    system_open="<|im_start|>system\n", system_close="<|im_end|>\n",
    user_open="<|im_start|>user\n", user_close="<|im_end|>\n", assistant_open="<|im_start|>assistant\n",
)

# Llama-3's Jinja template trims each message's content; Go templates cannot, so content with
# leading or trailing whitespace renders with it (the API's callers rarely send such content).
LLAMA3 = ChatFormat(
    family="llama3",
    ollama_template=(
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    system_open="<|start_header_id|>system<|end_header_id|>\n\n", system_close="<|eot_id|>",
    user_open="<|start_header_id|>user<|end_header_id|>\n\n", user_close="<|eot_id|>",
    assistant_open="<|start_header_id|>assistant<|end_header_id|>\n\n", bos="<|begin_of_text|>",
)

FAMILIES = {"chatml": (CHATML, "<|im_start|>"), "llama3": (LLAMA3, "<|start_header_id|>")}
_PROBE_PROMPT = "Probe prompt 17: is this rendered the same way?"


def served_chat_format(family: str, default_system: str | None) -> ChatFormat:
    """The chat format an export manifest recorded (family name and default system prompt)."""
    from dataclasses import replace

    return replace(FAMILIES[family][0], default_system=default_system)


def _default_system(family: ChatFormat, rendered: str) -> str | None:
    """The system text the tokenizer's template inserts when the conversation has none."""
    body = rendered.removeprefix(family.bos)
    if not body.startswith(family.system_open):
        return None
    return body[len(family.system_open):].split(family.system_close, 1)[0]


def chat_format(tokenizer) -> ChatFormat:
    """Detect the family from the tokenizer's chat template and prove it renders identically."""
    from dataclasses import replace

    from trainers.data.formatting import chat_messages

    template = getattr(tokenizer, "chat_template", None) or ""
    matches = [family for family, marker in FAMILIES.values() if marker in template]
    if not template or not matches:
        raise ChatTemplateError("the tokenizer's chat template is none of the supported families "
                                f"({', '.join(FAMILIES)}); add its Ollama TEMPLATE to export/chat_format.py")
    family = matches[0]
    expected = tokenizer.apply_chat_template(chat_messages(_PROBE_PROMPT), tokenize=False, add_generation_prompt=True)
    # Llama-3 templates may stamp a date into the default system prompt: read it from the render.
    family = replace(family, default_system=_default_system(family, expected))
    if family.render(_PROBE_PROMPT) != expected:
        raise ChatTemplateError(f"the tokenizer's {family.family} template renders differently from the Ollama "
                                f"TEMPLATE written for it: {_first_difference(family.render(_PROBE_PROMPT), expected)}")
    return family


def _first_difference(ours: str, theirs: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    return f"ours {ours[at:at + 30]!r} vs the tokenizer's {theirs[at:at + 30]!r} at character {at}"


def modelfile_escape(text: str) -> str:
    """A Modelfile triple-quoted value (the template never contains triple quotes)."""
    if '"""' in text:
        raise ChatTemplateError('a Modelfile value cannot contain """')
    return f'"""{text}"""'

