"""What the model writes for each assistant turn, under the model's own chat template.

For a trained turn i, the template renders ``messages[:i]`` with the generation prompt (the context
the model is given at inference when it writes that turn) and ``messages[:i+1]`` without it (the
conversation once the turn is the newest one). What the second adds to the first is the turn as the
model writes it: reasoning, content, tool calls and the stop token (gpt-oss's ``<|return|>``
included), less the whitespace after it and less text a template adds only where a conversation
ends (Phi's EOS). Where the generation prompt pre-fills a block the rendered turn lacks (QwQ's and
the DeepSeek-R1 distills' empty think block), the turn follows it; where adding the turn changes the
context just before it (Mistral, gpt-oss, Hermes), the turn is aligned on the end of the context;
where the prompt opens a think block the template never shows (DeepSeek-R1, V3.1), the turn's
reasoning is written into it and closed with ``</think>``; where turns end without an end-of-turn
token (GLM), the token that opens the next message is what the model stops with.

``dropped_by_template`` then says what of each message the template leaves out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftcore.data import THINK_CLOSE, THINK_OPEN, DataError
from sftcore.templates import TemplateConversation, TemplateSupport, render


@dataclass
class Turn:
    """One trained turn rendered in one view of the conversation."""

    ordinal: int  # among the row's trained turns
    message: int  # index into the template conversation
    context: str  # the template's render of what precedes the turn, with the generation prompt
    text: str  # what the model writes for the turn
    whole: str  # the view through this turn rendered as one conversation

    @property
    def sample_text(self) -> str:
        return self.context + self.text


def common_prefix_length(a: str, b: str) -> int:
    """The length of the longest common beginning of two strings, by halving with slice comparisons (C
    speed; os.path.commonprefix walks characters in Python, too slow for whole conversations)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:  # a[:low] == b[:low], a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _render_row(
    tokenizer: Any,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool,
    thinking: bool | None,
) -> str:
    try:
        return render(tokenizer, messages, tools, add_generation_prompt, thinking)
    except Exception as e:  # the template's own complaint (e.g. "roles must alternate") is the useful message
        missing = re.fullmatch(r"'dict object' has no attribute '(\w+)'", str(e))
        lacking = _tools_lacking(tools or [], missing.group(1)) if missing else []
        if lacking:
            raise DataError(
                f"the chat template needs a {missing.group(1)!r} in every tool and tool parameter, and this row's "
                f"tools have none for {', '.join(lacking[:5])}; add them to 'tools' (and to the tools the model is "
                "served with: the template cannot render them at inference either)",
                "template_needs_tool_fields",
            ) from None
        raise DataError(
            f"the chat template cannot render this row: {type(e).__name__}: {e}", "template_error"
        ) from None


def _tools_lacking(tools: list[dict], key: str) -> list[str]:
    """The tools (by name) and tool parameters (tool.parameter) of an OpenAI-style tools list without ``key``."""
    lacking = []
    for tool in tools:
        function = tool.get("function", tool)
        name = function.get("name", "?")
        if key not in function:
            lacking.append(name)
        properties = (function.get("parameters") or {}).get("properties") or {}
        lacking += [f"{name}.{p}" for p, spec in properties.items() if isinstance(spec, dict) and key not in spec]
    return lacking


def _prefilled_think(before: str, through: str) -> int | None:
    """Where the turn starts in ``through`` when the generation prompt pre-fills a think block that the
    rendered turn lacks (QwQ and DeepSeek-R1 distills outside thinking mode end it with "<think>\n</think>")."""
    cut = before.rfind(THINK_OPEN)
    if cut < 0 or before[cut:].replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip():
        return None
    return cut if through.startswith(before[:cut]) else None


def _realigned(before: str, through: str) -> int | None:
    """Where the turn starts in ``through`` when adding it changes the context just before it: Mistral
        places the system prompt in the last user message only while that message is last; gpt-oss shows an
        earlier tool call's analysis only until a final answer follows; Hermes ends a last tool result
        differently. The turn starts after the longest tail of ``before`` found in ``through`` past their
        common beginning; that tail must hold the context's end (at least 16 characters of it, unless it
    follows the common beginning directly)."""
    common = common_prefix_length(before, through)
    low, high = common, len(before)  # smallest k such that before[k:] occurs in through[common:]
    while low < high:
        middle = (low + high) // 2
        if before[middle:] in through[common:]:
            high = middle
        else:
            low = middle + 1
    tail = before[low:]
    if len(tail) < min(len(before) - common, 16):
        # A short tail still marks the turn's start where adding the turn only cut a block out of the
        # context and the rest follows the common beginning verbatim (Mistral's system prompt leaving a
        # short last user message: "[INST]ok[/INST]"); elsewhere it may be a chance match.
        if not tail.strip() or not through.startswith(tail, common):  # whitespace marks nothing
            return None
        start = common + len(tail)
    else:
        start = through.find(tail, common) + len(tail)
    return start if start < len(through) else None


def _prefilled(before: str, through: str, generation_prompt: str) -> int | None:
    """Where the turn starts in ``through`` when the generation prompt ends with a short pre-filled block
    the rendered turn lacks, other than think tags (Gemma-4's empty thought channel): the turn follows
    it. The block starts after the common beginning, backed up to the end of the last line or tag; it is
    the end of the generation prompt, whose start (the turn's header) the render shows just before it."""
    common = common_prefix_length(before, through)
    common = max(before.rfind("\n", 0, common), before.rfind(">", 0, common)) + 1
    prefill = before[common:]
    header = generation_prompt[: len(generation_prompt) - len(prefill)]
    shown = generation_prompt.endswith(prefill) and header and through[:common].endswith(header)
    return common if shown and 0 < len(prefill) <= 64 and common < len(through) else None


def _turn_text(
    before: str, through: str, reasoning: str | None, ordinal: int, generation_prompt: Callable[[], str]
) -> str:
    """What the model writes after ``before`` (the context with its generation prompt) to arrive at
    ``through``; ``generation_prompt`` gives the generation prompt alone, where the last way needs it."""
    start = len(before) if through.startswith(before) else None
    for find in (_prefilled_think, _realigned):
        start = find(before, through) if start is None else start
    if start is None:
        start = _prefilled(before, through, generation_prompt())
    if start is None:
        raise DataError(
            f"the chat template renders assistant turn {ordinal + 1} in a way that does not follow its own "
            "generation prompt, so it is unclear what the model writes there; fix the template or pass a "
            "--chat_template that agrees with itself",
            "template_error",
        )
    text = through[start:]
    if before.rstrip().endswith(THINK_OPEN) and not (reasoning and reasoning.strip() in text):
        # The generation prompt opens a think block and the template does not show the reasoning in it
        # (DeepSeek-R1 strips it from every turn): the model writes its reasoning there and closes the block.
        if text.lstrip().startswith(THINK_CLOSE):
            text = (reasoning or "") + text
        else:
            close = f"\n{THINK_CLOSE}\n\n" if before.endswith("\n") else THINK_CLOSE
            text = (reasoning or "") + close + text
    return text


def render_turn(
    tokenizer: Any,
    tc: TemplateConversation,
    support: TemplateSupport,
    view: list[int],
    message: int,
    ordinal: int,
    replaced: dict[int, dict] | None = None,
) -> Turn:
    """The turn tc.messages[message] rendered in a view of the conversation (the indices of the messages
    shown, some of them possibly ``replaced``)."""
    messages = [(replaced or {}).get(k, tc.messages[k]) for k in view]
    position = view.index(message)
    reasoning = tc.reasoning[message]

    def turn_renders(thinking: bool | None) -> tuple[str, str]:
        """(context with the generation prompt, the render through the turn less text added only where a
        conversation ends and the whitespace after the end-of-turn token)."""
        before = _render_row(tokenizer, messages[:position], tc.tools, True, thinking)
        rendered = _render_row(tokenizer, messages[: position + 1], tc.tools, False, thinking)
        return before, rendered.removesuffix(support.end_text).rstrip()

    # A turn with reasoning is written in thinking mode; one without, in the template's default mode, or
    # where that prompt does not lead to the turn (it opens a reasoning block, as Cohere2's does) and the
    # template has a mode without reasoning, in that mode.
    thinking = True if reasoning is not None else None
    before, through = turn_renders(thinking)
    if reasoning is None and not through.startswith(before):
        plain = turn_renders(False)
        if plain[0] != before:
            (before, through), thinking = plain, False

    def generation_prompt() -> str:
        history = _render_row(tokenizer, messages[:position], tc.tools, False, thinking) if position else ""
        return before.removeprefix(history) if before.startswith(history) else ""

    text = _turn_text(before, through, reasoning, ordinal, generation_prompt)
    eos = tokenizer.eos_token
    if eos and eos in text[:-1]:
        # Generation ends at the end-of-sequence token: what a template renders after it in the same turn
        # (Command-R+'s next turn header, DeepSeek-R1's second block after tool calls) is never written.
        text = text[: text.index(eos) + len(eos)]
    if support.turn_stops:
        # The turn ends without an end-of-turn token (GLM): the model stops by writing the token that opens
        # the next message (or, where the row ends, a user message).
        following = tc.messages[message + 1]["role"] if message + 1 < len(tc.messages) else "user"
        stop = dict(support.turn_stops).get(following, "")
        text, through = text + stop, through + stop
    return Turn(ordinal=ordinal, message=message, context=before, text=text, whole=through)


def _shows(text: str, piece: str) -> bool:
    """Whether a rendered text contains a message's text (as is, or JSON-escaped as some templates put it)."""
    piece = piece.strip()
    return not piece or piece in text or json.dumps(piece, ensure_ascii=False)[1:-1] in text


def dropped_by_template(turns: list[Turn], tc: TemplateConversation) -> list[tuple[str, str]]:
    """What the template leaves out: of each trained turn, in the text the model is trained to write; of
    every other message, in the context of the next trained turn. Each is (reason, description)."""
    omissions = []
    for turn in turns:
        where = f"assistant turn {turn.ordinal + 1}"
        for source in tc.sources[turn.message]:
            if not _shows(turn.text, source["content"]):
                reason = (
                    "template_drops_text_beside_tool_calls" if source.get("tool_calls") else "template_drops_content"
                )
                omissions.append((reason, f"{where}: its text is not in the rendered turn"))
            if source.get("reasoning_content") and not _shows(turn.text, source["reasoning_content"]):
                omissions.append(("template_drops_reasoning", f"{where}: its reasoning is not in the rendered turn"))
            names = [c["function"]["name"] for c in source.get("tool_calls", [])]
            if any(turn.text.count(name) < names.count(name) for name in names):
                what = f"{where}: not all of its {len(names)} tool calls render"
                omissions.append(("template_drops_tool_calls", what))
    trained = {t.message for t in turns}
    for k in range(turns[-1].message):
        if k in trained:
            continue
        seen_by = next(t for t in turns if t.message > k)
        for source in tc.sources[k]:
            if not _shows(seen_by.context, source["content"]):
                role = source["role"]
                reason = (
                    "template_drops_text_beside_tool_calls" if source.get("tool_calls") else f"template_drops_{role}"
                )
                omissions.append(
                    (reason, f"a {role} message before assistant turn {seen_by.ordinal + 1} is not in its context")
                )
    return omissions
