"""encode_row: exact input_ids and loss masks, checked against expectations computed independently."""

from __future__ import annotations

import json

import pytest
from conftest import real_rows

from sftcore import IGNORE_INDEX, DataError, encode_row, parse_row
from sftcore.masking import adapt_to_template, template_support

REAL_ROWS = real_rows()


def trained_mask(encoded: dict) -> list[int]:
    return [int(label != IGNORE_INDEX) for label in encoded["labels"]]


def trained_texts(encoded: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def generation_tag_expectation(row: dict, tokenizer, tagged_template: str) -> tuple[list[int], list[int]]:
    """ids and mask from transformers' own {% generation %} machinery on a hand-tagged twin template."""
    conv = adapt_to_template(parse_row(row), template_support(tokenizer))
    out = tokenizer.apply_chat_template(
        conv.messages,
        tools=conv.tools,
        chat_template=tagged_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def chatml_scan_expectation(input_ids: list[int], tokenizer) -> list[int]:
    """Mask by scanning ids: after '<|im_start|>assistant\\n', up to and including the next '<|im_end|>'."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    mask, i = [0] * len(input_ids), 0
    while i < len(input_ids):
        if input_ids[i] == start:
            j, header = i + 1, ""
            while j < len(input_ids) and len(header) < len("assistant\n") and input_ids[j] != end:
                header += tokenizer.decode([input_ids[j]])
                j += 1
            if header == "assistant\n":
                while j < len(input_ids):
                    mask[j] = 1
                    if input_ids[j] == end:
                        break
                    j += 1
            i = j
        i += 1
    return mask


@pytest.mark.parametrize("source,line,row", REAL_ROWS, ids=[f"{s}:{n}" for s, n, _ in REAL_ROWS])
def test_real_rows_match_generation_tagged_template(family, source, line, row):
    name, tokenizer, tagged = family
    encoded = encode_row(row, tokenizer)
    expected_ids, expected_mask = generation_tag_expectation(row, tokenizer, tagged)
    assert encoded["input_ids"] == expected_ids
    assert trained_mask(encoded) == expected_mask
    # input_ids are what the template itself tokenizes to (inference-time tokens)
    conv = adapt_to_template(parse_row(row), template_support(tokenizer))
    assert encoded["input_ids"] == list(
        tokenizer.apply_chat_template(conv.messages, tools=conv.tools, tokenize=True, return_dict=True)["input_ids"]
    )


@pytest.mark.parametrize("source,line,row", REAL_ROWS[::7], ids=[f"{s}:{n}" for s, n, _ in REAL_ROWS[::7]])
def test_real_rows_match_chatml_token_scan(smollm2_tokenizer, qwen_tokenizer, source, line, row):
    for tokenizer in (smollm2_tokenizer, qwen_tokenizer):
        encoded = encode_row(row, tokenizer)
        assert trained_mask(encoded) == chatml_scan_expectation(encoded["input_ids"], tokenizer)


def test_every_trained_turn_ends_with_the_end_of_turn_token(family):
    name, tokenizer, _ = family
    eot = "<|eot_id|>" if name == "llama3_headers" else "<|im_end|>"
    for _, _, row in REAL_ROWS[:40]:
        runs = trained_texts(encode_row(row, tokenizer), tokenizer)
        assert runs and all(run.endswith(eot) for run in runs)
        assert not any(eot + "\n" in run for run in runs)  # whitespace after end-of-turn is not trained


def test_role_headers_system_user_and_tool_text_are_never_trained(smollm2_tokenizer):
    row = json.loads(json.dumps(REAL_ROWS[0][2]))
    encoded = encode_row(row, smollm2_tokenizer)
    trained = "".join(trained_texts(encoded, smollm2_tokenizer))
    assert "<|im_start|>" not in trained and "assistant\n" not in trained
    assert "Airline Agent Policy" not in trained  # system prompt
    for message in row["output"]:
        if message["role"] in ("user", "tool") and len(message["content"]) > 20:
            assert message["content"][:40] not in trained


EDGE_CASES = {
    "empty_assistant_content": {"input": "Say nothing.", "output": [{"role": "assistant", "content": ""}]},
    "only_tool_calls": {
        "input": "Weather in Paris?",
        "output": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C, sunny"},
            {"role": "assistant", "content": "It is 18C and sunny in Paris."},
        ],
    },
    "consecutive_assistants": {
        "input": "Count to two.",
        "output": [{"role": "assistant", "content": "One."}, {"role": "assistant", "content": "Two."}],
    },
    "ends_on_user_turn": {
        "input": "Hi",
        "output": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Observation: done"}],
    },
    "ends_on_tool_turn": {
        "input": "Look it up",
        "output": [
            {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]},
            {"role": "tool", "content": "result x"},
        ],
    },
    "non_ascii": {
        "input": json.dumps(
            [{"role": "system", "content": "Réponds en français 🙂"}, {"role": "user", "content": "東京はどこ？"}]
        ),
        "output": "東京は日本の首都です。Ça va? 🚀✓",
    },
    "consecutive_tool_messages": {
        "input": "Two lookups",
        "output": [
            {
                "role": "assistant",
                "content": "Looking both up.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "a", "arguments": {}}},
                    {"type": "function", "function": {"name": "b", "arguments": {"k": [1, 2]}}},
                ],
            },
            {"role": "tool", "content": "A"},
            {"role": "tool", "content": "B"},
            {"role": "assistant", "content": "Done: A and B."},
        ],
        "tools": [{"type": "function", "function": {"name": "a", "description": "first", "parameters": {}}}],
    },
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_match_the_independent_expectation(family, case):
    name, tokenizer, tagged = family
    row = EDGE_CASES[case]
    encoded = encode_row(row, tokenizer)
    expected_ids, expected_mask = generation_tag_expectation(row, tokenizer, tagged)
    assert encoded["input_ids"] == expected_ids
    assert trained_mask(encoded) == expected_mask
    assert sum(expected_mask) > 0


def test_tool_calls_are_trained_never_rendered_as_none(family):
    name, tokenizer, _ = family
    encoded = encode_row(EDGE_CASES["only_tool_calls"], tokenizer)
    first_turn = trained_texts(encoded, tokenizer)[0]
    assert "get_weather" in first_turn and "Paris" in first_turn and "None" not in first_turn
    assert "<tool_call>" in first_turn  # native (Qwen) or our documented fallback format
    assert "18C, sunny" not in "".join(trained_texts(encoded, tokenizer))  # the tool result is masked


def test_tools_list_reaches_the_prompt_under_every_template(family):
    name, tokenizer, _ = family
    encoded = encode_row(EDGE_CASES["consecutive_tool_messages"], tokenizer)
    text = tokenizer.decode(encoded["input_ids"])
    assert '"description": "first"' in text
    assert "first" not in "".join(trained_texts(encoded, tokenizer))


def test_assistant_messages_in_input_are_prompt_not_trained(smollm2_tokenizer):
    history = [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "Now?"},
    ]
    encoded = encode_row({"input": json.dumps(history), "output": "Now answer."}, smollm2_tokenizer)
    assert trained_texts(encoded, smollm2_tokenizer) == ["Now answer.<|im_end|>"]


def test_template_that_rewrites_history_refuses_the_row(think_tokenizer):
    row = {
        "input": "Q1",
        "output": [
            {"role": "assistant", "content": "<think>plan one</think>\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>plan two</think>\nA2"},
        ],
    }
    with pytest.raises(DataError, match="rewrites history") as info:
        encode_row(row, think_tokenizer)
    assert info.value.reason == "template_rewrites_history"
    # When only the last turn reasons, no history is rewritten and the mask is exact.
    row["output"][0]["content"] = "A1"
    runs = trained_texts(encode_row(row, think_tokenizer), think_tokenizer)
    assert runs == ["A1<|im_end|>", "<think>plan two</think>\nA2<|im_end|>"]


def test_truncation_keeps_whole_assistant_turns_and_the_beginning(smollm2_tokenizer):
    row = REAL_ROWS[0][2]
    full = encode_row(row, smollm2_tokenizer)
    budget = len(full["input_ids"]) // 2
    cut = encode_row(row, smollm2_tokenizer, max_seq_length=budget)
    assert cut["truncated"] and cut["dropped_turns"] > 0
    assert cut["trained_turns"] + cut["dropped_turns"] == full["trained_turns"]
    assert len(cut["input_ids"]) <= budget
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])]
    assert cut["labels"] == full["labels"][: len(cut["labels"])]
    assert smollm2_tokenizer.decode(cut["input_ids"][-1:]) == "<|im_end|>" and cut["labels"][-1] != IGNORE_INDEX


def test_rows_that_fit_are_not_truncated(smollm2_tokenizer):
    encoded = encode_row(EDGE_CASES["consecutive_assistants"], smollm2_tokenizer, max_seq_length=4096)
    assert not encoded["truncated"] and encoded["dropped_turns"] == 0 and encoded["trained_turns"] == 2


def test_a_row_whose_only_assistant_turn_is_cut_is_refused_as_too_long(smollm2_tokenizer):
    row = {"input": "Summarise.", "output": "word " * 500}
    with pytest.raises(DataError, match="max_seq_length=64") as info:
        encode_row(row, smollm2_tokenizer, max_seq_length=64)
    assert info.value.reason == "too_long"


def test_tokenizer_without_chat_template_is_a_clear_error(smollm2_tokenizer):
    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_row(EDGE_CASES["non_ascii"], tokenizer)
