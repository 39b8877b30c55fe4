"""Render a conversation with the tokenizer's own chat template and mark exactly the trained tokens.

How the mask is found, for any template (no ``{% generation %}`` tags needed):

1. Render the whole conversation once; ``input_ids`` are that text tokenized, exactly what the
   model sees at inference time.
2. For every trained assistant message i, render ``messages[:i]`` with the generation prompt (what
   the model is given before it speaks) and ``messages[:i+1]`` (the conversation once it has
   spoken). Both must be prefixes of the full render. The characters between them, minus the
   whitespace the template adds after the end-of-turn token, are what the model generates: its
   content, its tool calls and the end-of-turn token.
3. Tokens overlapping those character spans are trained (offsets from the fast tokenizer).

If a prefix is not a prefix of the full render, the template rewrites earlier turns (e.g. strips
``<think>`` from all but the last assistant message). No exact mask exists for such a row in one
sequence, so it is refused with reason ``template_rewrites_history`` rather than trained with a
shifted mask.

Templates that cannot render tool calls, ``tool`` messages or a ``tools`` list get them in one
documented plain-text form (see ``adapt_to_template``) so tool calls are trained, never rendered as
"None" or as an empty turn.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any

from sftcore.data import Conversation, DataError, parse_row

IGNORE_INDEX = -100
_PROBE = "sftcore_probe_7f3a"


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template renders natively (probed once per template)."""

    tool_calls: bool
    tool_role: bool
    tools: bool


_support_by_template: dict[str, TemplateSupport] = {}


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _renders_marker(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None) -> bool:
    try:
        return _PROBE in render(tokenizer, messages, tools, add_generation_prompt=False)
    except Exception:  # a template may raise anything (TemplateError, TypeError, ...) on what it can't render
        return False


def template_support(tokenizer: Any) -> TemplateSupport:
    """Probe the tokenizer's chat template for tool support; cached per template text."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; use an instruct/chat model or set one on the tokenizer")
    if template not in _support_by_template:
        call = {"type": "function", "function": {"name": _PROBE, "arguments": {"x": 1}}}
        user = {"role": "user", "content": "hi"}
        tool_calls = _renders_marker(tokenizer, [user, {"role": "assistant", "content": "", "tool_calls": [call]}])
        caller = (
            {"role": "assistant", "content": "", "tool_calls": [call]}
            if tool_calls
            else _fold_tool_calls({"role": "assistant", "content": "", "tool_calls": [call]})
        )
        tool_role = _renders_marker(tokenizer, [user, caller, {"role": "tool", "content": _PROBE, "name": "f"}])
        schema = {"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}
        tools = _renders_marker(tokenizer, [user], [schema])
        _support_by_template[template] = TemplateSupport(tool_calls=tool_calls, tool_role=tool_role, tools=tools)
    return _support_by_template[template]


def _fold_tool_calls(message: dict) -> dict:
    """An assistant message with its tool calls written into the content (for templates that drop them)."""
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in message["tool_calls"]
    ]
    content = "\n".join(([message["content"]] if message["content"] else []) + blocks)
    return {"role": "assistant", "content": content}


def _tools_block(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call these functions:\n<tools>\n" + listing + "\n</tools>\n\n"
        'To call one, reply with:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def adapt_to_template(conv: Conversation, support: TemplateSupport) -> Conversation:
    """The conversation in a form the template renders faithfully.

    - tool calls, if the template drops them: appended to the assistant content as
      ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (one per call);
    - ``tool`` messages, if the template cannot render that role: a user turn holding
      ``<tool_response>\\n...\\n</tool_response>``;
    - a ``tools`` list, if the template ignores it: a "# Tools" block at the end of the system
      message (a system message is added if the row has none).
    """
    messages, trained = [], []
    for message, is_trained in zip(conv.messages, conv.trained, strict=True):
        if message.get("tool_calls") and not support.tool_calls:
            message = _fold_tool_calls(message)
        elif message["role"] == "tool" and not support.tool_role:
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        messages.append(message)
        trained.append(is_trained)
    tools = conv.tools
    if tools and not support.tools:
        block = _tools_block(tools)
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + block}
        else:
            messages.insert(0, {"role": "system", "content": block})
            trained.insert(0, False)
        tools = None
    return Conversation(messages=messages, trained=trained, tools=tools)


def _render_row(tokenizer: Any, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
    try:
        return render(tokenizer, messages, tools, add_generation_prompt)
    except Exception as e:  # the template's own complaint (e.g. "roles must alternate") is the useful message
        raise DataError(
            f"the chat template cannot render this row: {type(e).__name__}: {e}", "template_error"
        ) from None


def assistant_char_spans(tokenizer: Any, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The full render and, per trained assistant message, the character span the model generates."""
    text = _render_row(tokenizer, conv.messages, conv.tools, add_generation_prompt=False)
    spans = []
    for i, is_trained in enumerate(conv.trained):
        if not is_trained:
            continue
        before = _render_row(tokenizer, conv.messages[:i], conv.tools, add_generation_prompt=True)
        through = _render_row(tokenizer, conv.messages[: i + 1], conv.tools, add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) >= len(before)):
            raise DataError(
                f"the chat template renders message {i} (assistant) differently once later turns follow "
                "(it rewrites history, e.g. drops <think> from earlier turns), so no exact loss mask exists "
                "for this row as one sequence; remove reasoning from earlier assistant turns or use a template "
                "that keeps history verbatim",
                "template_rewrites_history",
            )
        spans.append((len(before), max(len(through.rstrip()), len(before))))
    return text, spans


def _token_range(starts: list[int], ends: list[int], span: tuple[int, int]) -> tuple[int, int]:
    """[first, last) token indices whose characters overlap span (starts/ends: token char offsets)."""
    first = bisect.bisect_right(ends, span[0])
    last = bisect.bisect_left(starts, span[1])
    return first, max(first, last)


def encode_conversation(conv: Conversation, tokenizer: Any, max_seq_length: int | None = None) -> dict[str, Any]:
    conv = adapt_to_template(conv, template_support(tokenizer))
    text, spans = assistant_char_spans(tokenizer, conv)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    starts = [start for start, _ in encoding["offset_mapping"]]
    ends = [end for _, end in encoding["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(input_ids)
    turns = [_token_range(starts, ends, span) for span in spans]
    for first, last in turns:
        labels[first:last] = input_ids[first:last]

    truncated, dropped_turns = False, 0
    if max_seq_length is not None and len(input_ids) > max_seq_length:
        # Keep the beginning (system prompt, first turns) and whole assistant turns only: a turn cut
        # in half would teach the model to stop mid-answer without its end-of-turn token.
        kept = [t for t in turns if t[1] <= max_seq_length]
        if not kept:
            raise DataError(
                f"too long: {len(input_ids)} tokens and the first assistant turn ends at token {turns[0][1]}, "
                f"past max_seq_length={max_seq_length}",
                "too_long",
            )
        cut = kept[-1][1]
        input_ids, labels = input_ids[:cut], labels[:cut]
        truncated, dropped_turns = True, len(turns) - len(kept)

    if all(label == IGNORE_INDEX for label in labels):
        raise DataError("no trained tokens: the template renders the assistant turns as empty", "no_trained_tokens")
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated": truncated,
        "trained_turns": len(turns) - dropped_turns,
        "dropped_turns": dropped_turns,
    }


def encode_row(row: dict, tokenizer: Any, max_seq_length: int | None = None) -> dict[str, Any]:
    """Tokenize one row with the tokenizer's chat template; labels are -100 except on trained tokens.

    ``input_ids`` are the tokens of the full chat-template render (truncated at a whole assistant
    turn when longer than ``max_seq_length``); ``labels[i] == input_ids[i]`` where trained (the model
    shifts). Also returns ``truncated``, ``trained_turns`` and ``dropped_turns``. Raises DataError
    (with a ``reason`` code) for invalid rows and rows left with nothing to train.
    """
    return encode_conversation(parse_row(row), tokenizer, max_seq_length)
