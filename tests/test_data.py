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
    ("tools not a list", {"input": "x", "output": "y", "tools": 3}, "bad_type", "'tools' must be a list"),
    ("tools not JSON", {"input": "x", "output": "y", "tools": "f"}, "bad_input_json", "'tools' is a string but not"),
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
    with pytest.raises(DataError, match="with no .jsonl, .jsonl.gz, .jsonl.zst, .jsonl.bz2, .parquet, .arrow"):
        list(read_jsonl(tmp_path))


# --- the shapes public agent data comes in: OpenAI / TRL messages, ShareGPT ---


def _rows_without_ids(row: dict) -> dict:
    """A row as ShareGPT can say it: no tool-call or tool-message ids (its turns carry none)."""
    inputs = row["input"]
    if isinstance(inputs, str):
        inputs = json.loads(inputs) if inputs.startswith("[") else [{"role": "user", "content": inputs}]
    output = []
    for m in row["output"]:
        m = {k: v for k, v in m.items() if k not in ("tool_call_id", "name")}
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": c["function"]} for c in m["tool_calls"]]
        output.append(m)
    return {"input": inputs, "output": output, **({"tools": row["tools"]} if "tools" in row else {})}


def _as_messages(row: dict) -> dict:
    return {"messages": row["input"] + row["output"], **({"tools": row["tools"]} if "tools" in row else {})}


def _as_sharegpt(row: dict) -> dict:
    """Written the way LLaMA-Factory's ShareGPT loader reads tool-using runs: the system prompt apart,
    calls as function_call turns ({"name", "arguments"}), results as observations, tools as a JSON string."""
    speaker = {"user": "human", "assistant": "gpt", "tool": "observation"}
    turns = []
    for m in row["input"][1:] + row["output"]:
        if m["role"] != "assistant" or m.get("content"):
            turns.append({"from": speaker[m["role"]], "value": m["content"]})
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            turns.append({"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls)})
    out = {"system": row["input"][0]["content"], "conversations": turns}
    return out | ({"tools": json.dumps(row["tools"])} if "tools" in row else {})


def test_the_same_trajectories_as_rows_messages_and_sharegpt_train_the_same_tokens(qwen_tokenizer):
    from conftest import DATA

    from sftcore.masking import EncodeOptions, encode_row

    tau = [json.loads(line) for line in (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()][:6]
    fire = [json.loads(line) for line in (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()][:3]
    tools = [{"type": "function", "function": {"name": "get_user_details", "parameters": {"type": "object"}}}]
    rows = [_rows_without_ids(r) for r in tau + fire]
    rows[0]["tools"] = tools
    for row in rows:
        if not isinstance(row["input"], list) or row["input"][0]["role"] != "system":
            row["input"] = [{"role": "system", "content": "You answer questions."}, *row["input"]]
    assert sum(bool(m.get("tool_calls")) for r in rows for m in r["output"]) > 10  # tool calls among them
    for row in rows:
        expected = encode_row(row, qwen_tokenizer, EncodeOptions(max_seq_length=8192)).samples
        for shape, other in (("messages", _as_messages(row)), ("sharegpt", _as_sharegpt(row))):
            for data_format in ("auto", shape):
                got = encode_row(other, qwen_tokenizer, EncodeOptions(max_seq_length=8192, data_format=data_format))
                assert [(s.input_ids, s.labels) for s in got.samples] == [(s.input_ids, s.labels) for s in expected]
    # TRL's prompt-completion rows, and messages with a turn that opts out
    prompt_completion = {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    assert parse_row(prompt_completion).trained == [False, True]
    opted = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}
    opted["messages"] += [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert parse_row(opted).trained == [False, False, False, True]


BAD_SHAPES = [
    ({"messages": "hi"}, "bad_type", "'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant", "the conversation has no assistant message"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown_role", "conversations[0]: unknown 'from' 'bot'"),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{oops"}]},
        "bad_input_json",
        "conversations[1] (function_call) is a string but not valid JSON",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{"},
        "bad_input_json",
        "'tools' is a string but not valid JSON",
    ),
    ({"text": "hello"}, "missing_field", "a row needs 'input' and 'output', 'messages' (OpenAI / TRL), or"),
]


def test_broken_rows_in_each_shape_are_reported_with_their_line_and_reason(tmp_path, qwen_tokenizer):
    from sftcore.dataset import build_sequences
    from sftcore.masking import EncodeOptions

    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, *(row for row, _, _ in BAD_SHAPES)]))
    qwen_tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=len(qwen_tokenizer)).save_pretrained(tmp_path / "tok")
    _, _, summary = build_sequences(str(path), str(tmp_path / "tok"), EncodeOptions(max_seq_length=512), 0, 0)
    assert summary.rows == 1
    got = {entry["line"]: (entry["reason"], entry["message"]) for entry in summary.rejected}
    for line, (_, reason, message) in enumerate(BAD_SHAPES, start=2):
        assert got[line][0] == reason and message in got[line][1], (line, got[line])
