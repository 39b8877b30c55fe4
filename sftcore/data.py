"""Parse and validate trajectory rows.

A row is a JSON object ``{"input": ..., "output": ...}``:

- ``input``: plain text (one user message), or a JSON string holding an array of chat messages
  (an already-decoded list is accepted too). Everything in ``input`` is prompt: it is never trained,
  assistant messages included (they are context the user chose to put on the prompt side).
- ``output``: a list of messages, or a string (one assistant message). Its assistant messages are
  what the model is trained to produce; its user/tool messages are observations (masked).
- ``tools`` (optional): a list of function schemas, passed to templates that render tools.

Messages use the OpenAI chat shape: roles ``system``, ``user``, ``assistant``, ``tool``; assistant
``tool_calls`` (``content`` may be null, ``arguments`` a JSON string or an object); ``tool`` messages
with ``tool_call_id`` / ``name``. Messages are normalised here into one canonical shape so the
rendering code never has to guess.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A row that cannot be trained on. ``reason`` is a short code used to count rejects by cause."""

    def __init__(self, message: str, reason: str = "invalid_row"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """A validated row: canonical messages, which of them are trained, and the row's tool schemas."""

    messages: list[dict[str, Any]]
    trained: list[bool]  # trained[i]: messages[i] is an assistant message from ``output``
    tools: list[dict[str, Any]] | None = None


@dataclass
class LineResult:
    """One line of a JSONL file: its 1-based number and either the parsed row or the error."""

    line: int
    row: dict[str, Any] | None = None
    error: DataError | None = None


@dataclass
class LineCounts:
    """Where the lines of a data file went: blank, rejected (with line number, reason and message), or a
    row. Shared by the training pipeline and the inspection report, so both count the same way."""

    path: str
    lines: int = 0
    blank_lines: int = 0
    truncated_rows: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"line", "reason", "message"[, "text"]}

    def reject(self, line: int, error: DataError, text: str | None = None) -> None:
        entry = {"line": line, "reason": error.reason, "message": str(error)}
        self.rejected.append(entry if text is None else {**entry, "text": text})

    def rejected_by_reason(self) -> Counter:
        return Counter(r["reason"] for r in self.rejected)

    def format_rejects(self, limit: int = 20) -> str:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.rejected_by_reason().items()))
        lines = [f"{len(self.rejected)} bad row(s) in {self.path} ({counts})"]
        lines += [f"  {self.path}:{r['line']}: {r['message']} [{r['reason']}]" for r in self.rejected[:limit]]
        if len(self.rejected) > limit:
            lines.append(f"  ... and {len(self.rejected) - limit} more")
        return "\n".join(lines)


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


def _message(message: Any, where: str) -> dict[str, Any]:
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
        if content is None and not calls:
            raise DataError(f"{where}: assistant message has neither content nor tool_calls", "empty_message")
        # Null content becomes "": templates test it with `if content` and many crash on None.
        canonical["content"] = content or ""
        if calls:
            canonical["tool_calls"] = [_tool_call(c, f"{where} tool_calls[{i}]") for i, c in enumerate(calls)]
    else:
        if content is None:
            raise DataError(f"{where}: {role} message has no content", "empty_message")
        canonical["content"] = content
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(message.get(key), str):
                    canonical[key] = message[key]
    return canonical


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


def parse_row(row: Any) -> Conversation:
    """Validate one row and return it as a canonical conversation. Raises DataError saying what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"row must be a JSON object, got {type(row).__name__}", "bad_type")
    missing = [key for key in ("input", "output") if key not in row]
    if missing:
        raise DataError(f"missing field(s): {', '.join(missing)}", "missing_field")

    prompt = [_message(m, f"input[{i}]") for i, m in enumerate(_input_messages(row["input"]))]
    if not prompt:
        raise DataError("'input' holds no messages", "empty_input")

    output = row["output"]
    if isinstance(output, str):
        output = [{"role": "assistant", "content": output}]
    if not isinstance(output, list):
        raise DataError(f"'output' must be a list of messages or a string, got {type(output).__name__}", "bad_type")
    completion = [_message(m, f"output[{i}]") for i, m in enumerate(output)]
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError("'output' has no assistant message, so nothing would be trained", "no_assistant")

    tools = row.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError("'tools' must be a list of function schemas (objects)", "bad_type")
        tools = tools or None

    messages = prompt + completion
    trained = [False] * len(prompt) + [m["role"] == "assistant" for m in completion]
    return Conversation(messages=messages, trained=trained, tools=tools)


def parse_line(line: bytes | str) -> dict[str, Any]:
    """Decode one JSONL line into a row object (not yet validated as a conversation)."""
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


def check_readable_file(path: str | Path) -> Path:
    """The path as a readable regular file, or a DataError that says why not."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file", "missing_file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file", "not_a_file")
    try:
        with path.open("rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})", "unreadable_file") from None
    if empty:
        raise DataError(f"{path}: no rows (the file is empty)", "empty_file")
    return path


def read_jsonl(path: str | Path) -> Iterator[LineResult]:
    """Every non-blank line of a JSONL file, decoded; errors are yielded (with line numbers), not raised."""
    path = check_readable_file(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                yield LineResult(line=number)
                continue
            try:
                yield LineResult(line=number, row=parse_line(raw))
            except DataError as e:
                yield LineResult(line=number, error=e)
