"""Chat templates: which template renders a row, what it can render (probed once), and the row rewritten
into a form that template renders faithfully.

Templates differ in what they accept. Each is probed once, with tiny conversations holding a marker
string, for what it renders, refuses or drops; ``adapt_to_template`` then rewrites a conversation
into what that template renders without loss:

- tool calls: their arguments as a mapping or as a JSON string, whichever the template renders natively
  (most apply ``tojson`` to a mapping; DeepSeek's own templates concatenate a string); where it renders
  neither, written into the assistant content as documented ``<tool_call>`` JSON blocks, and reported
  on every such row (``template_no_native_tool_calls``); tool calls it refuses without 9-character
  alphanumeric ids (Mistral): such ids, derived from the original ones, on the calls and on the tool
  results that answer them;
- ``tool`` messages it cannot render: a user turn holding ``<tool_response>...</tool_response>``;
- a ``tools`` list it ignores: a "# Tools" block in the system message; one it iterates without
  checking (Hermes, Command-R tool-use templates): an empty list instead of none;
- a system role it refuses (Gemma): the system prompt opens the first user turn;
- templates that require user/assistant alternation: consecutive same-role messages are merged;
- reasoning: passed in the field the template renders (``reasoning_content`` for Qwen3, GLM and
  most reasoning templates, ``thinking`` for gpt-oss), else folded into the content as
  ``<think>\\n...\\n</think>\\n\\n`` when the template keeps that, else (the template strips it,
  e.g. DeepSeek-R1) kept aside: sftcore.masking writes it after the generation prompt's ``<think>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftcore.data import THINK_CLOSE, THINK_OPEN, Conversation, DataError

SHIPPED_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
_PROBE = "sftcore_probe_7f3a"
_PROBE_REASONING = "sftcore_reasoning_probe_9c1e"
_PROBE_RESULT = "sftcore_result_probe_52d0"
_PROBE_ARGUMENTS = {"sftcore_key_3b1d": "sftcore_value_8e2a"}
# How templates take a tool call's arguments: a mapping (most use ``arguments | tojson``) or a JSON string
# (DeepSeek's own templates concatenate it; GLM and Qwen3-Coder iterate a mapping and refuse a string).
TOOL_ARGUMENTS = ("object", "json")


def shipped_template_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TEMPLATES.glob("*.jinja"))


def load_chat_template(name_or_path: str) -> str:
    """The text of a chat template: a Jinja file, one shipped with sftcore (e.g. ``chatml``), or already
    a template's text (what the driver hands to workers, which may not see its files)."""
    if "{{" in name_or_path or "{%" in name_or_path:
        return name_or_path
    path = Path(name_or_path)
    if not path.is_file():
        path = SHIPPED_TEMPLATES / f"{name_or_path}.jinja"
    if not path.is_file():
        raise DataError(
            f"--chat_template {name_or_path}: no such file, and not a template shipped with sftcore "
            f"({', '.join(shipped_template_names())})",
            "missing_file",
        )
    return path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template renders natively (probed once per template and tokenizer)."""

    tool_calls: bool  # renders assistant tool_calls
    tool_arguments: str  # TOOL_ARGUMENTS: the form in which it renders their arguments natively
    tool_call_ids: bool  # refuses tool calls unless they carry 9-character alphanumeric ids (Mistral)
    null_content: bool  # renders a tool-call message whose content is None (the OpenAI shape)
    tool_role: bool  # renders tool messages
    tools: bool  # renders a tools list
    empty_tools: bool  # raises on tools=None, so rows without tools pass an empty list
    system_role: bool  # renders a system message
    alternation: bool  # refuses two consecutive user messages
    reasoning: str  # how the newest turn's reasoning reaches the render: REASONING_MODES
    end_text: str  # text added only where a conversation ends without a generation prompt (Phi: EOS)
    # For templates whose assistant turns end without an end-of-turn token (GLM), the model stops by writing
    # the special token that opens the next message: (role of the next message, that token), else empty.
    turn_stops: tuple[tuple[str, str], ...]


REASONING_MODES = ("reasoning_content", "thinking", "inline", "none")
_support_by_template: dict[tuple, TemplateSupport] = {}


def tokenizer_key(tokenizer: Any) -> tuple:
    """What identifies a tokenizer's behaviour for the caches here: its source, added tokens and special
    tokens."""
    added = tuple(sorted(tokenizer.get_added_vocab().items()))
    return (tokenizer.name_or_path, len(tokenizer), added, tokenizer.bos_token, tokenizer.eos_token)


_THINKING_MODES = {
    None: {},  # the template's default
    True: {"enable_thinking": True, "thinking": True},
    False: {"enable_thinking": False, "thinking": False, "reasoning": False},
}


def render(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool,
    thinking: bool | None = None,
) -> str:
    """The template's text, in its default mode (``thinking`` None), or with reasoning switched on or off
    by the flags templates read (``enable_thinking``: Qwen3, QwQ, GLM, SmolLM3, DeepSeek-R1 distills;
    ``thinking``: DeepSeek-V3.1; ``reasoning``: Command-A / Cohere2)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **_THINKING_MODES[thinking]
    )


def _renders(tokenizer: Any, messages: list[dict], tools: list[dict] | None, marker: str = _PROBE) -> bool:
    try:
        return marker in render(tokenizer, messages, tools, add_generation_prompt=False)
    except Exception:  # a template may raise anything (TemplateError, TypeError, ...) on what it can't render
        return False


def _renders_call(tokenizer: Any, messages: list[dict], tools: list[dict] | None) -> bool:
    """Whether the render shows the probe call natively: its name, and its argument's value not inside an
    escaped JSON string (what ``tojson`` makes of arguments given as a string)."""
    try:
        text = render(tokenizer, messages, tools, add_generation_prompt=False)
    except Exception:
        return False
    value = next(iter(_PROBE_ARGUMENTS.values()))
    return _PROBE in text and value in text and f'\\"{value}' not in text


def _arguments_as(arguments: dict, form: str) -> dict | str:
    return json.dumps(arguments, ensure_ascii=False) if form == "json" else arguments


def _probe_caller(content: Any, arguments: str, **fields: Any) -> dict:
    """An assistant message with one probe tool call, its arguments in the form ``arguments``."""
    function = {"name": _PROBE, "arguments": _arguments_as(_PROBE_ARGUMENTS, arguments)}
    call = {"type": "function", "function": function} | fields
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def _raises(tokenizer: Any, messages: list[dict], tools: list[dict] | None) -> bool:
    try:
        render(tokenizer, messages, tools, add_generation_prompt=False)
    except Exception:
        return True
    return False


def _end_text(tokenizer: Any, no_tools: list | None) -> str:
    """Text a template appends only at the very end of a conversation rendered without a generation
    prompt (Phi-3.5 and Phi-4-mini append EOS). Found on token boundaries: the tokens after the common
    start of [user, assistant] and [user, assistant, user] that also end the longer one."""
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}
    try:
        short = render(tokenizer, [user, reply], no_tools, add_generation_prompt=False)
        long = render(tokenizer, [user, reply, {"role": "user", "content": "more"}], no_tools, False)
    except Exception:
        return ""
    short_ids = tokenizer(short, add_special_tokens=False)["input_ids"]
    long_ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(short_ids), len(long_ids)) and short_ids[common] == long_ids[common]:
        common += 1
    tail = short_ids[common:]
    if not tail or long_ids[-len(tail) :] != tail:
        return ""
    # A block appended where a conversation ends may open like a message, with the token that opens the
    # generation prompt too (Command-R+'s closing instructions); the common beginning took that token.
    with_prompt = render(tokenizer, [user], no_tools, add_generation_prompt=True)
    without = render(tokenizer, [user], no_tools, add_generation_prompt=False)
    prompt_ids = tokenizer(with_prompt.removeprefix(without), add_special_tokens=False)["input_ids"]
    if common and prompt_ids and short_ids[common - 1] == prompt_ids[0] and with_prompt.startswith(without):
        tail = short_ids[common - 1 :]
    text = tokenizer.decode(tail)
    return text if text.strip() and short.endswith(text) and long.endswith(text) else ""


def _turn_stops(
    tokenizer: Any, user: dict, caller: dict, result: dict, no_tools: list | None, end_text: str
) -> tuple[tuple[str, str], ...]:
    """(next message's role, the special token opening it) for templates whose assistant turns end
    without an end-of-turn token; empty for the others."""
    reply = {"role": "assistant", "content": _PROBE}
    try:
        alone = render(tokenizer, [user, reply], no_tools, add_generation_prompt=False)
    except Exception:
        return ()
    if not alone.removesuffix(end_text).rstrip().endswith(_PROBE):
        return ()
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(
        tokenizer.all_special_ids
    )
    followers = {
        "user": ([user, reply], {"role": "user", "content": "more"}),
        "assistant": ([user, reply], {"role": "assistant", "content": "more"}),
        "system": ([user, reply], {"role": "system", "content": "more"}),
        "tool": ([user, caller], result),
    }
    stops = []
    for role, (before, following) in followers.items():
        try:
            rendered = render(tokenizer, before, no_tools, False).removesuffix(end_text)
            continued = render(tokenizer, [*before, following], no_tools, False)
        except Exception:
            continue
        if continued.startswith(rendered):
            ids = tokenizer(continued[len(rendered) :], add_special_tokens=False)["input_ids"]
            if ids and ids[0] in special:
                stops.append((role, tokenizer.decode(ids[:1])))
    return tuple(stops)


def _reasoning_mode(tokenizer: Any, user: dict, no_tools: list | None) -> str:
    """The first way of passing reasoning that the template shows in the newest assistant turn."""
    candidates = {
        "reasoning_content": {"role": "assistant", "content": "ok", "reasoning_content": _PROBE_REASONING},
        "thinking": {"role": "assistant", "content": "ok", "thinking": _PROBE_REASONING},
        "inline": {"role": "assistant", "content": _fold_reasoning(_PROBE_REASONING, "ok")},
    }
    for mode, reply in candidates.items():
        try:
            text = render(tokenizer, [user, reply], no_tools, add_generation_prompt=False, thinking=True)
        except Exception:
            continue
        if _PROBE_REASONING in text:
            return mode
    return "none"


def template_support(tokenizer: Any) -> TemplateSupport:
    """Probe the tokenizer's chat template; cached per template text and tokenizer."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(
            "the tokenizer has no chat template; use an instruct/chat model or pass --chat_template "
            "(a Jinja file, or 'chatml')",
            "template_refused",
        )
    key = (template, *tokenizer_key(tokenizer))
    if key in _support_by_template:
        return _support_by_template[key]

    user = {"role": "user", "content": "hi"}
    empty_tools = _raises(tokenizer, [user], None) and not _raises(tokenizer, [user], [])
    no_tools: list | None = [] if empty_tools else None

    # The first form of the arguments, with text or null content, and without or with Mistral-style ids, that
    # the template renders natively: the call's name and its arguments' value, not as an escaped JSON string.
    native = next(
        (
            (arguments, fields)
            for arguments in TOOL_ARGUMENTS
            for fields in ({}, {"id": "a1b2c3d4e"})
            for content in ("", None)
            if _renders_call(tokenizer, [user, _probe_caller(content, arguments, **fields)], no_tools)
        ),
        None,
    )
    tool_calls = native is not None
    tool_arguments, ids = native or ("object", {})
    tool_call_ids = bool(ids)

    def caller(content: Any, **fields: Any) -> dict:
        return _probe_caller(content, tool_arguments, **fields)

    null_content = False
    if tool_calls:  # a null-content call, as the newest turn and in history
        later = [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "done"}]
        try:
            texts = [render(tokenizer, [user, caller(None, **ids), *more], no_tools, False) for more in ([], later)]
            null_content = all(_PROBE in text and "None" not in text for text in texts)
        except Exception:
            pass
    answered = caller("", **ids) if tool_calls else _fold_tool_calls(caller("", **ids))
    result = {"role": "tool", "content": _PROBE_RESULT, "name": _PROBE} | ({"tool_call_id": "a1b2c3d4e"} if ids else {})
    tool_role = _renders(tokenizer, [user, answered, result], no_tools, _PROBE_RESULT)
    schema = {"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}
    tools = _renders(tokenizer, [user], [schema])
    system_role = _renders(tokenizer, [{"role": "system", "content": _PROBE}, user], no_tools)
    alternation = _raises(tokenizer, [user, {"role": "user", "content": "again"}], no_tools)
    end_text = _end_text(tokenizer, no_tools)
    if end_text and render(tokenizer, [user], no_tools, True) == render(tokenizer, [user], no_tools, False):
        # Text that ends every conversation and is also the generation prompt (Command-R7B's tool-use
        # template) starts like any turn header: where an assistant turn ends cannot be told apart.
        raise DataError(
            f"the chat template appends its generation prompt ({end_text.strip()[:60]!r}) to every conversation, "
            "even without add_generation_prompt, so where an assistant turn ends is ambiguous; pass a "
            "--chat_template that adds it only when asked",
            "template_refused",
        )
    support = TemplateSupport(
        tool_calls=tool_calls,
        tool_arguments=tool_arguments,
        tool_call_ids=tool_call_ids,
        null_content=null_content,
        tool_role=tool_role,
        tools=tools,
        empty_tools=empty_tools,
        system_role=system_role,
        alternation=alternation,
        reasoning=_reasoning_mode(tokenizer, user, no_tools),
        end_text=end_text,
        turn_stops=_turn_stops(tokenizer, user, answered, result, no_tools, end_text),
    )
    _support_by_template[key] = support
    return support


def _fold_reasoning(reasoning: str, content: str) -> str:
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"


def _fold_tool_calls(message: dict) -> dict:
    """An assistant message with its tool calls written into the content (for templates that drop them)."""
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in message["tool_calls"]
    ]
    content = "\n".join(([message["content"]] if message["content"] else []) + blocks)
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def _with_json_arguments(call: dict) -> dict:
    function = call["function"]
    return call | {"function": function | {"arguments": _arguments_as(function["arguments"], "json")}}


def _tools_block(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call these functions:\n<tools>\n" + listing + "\n</tools>\n\n"
        'To call one, reply with:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def _short_call_id(original: str) -> str:
    """A 9-character alphanumeric id (Mistral's format), the same for the same original id."""
    return hashlib.sha1(original.encode()).hexdigest()[:9]


@dataclass
class TemplateConversation:
    """A conversation in the form one template renders faithfully, plus what each message must show."""

    messages: list[dict[str, Any]]  # what the template is given
    trained: list[bool]
    tools: list[dict[str, Any]] | None
    reasoning: list[str | None]  # each message's reasoning, also where the template is not given it
    sources: list[list[dict[str, Any]]]  # the canonical message(s) each one came from (for drop checks)
    # for templates without a system role: the first message without the system prompt folded into it
    first_without_system: dict[str, Any] | None = None


def _with_reasoning(message: dict, mode: str) -> dict:
    reasoning = message.get("reasoning_content")
    if reasoning is None or mode == "reasoning_content":
        return message
    plain = {k: v for k, v in message.items() if k != "reasoning_content"}
    if mode == "thinking":
        return plain | {"thinking": reasoning}
    if mode == "inline":  # null content (a tool call's) is no text
        return plain | {"content": _fold_reasoning(reasoning, message["content"] or "")}
    return plain


def _merge(first: dict, second: dict) -> dict:
    """Two consecutive same-role messages as one (for templates that require alternation)."""
    merged = dict(first)
    merged["content"] = "\n\n".join(part for part in (first.get("content"), second.get("content")) if part)
    calls = first.get("tool_calls", []) + second.get("tool_calls", [])
    if calls:
        merged["tool_calls"] = calls
    return merged


def adapt_to_template(conv: Conversation, support: TemplateSupport) -> TemplateConversation:
    """The conversation in a form the template renders faithfully (see the module docstring)."""
    messages: list[dict] = []
    call_ids: dict[str, str] = {}  # original tool-call id -> Mistral-style id
    pending_ids: list[str] = []  # ids of calls not yet answered, in order (for tool messages without one)
    for message in conv.messages:
        if message.get("tool_calls") and support.tool_call_ids:
            calls = []
            for n, c in enumerate(message["tool_calls"]):
                short = _short_call_id(c.get("id") or f"{len(messages)}:{n}")
                call_ids[c.get("id", short)] = short
                pending_ids.append(short)
                calls.append(c | {"id": short})
            message = message | {"tool_calls": calls}
        if message.get("tool_calls") and support.tool_calls and support.tool_arguments == "json":
            message = message | {"tool_calls": [_with_json_arguments(c) for c in message["tool_calls"]]}
        if message.get("tool_calls") and not support.tool_calls:
            message = _fold_tool_calls(message)
        elif message.get("tool_calls") and support.null_content and not message["content"]:
            message = message | {"content": None}
        elif message["role"] == "tool" and not support.tool_role:
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        elif message["role"] == "tool" and support.tool_call_ids:
            answered = call_ids.get(message.get("tool_call_id", ""), pending_ids[0] if pending_ids else "")
            if answered in pending_ids:
                pending_ids.remove(answered)
            message = message | {"tool_call_id": answered or _short_call_id("")}
        messages.append(_with_reasoning(message, support.reasoning))
    trained = list(conv.trained)
    reasoning = [m.get("reasoning_content") for m in conv.messages]
    sources = [[m] for m in conv.messages]

    tools = conv.tools
    if tools and not support.tools:
        block = _tools_block(tools)
        if messages[0]["role"] == "system":
            messages[0] = messages[0] | {"content": messages[0]["content"] + "\n\n" + block}
        else:
            messages.insert(0, {"role": "system", "content": block})
            trained.insert(0, False)
            reasoning.insert(0, None)
            sources.insert(0, [])
        tools = None
    if tools is None and support.empty_tools:
        tools = []

    folded_system = None
    if not support.system_role and messages[0]["role"] == "system":
        system = messages[0]["content"]
        if len(messages) > 1 and messages[1]["role"] == "user":
            folded_system = system + "\n\n"
            messages[1] = messages[1] | {"content": folded_system + messages[1]["content"]}
            sources[1] = sources[0] + sources[1]
            del messages[0], trained[0], reasoning[0], sources[0]
        else:
            messages[0] = {"role": "user", "content": system}

    if support.alternation:
        i = 1
        while i < len(messages):
            same_role = messages[i]["role"] == messages[i - 1]["role"]
            # A merged turn is trained as one: only merge turns trained alike, with reasoning (if any) first.
            if same_role and trained[i] == trained[i - 1] and reasoning[i] is None:
                messages[i - 1] = _merge(messages[i - 1], messages[i])
                reasoning[i - 1] = reasoning[i - 1] or reasoning[i]
                sources[i - 1] += sources[i]
                del messages[i], trained[i], reasoning[i], sources[i]
            else:
                i += 1
    first_without_system = (
        messages[0] | {"content": messages[0]["content"].removeprefix(folded_system)} if folded_system else None
    )
    return TemplateConversation(messages, trained, tools, reasoning, sources, first_without_system)
