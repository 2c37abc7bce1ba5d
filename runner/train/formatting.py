"""Dataset rows → training text with the character spans that carry loss.

Each format (messages, alpaca, prompt-completion, text) becomes one string plus a list of
``[start, end)`` character spans: the assistant turns, the answer, or the completion.
Tokenization (:mod:`runner.train.preflight`) maps the spans onto tokens, so prompt masking is
decided on characters, independently of how a tokenizer splits them; this is what makes
completion-only loss robust where marker-search approaches (Unsloth's
``train_on_responses_only``) silently mask everything when the template differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import DataError, SpecError
from runner.spec.model import DatasetFormat, DatasetSpec
from runner.train.dataset import Row

ROLES = frozenset({"system", "user", "assistant", "tool"})

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)

# Named chat templates for tokenizers that ship none (or for overriding theirs).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3.1": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
CHAT_TEMPLATES["llama-3"] = CHAT_TEMPLATES["llama-3.1"]


@dataclass(frozen=True)
class FormattedRow:
    """Training text and the character spans whose tokens carry loss.

    Attributes:
        where: The row's coordinates (``dataset.sources[0]: row 17``).
        text: The full training text, special tokens included as text.
        loss_spans: ``[start, end)`` character ranges that carry loss.
        add_special_tokens: Let the tokenizer add BOS etc. (False when a chat template
            already wrote them).
    """

    where: str
    text: str
    loss_spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool


def resolve_chat_template(spec: DatasetSpec, tokenizer: Any) -> str | None:
    """The chat template to render ``messages`` rows with.

    Raises:
        SpecError: an unknown template name, or messages data and no template at all.
    """
    name = spec.chat_template
    if name is None:
        own = getattr(tokenizer, "chat_template", None)
        if spec.format is DatasetFormat.MESSAGES and not own:
            raise SpecError(
                "dataset.chat_template: the tokenizer has no chat template; name one of "
                f"{', '.join(sorted(CHAT_TEMPLATES))}"
            )
        return own if isinstance(own, str) else None
    if "{%" in name or "{{" in name:
        return name
    if name not in CHAT_TEMPLATES:
        raise SpecError(
            f"dataset.chat_template: unknown template '{name}'; use one of "
            f"{', '.join(sorted(CHAT_TEMPLATES))}, or omit it to use the tokenizer's own"
        )
    return CHAT_TEMPLATES[name]


def format_rows(
    rows: Sequence[Row], spec: DatasetSpec, tokenizer: Any, chat_template: str | None
) -> list[FormattedRow]:
    """Format every row; the first malformed row raises.

    Raises:
        DataError: ``dataset.sources[i]: row N: <problem>`` (exit code 2).
    """
    eos = str(getattr(tokenizer, "eos_token", None) or "")
    out = []
    for row in rows:
        if spec.format is DatasetFormat.MESSAGES:
            text, spans = _messages(row, spec, tokenizer, chat_template)
            special = False
        else:
            text, spans = _plain(row, spec, eos)
            special = True
        if spec.train_on == "all":
            spans = [(0, len(text))]
        out.append(FormattedRow(row.where, text, tuple(spans), special))
    return out


def _field(row: Row, key: str, *, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None:
        if required:
            raise DataError(f"{row.where}: missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _plain(row: Row, spec: DatasetSpec, eos: str) -> tuple[str, list[tuple[int, int]]]:
    f = spec.fields
    if spec.format is DatasetFormat.TEXT:
        text = _field(row, f.text)
        if not text.strip():
            raise DataError(f"{row.where}: field '{f.text}' is empty")
        return text + eos, [(0, len(text) + len(eos))]
    if spec.format is DatasetFormat.ALPACA:
        instruction = _field(row, f.instruction)
        extra = _field(row, f.input, required=False)
        answer = _field(row, f.output)
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if extra else "",
            instruction=instruction,
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
    else:
        prompt = _field(row, f.prompt)
        answer = _field(row, f.completion)
    if not answer.strip():
        key = f.output if spec.format is DatasetFormat.ALPACA else f.completion
        raise DataError(f"{row.where}: field '{key}' is empty; there is nothing to learn")
    return prompt + answer + eos, [(len(prompt), len(prompt) + len(answer) + len(eos))]


def _check_messages(row: Row, key: str) -> list[dict[str, str]]:
    messages = row.data.get(key)
    if messages is None:
        raise DataError(f"{row.where}: missing field '{key}'")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: field '{key}' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        at = f"{row.where}: {key}[{j}]"
        if not isinstance(m, Mapping):
            raise DataError(f"{at}: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role must be one of {', '.join(sorted(ROLES))}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string")
        out.append({"role": str(role), "content": content})
    return out


def _render(tokenizer: Any, template: str | None, messages: list[dict[str, str]], gen: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )
    return str(text)


def _messages(
    row: Row, spec: DatasetSpec, tokenizer: Any, template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    messages = _check_messages(row, spec.fields.messages)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if spec.train_on == "completions" and not assistant_turns:
        raise DataError(f"{row.where}: no assistant message; there is nothing to learn")
    full = _render(tokenizer, template, messages, gen=False)
    spans = []
    for i in assistant_turns:
        before = _render(tokenizer, template, messages[:i], gen=True) if i else ""
        upto = _render(tokenizer, template, messages[: i + 1], gen=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{row.where}: the chat template does not render turn {i} as a prefix of the "
                "conversation, so the answer cannot be located; set dataset.chat_template "
                "(e.g. chatml)"
            )
        spans.append((len(before), len(upto)))
    return full, spans
