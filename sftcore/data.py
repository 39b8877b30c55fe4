"""Parse and validate trajectory rows.

A row is a JSON object ``{"input": ..., "output": ...}``:

- ``input``: plain text (one user message), or a JSON string holding an array of chat messages
  (an already-decoded list is accepted too). Everything in ``input`` is prompt: it is never trained,
  assistant messages included (they are context the user chose to put on the prompt side).
- ``output``: a list of messages, or a string (one assistant message). Its assistant messages are
  what the model is trained to produce; its user/tool messages are observations (masked).
- ``tools`` (optional): a list of function schemas, passed to templates that render tools.

Rows in the shapes public agent data comes in are read as well (``--data_format auto`` tells them
apart by their keys, row by row): OpenAI / TRL conversational rows ``{"messages": [...], "tools":
[...]}`` (every assistant message trained unless it says ``"train": false``, as TRL does) and their
prompt-completion form ``{"prompt": [...], "completion": [...]}``; ShareGPT rows ``{"conversations":
[{"from": ..., "value": ...}], "system": ..., "tools": ...}`` (human / gpt / function_call /
observation / system, as APIGen-MT, xLAM, glaive, ToolACE and LLaMA-Factory write them; ``tools`` a
list or a JSON string). Each becomes the ``input`` / ``output`` row above: the messages before the
first assistant message are the prompt.

Messages use the OpenAI chat shape: roles ``system``, ``user``, ``assistant``, ``tool``; assistant
``tool_calls`` (``content`` may be null, ``arguments`` a JSON string or an object); ``tool`` messages
with ``tool_call_id`` / ``name``. Assistant reasoning comes as ``reasoning_content`` (the
OpenAI-compatible / DeepSeek / vLLM field; ``reasoning`` and ``thinking`` are accepted too) or inline
as a leading ``<think>...</think>`` in the content. An assistant message in ``output`` with
``"train": false`` (or ``"weight": 0``) is context, not trained. Messages are normalised here into
one canonical shape (reasoning in ``reasoning_content``) so the rendering code never has to guess.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# --train_on presets: which assistant messages of ``output`` are trained (each may still opt out)
TRAIN_ON = ("all", "last", "final")
DATA_FORMATS = ("auto", "rows", "messages", "sharegpt")  # --data_format
# ShareGPT's speaker names (LLaMA-Factory's, axolotl's and the exports of APIGen-MT, xLAM, glaive, ToolACE)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "system": "system",
}


class DataError(ValueError):
    """A row that cannot be trained on. ``reason`` is a short code used to count rejects by cause."""

    def __init__(self, message: str, reason: str = "invalid_row"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """A validated row: canonical messages, which of them are trained, and the row's tool schemas."""

    messages: list[dict[str, Any]]
    trained: list[bool]  # trained[i]: messages[i] is an assistant message from ``output`` that is trained
    tools: list[dict[str, Any]] | None = None


@dataclass
class LineResult:
    """One line of a JSONL file: its file, 1-based number and either the parsed row or the error
    (neither: a blank line)."""

    file: str
    line: int
    row: dict[str, Any] | None = None
    error: DataError | None = None


# Rejection reasons that are not bad input: the row is valid but yields nothing to train. Such rows are
# counted and reported, never a reason to stop the run (--on_bad_rows governs malformed rows only).
NOT_BAD_INPUT = ("too_long", "nothing_to_train")
EXAMPLES_PER_REASON = 100  # entries kept in memory per reason; every one of them is in rejected_rows.jsonl


def _place(entry: dict[str, Any]) -> tuple[str, int]:
    return entry["file"], entry["line"]


@dataclass
class LineCounts:
    """Where the lines of the data went: blank, rejected (with file, line number, reason and message), or
    a row trained as one or more samples, with what of it is not in them as the row has it
    (``omissions``: turns that did not fit, history left out so that a turn fits, text the template
    drops). Shared by the training pipeline and the inspection report, so both count the same way.

    Counts are complete; ``rejected`` and ``omissions`` keep the first EXAMPLES_PER_REASON entries of
    each reason (by file and line), so memory does not grow with the data. Partial counts (of Ray Data
    batches, of torchrun ranks) add up with ``merge``, in any order, to the same result."""

    path: str
    lines: int = 0
    blank_lines: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"file", "line", "reason", "message"[, "text"]}
    omissions: list[dict[str, Any]] = field(default_factory=list)  # {"file", "line", "reason", "message", ...}
    rejected_counts: Counter = field(default_factory=Counter)  # reason -> rejected lines
    omission_counts: Counter = field(default_factory=Counter)  # reason -> omissions
    omission_rows: Counter = field(default_factory=Counter)  # reason -> rows with that omission
    files: dict[str, Counter] = field(default_factory=dict)  # file -> its lines, blank_lines, rejected, rows
    rows: int = 0
    samples: int = 0
    tokens: int = 0  # in the samples
    trained_tokens: int = 0
    row_tokens: int = 0  # of the rows as one sequence each (what splitting is measured against)
    trained_turns: int = 0
    windowed_turns: int = 0  # trained with a shortened history (--overflow window)
    dropped_turns: int = 0  # did not fit at all
    trees: int = 0  # prefix trees the samples were merged into (sftcore.trees; 0 without tree packing)
    tree_tokens: int = 0
    repeated_targets: int = 0  # tokens two samples train alike, trained once in their tree

    def _count_line(self, file: str, outcome: str) -> None:
        self.lines += 1
        per_file = self.files.setdefault(file, Counter())
        per_file["lines"] += 1
        per_file[outcome] += 1

    def blank(self, file: str) -> None:
        self._count_line(file, "blank_lines")
        self.blank_lines += 1

    def reject(self, file: str, line: int, error: DataError, text: str | None = None) -> None:
        self._count_line(file, "rejected")
        entry = {"file": file, "line": line, "reason": error.reason, "message": str(error)}
        self.rejected_counts[error.reason] += 1
        if self.rejected_counts[error.reason] <= EXAMPLES_PER_REASON:
            self.rejected.append(entry if text is None else {**entry, "text": text})

    def add_row(self, file: str, line: int, stats: dict[str, Any]) -> None:
        """Count a trained row from its encoding stats (the keys of ``sftcore.masking.row_stats``)."""
        self._count_line(file, "rows")
        self.rows += 1
        for key in ("samples", "tokens", "trained_tokens", "row_tokens", "trained_turns", "windowed_turns"):
            setattr(self, key, getattr(self, key) + int(stats[key]))
        self.dropped_turns += int(stats["dropped_turns"])
        for key in ("trees", "tree_tokens", "repeated_targets"):
            setattr(self, key, getattr(self, key) + int(stats.get(key, 0)))
        for reason in {reason for reason, _ in stats["omissions"]}:
            self.omission_rows[reason] += 1
        for reason, message in stats["omissions"]:
            self.omission_counts[reason] += 1
            if self.omission_counts[reason] <= EXAMPLES_PER_REASON:
                self.omissions.append(
                    {"file": file, "line": line, "reason": reason, "message": message, "row_trained": True}
                )

    def merge(self, other: LineCounts) -> None:
        """Add another part's counts (the parts cover different lines)."""
        for key in _SUMMED:
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for key in ("rejected_counts", "omission_counts", "omission_rows"):
            getattr(self, key).update(getattr(other, key))
        for file, counts in other.files.items():
            self.files.setdefault(file, Counter()).update(counts)
        self.rejected = _first_per_reason(self.rejected + other.rejected)
        self.omissions = _first_per_reason(self.omissions + other.omissions)

    @property
    def shapes(self) -> dict[str, int]:
        """Trained rows by the shape they were written in (rows, messages, sharegpt; row_format)."""
        total: Counter = Counter()
        for counts in self.files.values():
            total.update({key.removeprefix("as "): n for key, n in counts.items() if key.startswith("as ")})
        return dict(total)

    @property
    def split_overhead(self) -> float:
        """Tokens in the samples / tokens of the rows as one sequence each (1.0: nothing was split)."""
        return self.tokens / max(1, self.row_tokens)

    @property
    def tree_overhead(self) -> float:
        """Tokens in the prefix trees / tokens of the rows as one sequence each."""
        return self.tree_tokens / max(1, self.row_tokens)

    def token_costs(self) -> str:
        """The rows' tokens three ways: as one sequence each, as samples, and as trees when trained as trees."""
        trees = f", trained as {self.trees} trees {self.tree_overhead:.2f}x" if self.trees else ""
        return f"as one sequence 1.00x, as {self.samples} samples {self.split_overhead:.2f}x{trees}"

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected_counts.values())

    def bad_row_count(self) -> int:
        return sum(n for reason, n in self.rejected_counts.items() if reason not in NOT_BAD_INPUT)

    def format_rejects(self, limit: int = 20, bad_only: bool = False) -> str:
        counts = {r: n for r, n in self.rejected_counts.items() if not (bad_only and r in NOT_BAD_INPUT)}
        examples = [r for r in self.rejected if r["reason"] in counts]
        counted = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        total = sum(counts.values())
        what = "bad row(s)" if bad_only else "row(s) not trained"
        lines = [f"{total} {what} in {self.path} ({counted})"]
        lines += [f"  {r['file']}:{r['line']}: {r['message']} [{r['reason']}]" for r in examples[:limit]]
        if total > min(limit, len(examples)):
            lines.append(f"  ... and {total - min(limit, len(examples))} more")
        return "\n".join(lines)

    def format_rejected(self, limit: int = 5) -> str:
        """Rejected lines by reason: counts and the first lines."""
        title = lambda reason, count: f"rejected [{reason}]: {count}"  # noqa: E731
        return _by_reason(self.rejected, self.rejected_counts, limit, title)

    def format_omissions(self, limit: int = 5) -> str:
        """What trained rows lose, by reason: counts, rows and the first lines."""
        return _by_reason(
            self.omissions,
            self.omission_counts,
            limit,
            lambda reason, count: f"{reason}: {count} in {self.omission_rows[reason]} row(s)",
        )


def _by_reason(entries: list[dict[str, Any]], counts: Counter, limit: int, title: Callable[[str, int], str]) -> str:
    out = []
    for reason, count in sorted(counts.items()):
        shown = [entry for entry in entries if entry["reason"] == reason][:limit]
        out.append(f"  {title(reason, count)}")
        out += [f"    {e['file']}:{e['line']}: {e['message']}" for e in shown]
        if count > len(shown):
            out.append(f"    ... and {count - len(shown)} more")
    return "\n".join(out)


_SUMMED = ("lines", "blank_lines", "rows", "samples", "tokens", "trained_tokens", "row_tokens", "trained_turns")
_SUMMED += ("windowed_turns", "dropped_turns", "trees", "tree_tokens", "repeated_targets")


def _first_per_reason(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept, seen = [], Counter()
    for entry in sorted(entries, key=_place):
        seen[entry["reason"]] += 1
        if seen[entry["reason"]] <= EXAMPLES_PER_REASON:
            kept.append(entry)
    return kept


def _text_content(content: Any, where: str) -> str | None:
    """Content as a string: strings pass, lists of OpenAI text parts are joined, null stays null."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise DataError(f"{where}: content parts must be {{'type': 'text', 'text': str}}, got {part!r:.80}")
        return "".join(texts)
    raise DataError(f"{where}: content must be a string, null or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One tool call in the shape chat templates expect: {"type", "function": {"name", "arguments": dict}}."""
    if not isinstance(call, dict):
        raise DataError(f"{where}: a tool call must be an object, got {type(call).__name__}")
    function = call.get("function", call)  # accept the flat {"name", "arguments"} shape too
    if not isinstance(function, dict):
        raise DataError(f"{where}: tool call 'function' must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: tool call has no function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: tool call {name!r} arguments are not valid JSON ({e.msg})") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: tool call {name!r} arguments must be a JSON object, got {arguments!r:.80}")
    canonical: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        canonical["id"] = call["id"]
    return canonical


def _reasoning(message: dict[str, Any], content: str | None, where: str) -> tuple[str | None, str | None]:
    """(reasoning, content): from a reasoning field, or split off a leading <think>...</think> in content."""
    given = [key for key in REASONING_FIELDS if message.get(key) is not None]
    if len(given) > 1:
        raise DataError(f"{where}: give the reasoning once, not in both {given[0]!r} and {given[1]!r}", "bad_type")
    reasoning = message[given[0]] if given else None
    if reasoning is not None and not isinstance(reasoning, str):
        raise DataError(f"{where}: {given[0]!r} must be a string, got {type(reasoning).__name__}", "bad_type")
    if content and content.lstrip().startswith(THINK_OPEN) and THINK_CLOSE in content:
        if reasoning is not None:
            raise DataError(
                f"{where}: reasoning given twice: in {given[0]!r} and as <think>...</think> in the content", "bad_type"
            )
        inline, _, content = content.lstrip()[len(THINK_OPEN) :].partition(THINK_CLOSE)
        reasoning, content = inline.strip("\n"), content.lstrip("\n")
    return reasoning, content


def _train_flag(message: dict[str, Any], where: str) -> bool:
    """An assistant message's own choice: "train": false or "weight": 0 masks it (default: trained; null,
    as columnar files write a field other rows have, is the default too)."""
    train = message.get("train")
    train = True if train is None else train
    if not isinstance(train, bool):
        raise DataError(f"{where}: 'train' must be true or false, got {train!r:.40}", "bad_type")
    weight = message.get("weight")
    weight = 1 if weight is None else weight
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(f"{where}: 'weight' must be 0 or 1 (per-message weights are not supported), got {weight!r:.40}")
    return train and weight == 1


def _message(message: Any, where: str) -> tuple[dict[str, Any], bool]:
    """The canonical message and whether the message itself asks to be trained."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: a message must be an object, got {type(message).__name__}", "bad_type")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})", "unknown_role")
    content = _text_content(message.get("content"), where)
    canonical: dict[str, Any] = {"role": role}
    if role == "assistant":
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise DataError(f"{where}: tool_calls must be a list", "bad_type")
        reasoning, content = _reasoning(message, content, where)
        if content is None and not calls and reasoning is None:
            raise DataError(f"{where}: assistant message has neither content nor tool_calls", "empty_message")
        # Null content becomes "": templates test it with `if content` and many crash on None.
        canonical["content"] = content or ""
        if reasoning is not None:
            canonical["reasoning_content"] = reasoning
        if calls:
            canonical["tool_calls"] = [_tool_call(c, f"{where} tool_calls[{i}]") for i, c in enumerate(calls)]
        return canonical, _train_flag(message, where)
    if content is None:
        raise DataError(f"{where}: {role} message has no content", "empty_message")
    canonical["content"] = content
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                canonical[key] = message[key]
    return canonical, False


def _input_messages(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise DataError(f"'input' must be a string, got {type(value).__name__}", "bad_type")
    stripped = value.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as e:
            if stripped.startswith(("[{", '{"')) or stripped[1:].lstrip().startswith("{"):
                raise DataError(
                    f"'input' looks like a JSON message array but does not parse ({e.msg} at char {e.pos})",
                    "bad_input_json",
                ) from None
            return [{"role": "user", "content": value}]  # plain text that happens to start with a bracket
        if not isinstance(decoded, list) or not all(isinstance(m, dict) for m in decoded):
            raise DataError("'input' is JSON but not an array of message objects", "bad_input_json")
        return decoded
    return [{"role": "user", "content": value}]


def row_format(row: dict[str, Any], data_format: str = "auto") -> str:
    """The shape a row is written in (rows, messages, sharegpt): --data_format, or under auto its keys."""
    if data_format != "auto":
        return data_format
    if "input" in row or "output" in row:
        return "rows"
    if "messages" in row or ("prompt" in row and "completion" in row):
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    keys = ", ".join(repr(k) for k in list(row)[:5]) or "none"
    raise DataError(
        f"a row needs 'input' and 'output', 'messages' (OpenAI / TRL), or 'conversations' (ShareGPT); it has {keys}",
        "missing_field",
    )


def _split_at_first_answer(messages: list[Any], tools: Any) -> dict[str, Any]:
    """A conversation as a row: the messages before the first assistant message are its prompt."""
    first = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if first is None:
        raise DataError("the conversation has no assistant message, so nothing would be trained", "no_assistant")
    return {"input": messages[:first], "output": messages[first:], "tools": tools}


def _from_messages(row: dict[str, Any]) -> dict[str, Any]:
    if "messages" not in row:  # TRL's conversational prompt-completion rows
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return {"input": prompt, "output": completion, "tools": _json_field(row.get("tools"), "'tools'")}
    messages = row["messages"]
    if not isinstance(messages, list):
        raise DataError(f"'messages' must be a list of messages, got {type(messages).__name__}", "bad_type")
    return _split_at_first_answer(messages, _json_field(row.get("tools"), "'tools'"))


def _json_field(value: Any, name: str) -> Any:
    """A field ShareGPT exports write as a JSON string (tools, a function call) or as the value itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} is a string but not valid JSON ({e.msg} at char {e.pos})", "bad_input_json") from None


def _from_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"'conversations' must be a list of turns, got {type(turns).__name__}", "bad_type")
    system = row.get("system")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: a turn must be an object, got {type(turn).__name__}", "bad_type")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise DataError(
                f"{where}: unknown 'from' {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})", "unknown_role"
            )
        message = {"role": role, "content": turn.get("value")}
        message |= {key: turn[key] for key in ("train", "weight") if key in turn}
        if speaker == "function_call":  # {"name", "arguments"} or a list of them: the assistant's tool calls
            calls = _json_field(turn.get("value"), f"{where} (function_call)")
            message |= {"content": None, "tool_calls": calls if isinstance(calls, list) else [calls]}
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and not previous.get("tool_calls"):
                previous["tool_calls"] = message["tool_calls"]  # "gpt" text then its calls: one message
                continue
        messages.append(message)
    return _split_at_first_answer(messages, _json_field(row.get("tools"), "'tools'"))


def as_row(row: Any, data_format: str = "auto") -> dict[str, Any]:
    """Any accepted shape as an ``input`` / ``output`` row (see the module docstring)."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}", "bad_type")
    shape = row_format(row, data_format)
    if shape == "messages":
        return _from_messages(row)
    if shape == "sharegpt":
        return _from_sharegpt(row)
    return row


def _trained_by_preset(messages: list[dict[str, Any]], wanted: list[bool], train_on: str) -> list[bool]:
    """Narrow the trainable assistant messages of ``output`` to a --train_on preset: all of them; the
    last one; or those after the last user message (the final answer and the tool loop that led to it)."""
    if train_on == "all":
        return wanted
    if train_on == "last":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        return [w and i == last for i, w in enumerate(wanted)]
    if train_on == "final":
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        return [w and i > last_user for i, w in enumerate(wanted)]
    raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")


def parse_row(row: Any, train_on: str = "all", data_format: str = "auto") -> Conversation:
    """Validate one row (in any accepted shape) and return it as a canonical conversation. Raises
    DataError saying what is wrong.

    Trained: the assistant messages of ``output`` that do not opt out ("train": false, "weight": 0),
    narrowed by ``train_on`` (all / last / final). A valid row left with nothing to train raises
    DataError with reason ``nothing_to_train`` (counted, not bad input)."""
    row = as_row(row, data_format)
    missing = [key for key in ("input", "output") if key not in row]
    if missing:
        raise DataError(f"missing field(s): {', '.join(missing)}", "missing_field")

    prompt = []
    for i, m in enumerate(_input_messages(row["input"])):
        message, _ = _message(m, f"input[{i}]")
        if isinstance(m, dict) and (m.get("train") is True or m.get("weight") == 1):
            raise DataError(
                f"input[{i}]: 'input' is the prompt and is never trained; move the message to 'output' to train it",
                "bad_type",
            )
        prompt.append(message)
    if not prompt:
        raise DataError("'input' holds no messages", "empty_input")

    output = row["output"]
    if isinstance(output, str):
        output = [{"role": "assistant", "content": output}]
    if not isinstance(output, list):
        raise DataError(f"'output' must be a list of messages or a string, got {type(output).__name__}", "bad_type")
    completion = [_message(m, f"output[{i}]") for i, m in enumerate(output)]
    if not any(m["role"] == "assistant" for m, _ in completion):
        raise DataError("'output' has no assistant message, so nothing would be trained", "no_assistant")

    tools = _json_field(row.get("tools"), "'tools'")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError("'tools' must be a list of function schemas (objects)", "bad_type")
        tools = tools or None

    messages = prompt + [m for m, _ in completion]
    _check_unicode(messages, tools)
    wanted = [False] * len(prompt) + [wants for _, wants in completion]
    trained = _trained_by_preset(messages, wanted, train_on)
    if not any(trained):
        why = (
            "every assistant message in 'output' has \"train\": false"
            if not any(wanted)
            else f"--train_on {train_on} selects no trainable assistant message"
            + (
                " (none follows the last user message; --train_on last trains the last one)"
                if train_on == "final"
                else ""
            )
        )
        raise DataError(f"nothing to train: {why}", "nothing_to_train")
    return Conversation(messages=messages, trained=trained, tools=tools)


def _check_unicode(messages: list[dict], tools: list[dict] | None) -> None:
    """JSON's \\u escapes can write half of a surrogate pair, which no tokenizer can encode: refuse the
    row here, naming the text, rather than fail inside an encoder."""
    try:
        json.dumps([messages, tools], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        around = e.object[max(0, e.start - 30) : e.end + 30]
        raise DataError(
            f"not valid Unicode: a lone surrogate {e.object[e.start : e.end]!r} (a \\u escape of half a pair) in "
            f"...{around!r}...",
            "invalid_text",
        ) from None


# A line longer than this is rejected (line_too_long) as it is read, not held: one unterminated line
# (a truncated upload, a binary file) must not fill a reader's memory. Agent runs with long tool
# outputs take a few MB.
MAX_LINE_BYTES = 256 << 20
LINE_TOO_LONG = b"\x00sftcore: line too long"  # what sftcore.sources reads in place of such a line


def parse_line(line: bytes | str) -> dict[str, Any]:
    """Decode one JSONL line into a row object (not yet validated as a conversation)."""
    if line == LINE_TOO_LONG:
        raise DataError(f"line longer than {MAX_LINE_BYTES >> 20} MiB (a missing newline?)", "line_too_long")
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"invalid UTF-8 at byte {e.start}", "invalid_utf8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at char {e.pos})", "invalid_json") from None
    except RecursionError:
        raise DataError("JSON nested too deeply", "invalid_json") from None
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}", "bad_type")
    return row
