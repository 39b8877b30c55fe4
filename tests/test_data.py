"""Row parsing and validation: every accepted shape, and a clear message for every bad one."""

from __future__ import annotations

import json

import pytest

from sftcore import DataError, parse_row, read_jsonl
from sftcore.data import parse_line


def test_plain_text_input_and_string_output():
    conv = parse_row({"input": "What is 2+2?", "output": "4"})
    assert conv.messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert conv.trained == [False, True]


def test_json_message_array_input_and_message_list_output():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    output = [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Observation: ok"}]
    conv = parse_row({"input": json.dumps(messages), "output": output})
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user"]
    assert conv.trained == [False, False, True, False]


def test_tool_calls_are_normalised_to_one_shape():
    output = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                {"name": "g", "arguments": {"y": [2]}},
                {"function": {"name": "h", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "name": "f", "content": "done"},
        {"role": "assistant", "content": [{"type": "text", "text": "all "}, {"type": "text", "text": "done"}]},
    ]
    conv = parse_row({"input": "go", "output": output, "tools": [{"type": "function", "function": {"name": "f"}}]})
    calls = conv.messages[1]["tool_calls"]
    assert conv.messages[1]["content"] == ""
    assert calls[0] == {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}, "id": "a"}
    assert calls[1]["function"] == {"name": "g", "arguments": {"y": [2]}}
    assert calls[2]["function"]["arguments"] == {}
    assert conv.messages[2] == {"role": "tool", "content": "done", "tool_call_id": "a", "name": "f"}
    assert conv.messages[3]["content"] == "all done"
    assert conv.tools == [{"type": "function", "function": {"name": "f"}}]


def test_plain_text_that_starts_with_a_bracket_is_still_text():
    conv = parse_row({"input": "[urgent] please help", "output": "ok"})
    assert conv.messages[0]["content"] == "[urgent] please help"


BAD_ROWS = [
    ("not an object", ["input", "output"], "bad_type", "row must be a JSON object"),
    # JSON's "\ud800": half a surrogate pair, which no tokenizer encodes (in the output, or in a JSON-string input)
    ("lone surrogate", {"input": "x", "output": "bad \ud800 text"}, "invalid_text", "lone surrogate '\\ud800'"),
    (
        "lone surrogate in an input string",
        {"input": json.dumps([{"role": "user", "content": "x \ud83d"}]), "output": "y"},
        "invalid_text",
        "not valid Unicode",
    ),
    ("missing input", {"output": "x"}, "missing_field", "missing field(s): input"),
    ("missing output", {"input": "x"}, "missing_field", "missing field(s): output"),
    ("input wrong type", {"input": 3, "output": "x"}, "bad_type", "'input' must be a string"),
    ("output wrong type", {"input": "x", "output": 3}, "bad_type", "'output' must be a list of messages or a string"),
    (
        "unknown role",
        {"input": "x", "output": [{"role": "robot", "content": "y"}]},
        "unknown_role",
        "unknown role 'robot'",
    ),
    (
        "input json not messages",
        {"input": "[1, 2]", "output": "x"},
        "bad_input_json",
        "not an array of message objects",
    ),
    ("input json object", {"input": '{"role": "user"}', "output": "x"}, "bad_input_json", "not an array"),
    (
        "input json broken",
        {"input": '[{"role": "user", "content": "hi"', "output": "x"},
        "bad_input_json",
        "does not parse",
    ),
    ("empty input array", {"input": "[]", "output": "x"}, "empty_input", "'input' holds no messages"),
    (
        "assistant without content or tool calls",
        {"input": "x", "output": [{"role": "assistant"}]},
        "empty_message",
        "output[0]: assistant message has neither content nor tool_calls",
    ),
    (
        "user without content",
        {"input": "x", "output": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
        "empty_message",
        "output[0]: user message has no content",
    ),
    (
        "no assistant in output",
        {"input": "x", "output": [{"role": "user", "content": "y"}]},
        "no_assistant",
        "'output' has no assistant message",
    ),
    (
        "message not an object",
        {"input": "x", "output": ["hello"]},
        "bad_type",
        "output[0]: a message must be an object",
    ),
    (
        "tool call arguments not json",
        {
            "input": "x",
            "output": [{"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": "{oops"}]}],
        },
        "invalid_row",
        "tool call 'f' arguments are not valid JSON",
    ),
    (
        "content wrong type",
        {"input": "x", "output": [{"role": "assistant", "content": 5}]},
        "invalid_row",
        "content must be a string",
    ),
    ("tools not a list", {"input": "x", "output": "y", "tools": "f"}, "bad_type", "'tools' must be a list"),
    (
        "reasoning not a string",
        {"input": "x", "output": [{"role": "assistant", "content": "y", "reasoning_content": ["a"]}]},
        "bad_type",
        "output[0]: 'reasoning_content' must be a string",
    ),
    (
        "reasoning given twice",
        {"input": "x", "output": [{"role": "assistant", "content": "<think>a</think>y", "reasoning": "a"}]},
        "bad_type",
        "reasoning given twice: in 'reasoning' and as <think>...</think> in the content",
    ),
    (
        "two reasoning fields",
        {"input": "x", "output": [{"role": "assistant", "content": "y", "reasoning_content": "a", "thinking": "b"}]},
        "bad_type",
        "give the reasoning once, not in both 'reasoning_content' and 'thinking'",
    ),
    (
        "train not a boolean",
        {"input": "x", "output": [{"role": "assistant", "content": "y", "train": "no"}]},
        "bad_type",
        "output[0]: 'train' must be true or false, got 'no'",
    ),
    (
        "fractional weight",
        {"input": "x", "output": [{"role": "assistant", "content": "y", "weight": 0.5}]},
        "invalid_row",
        "'weight' must be 0 or 1 (per-message weights are not supported), got 0.5",
    ),
    (
        "train flag on the prompt",
        {"input": json.dumps([{"role": "assistant", "content": "a", "train": True}]), "output": "y"},
        "bad_type",
        "input[0]: 'input' is the prompt and is never trained; move the message to 'output' to train it",
    ),
    (
        "every assistant message opted out",
        {"input": "x", "output": [{"role": "assistant", "content": "y", "weight": 0}]},
        "nothing_to_train",
        "nothing to train: every assistant message in 'output' has \"train\": false",
    ),
]


def test_reasoning_in_a_field_or_inline_becomes_reasoning_content():
    output = [
        {"role": "assistant", "content": "<think>\nplan A\n</think>\n\nanswer A"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "answer B", "reasoning": "plan B"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": None, "thinking": "", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "  <think>plan D</think>"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "no <think> at the start</think> stays text"},
    ]
    messages = parse_row({"input": "q", "output": output}).messages
    assert messages[1] == {"role": "assistant", "content": "answer A", "reasoning_content": "plan A"}
    assert messages[3] == {"role": "assistant", "content": "answer B", "reasoning_content": "plan B"}
    assert messages[5]["reasoning_content"] == "" and messages[5]["content"] == ""
    assert messages[7] == {"role": "assistant", "content": "", "reasoning_content": "plan D"}
    assert messages[9] == {"role": "assistant", "content": "no <think> at the start</think> stays text"}


def test_train_flags_and_presets_choose_the_trained_messages():
    output = [
        {"role": "assistant", "content": "a1", "train": False},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a2"},
        {"role": "tool", "content": "t"},
        {"role": "assistant", "content": "a3", "weight": 1},
    ]
    history = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "earlier"}])
    row = {"input": history, "output": output}
    assert parse_row(row).trained == [False, False, False, False, True, False, True]
    assert parse_row(row, "last").trained == [False, False, False, False, False, False, True]
    assert parse_row(row, "final").trained == [False, False, False, False, True, False, True]
    output[3] = {"role": "user", "content": "u2"}
    assert parse_row(row, "final").trained == [False, False, False, False, False, False, True]


@pytest.mark.parametrize("name,row,reason,message", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_rows_get_a_clear_error(name, row, reason, message):
    with pytest.raises(DataError) as info:
        parse_row(row)
    assert message in str(info.value)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_read_jsonl_reports_every_bad_line_with_its_number(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"input": "a", "output": "b"}).encode(),
        b'{"input": "a", "output": ',  # truncated JSON
        b"",  # blank
        b'{"input": "\xff\xfe", "output": "x"}',  # invalid UTF-8
        b"[1, 2]",
        json.dumps({"input": "c", "output": "d"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    results = list(read_jsonl(path))
    assert [r.line for r in results] == [1, 2, 3, 4, 5, 6]
    assert [r.row is not None for r in results] == [True, False, False, False, False, True]
    assert results[1].error.reason == "invalid_json"
    assert results[2].row is None and results[2].error is None  # blank line: counted by callers, not an error
    assert results[3].error.reason == "invalid_utf8"
    assert results[4].error.reason == "bad_type"


def test_deeply_nested_json_is_an_error_not_a_crash():
    with pytest.raises(DataError, match="not valid JSON|nested too deeply"):
        parse_line("[" * 100000 + "]" * 100000)


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="a directory with no .jsonl, .jsonl.gz, .jsonl.zst, .jsonl.bz2 file"):
        list(read_jsonl(tmp_path))
