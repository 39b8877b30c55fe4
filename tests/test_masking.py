"""encode_row: exact input_ids and loss masks, checked against expectations computed independently."""

from __future__ import annotations

import json

import pytest
from conftest import real_rows, trained_texts
from contract import check_token_contract, tagged_target

from sftcore import IGNORE_INDEX, DataError, encode_row, parse_row
from sftcore.masking import FULL_HISTORY, WINDOW, EncodeOptions, Sample

REAL_ROWS = real_rows()


def only_sample(row: dict, tokenizer, **options) -> Sample:
    encoded = encode_row(row, tokenizer, EncodeOptions(**options))
    assert len(encoded.samples) == 1, "the template keeps history verbatim: the row is one sample"
    return encoded.samples[0]


def trained_mask(sample: Sample) -> list[int]:
    return [int(label != IGNORE_INDEX) for label in sample.labels]


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


@pytest.mark.parametrize("source,line,row", REAL_ROWS[::4], ids=[f"{s}:{n}" for s, n, _ in REAL_ROWS[::4]])
def test_real_rows_meet_the_token_contract_of_the_generation_tagged_template(family, source, line, row):
    """Each turn's prompt is its own inference prompt's tokens and its trained tokens are the tagged
    twin's {% generation %} block tokenized on its own (tests/contract.py)."""
    name, tokenizer, tagged = family
    check_token_contract(tokenizer, row, tagged_target(tagged))


def test_a_template_that_keeps_history_verbatim_trains_a_row_as_one_sample_where_its_tokens_allow(family):
    """ChatML on SmolLM2's vocabulary: the prompt ends "assistant", "Ċ" and the turn's tokens follow as in the
    one-string render, so a row is one sample. The Llama-3 header ends "\n\n", one token at the end of a
    prompt but two before text under SmolLM2's pre-tokenizer: every turn's prompt differs from the one-string
    render there, so each turn is a sample of its own (the real Llama-3 vocabulary keeps "ĊĊ": one sample)."""
    name, tokenizer, _ = family
    samples = [len(encode_row(row, tokenizer).samples) for _, _, row in REAL_ROWS[:60]]
    if name == "llama3_headers":
        assert samples == [sum(parse_row(row).trained) for _, _, row in REAL_ROWS[:60]]
    else:
        assert set(samples) == {1}


@pytest.mark.parametrize("source,line,row", REAL_ROWS[::7], ids=[f"{s}:{n}" for s, n, _ in REAL_ROWS[::7]])
def test_real_rows_match_chatml_token_scan(smollm2_tokenizer, qwen_tokenizer, source, line, row):
    for tokenizer in (smollm2_tokenizer, qwen_tokenizer):
        sample = only_sample(row, tokenizer)
        assert trained_mask(sample) == chatml_scan_expectation(sample.input_ids, tokenizer)


def test_every_trained_turn_ends_with_the_end_of_turn_token(family):
    name, tokenizer, _ = family
    eot = "<|eot_id|>" if name == "llama3_headers" else "<|im_end|>"
    for _, _, row in REAL_ROWS[:40]:
        runs = [run for sample in encode_row(row, tokenizer).samples for run in trained_texts(sample, tokenizer)]
        assert runs and all(run.endswith(eot) for run in runs)
        assert not any(eot + "\n" in run for run in runs)  # whitespace after end-of-turn is not trained


def test_role_headers_system_user_and_tool_text_are_never_trained(smollm2_tokenizer):
    row = json.loads(json.dumps(REAL_ROWS[0][2]))
    trained = "".join(trained_texts(only_sample(row, smollm2_tokenizer), smollm2_tokenizer))
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
def test_edge_cases_meet_the_token_contract(family, case):
    name, tokenizer, tagged = family
    turns = check_token_contract(tokenizer, EDGE_CASES[case], tagged_target(tagged))
    assert turns


def all_trained_texts(row: dict, tokenizer) -> list[str]:
    return [run for sample in encode_row(row, tokenizer).samples for run in trained_texts(sample, tokenizer)]


def test_tool_calls_are_trained_never_rendered_as_none(family):
    name, tokenizer, _ = family
    runs = all_trained_texts(EDGE_CASES["only_tool_calls"], tokenizer)
    assert "get_weather" in runs[0] and "Paris" in runs[0] and "None" not in runs[0]
    assert "<tool_call>" in runs[0]  # native (Qwen) or our documented fallback format
    assert "18C, sunny" not in "".join(runs)  # the tool result is masked


def test_tools_list_reaches_the_prompt_under_every_template(family):
    name, tokenizer, _ = family
    encoded = encode_row(EDGE_CASES["consecutive_tool_messages"], tokenizer)
    assert all('"description": "first"' in tokenizer.decode(sample.input_ids) for sample in encoded.samples)
    assert "first" not in "".join(all_trained_texts(EDGE_CASES["consecutive_tool_messages"], tokenizer))


def test_assistant_messages_in_input_are_prompt_not_trained(smollm2_tokenizer):
    history = [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "Now?"},
    ]
    sample = only_sample({"input": json.dumps(history), "output": "Now answer."}, smollm2_tokenizer)
    assert trained_texts(sample, smollm2_tokenizer) == ["Now answer.<|im_end|>"]


def test_messages_marked_train_false_are_context_and_presets_narrow_the_rest(smollm2_tokenizer):
    row = {
        "input": "Q",
        "output": [
            {"role": "assistant", "content": "A wrong call", "train": False},
            {"role": "user", "content": "Observation: error"},
            {"role": "assistant", "content": "A fix"},
            {"role": "user", "content": "Thanks. Done?"},
            {"role": "assistant", "content": "Done.", "weight": 1},
        ],
    }
    expectations = {
        "all": ["A fix<|im_end|>", "Done.<|im_end|>"],
        "last": ["Done.<|im_end|>"],
        "final": ["Done.<|im_end|>"],
    }
    for train_on, expected in expectations.items():
        sample = only_sample(row, smollm2_tokenizer, train_on=train_on)
        assert trained_texts(sample, smollm2_tokenizer) == expected
        assert "A wrong call" in smollm2_tokenizer.decode(sample.input_ids)  # still context
    row["output"][-1]["weight"] = 0
    with pytest.raises(DataError, match="--train_on last selects no trainable") as info:
        encode_row(row, smollm2_tokenizer, EncodeOptions(train_on="last"))
    assert info.value.reason == "nothing_to_train"


THINKING_ROW = {
    "input": "Q1",
    "output": [
        {"role": "assistant", "content": "<think>plan one</think>\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "plan two"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3", "reasoning_content": "plan three"},
    ],
}


def test_a_template_that_rewrites_history_trains_each_turn_in_its_own_context(think_tokenizer):
    """think_strip drops <think> from every assistant message but the last one it renders. When the model
    writes A2, the last message it sees is A1, with its reasoning: A1 and A2 train in one sample. When it
    writes A3, A1's reasoning is gone and A2's is shown: A3 trains in a sample of its own."""
    encoded = encode_row(THINKING_ROW, think_tokenizer)
    assert [s.turns for s in encoded.samples] == [[0, 1], [2]]
    first, second = (think_tokenizer.decode(s.input_ids) for s in encoded.samples)
    assert trained_texts(encoded.samples[0], think_tokenizer) == [
        "<think>\nplan one\n</think>\n\nA1<|im_end|>",
        "<think>\nplan two\n</think>\n\nA2<|im_end|>",
    ]
    assert "plan one" not in second and "<|im_start|>assistant\nA1<|im_end|>" in second  # history as rendered
    assert second.endswith(
        "<|im_start|>assistant\n<think>\nplan two\n</think>\n\nA2<|im_end|>\n<|im_start|>user\nQ3<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nplan three\n</think>\n\nA3<|im_end|>"
    )
    assert trained_texts(encoded.samples[1], think_tokenizer) == ["<think>\nplan three\n</think>\n\nA3<|im_end|>"]
    assert [len(s.reasoning) for s in encoded.samples] == [2, 1] and encoded.row_tokens < encoded.num_tokens

    with pytest.raises(DataError, match="rewrites history") as info:
        encode_row(THINKING_ROW, think_tokenizer, EncodeOptions(history_rewrites="refuse"))
    assert info.value.reason == "template_rewrites_history"
    # When only the last turn reasons, no history is rewritten: one sample.
    plain = json.loads(json.dumps(THINKING_ROW))
    plain["output"][2].pop("reasoning_content")
    plain["output"][0]["content"] = "A1"
    assert trained_texts(only_sample(plain, think_tokenizer, history_rewrites="refuse"), think_tokenizer) == [
        "A1<|im_end|>",
        "A2<|im_end|>",
        "<think>\nplan three\n</think>\n\nA3<|im_end|>",
    ]


def test_truncate_keeps_the_beginning_and_whole_turns_and_counts_the_rest(smollm2_tokenizer):
    row = REAL_ROWS[0][2]
    full = only_sample(row, smollm2_tokenizer)
    whole = encode_row(row, smollm2_tokenizer)
    budget = len(full.input_ids) // 2
    cut = encode_row(row, smollm2_tokenizer, EncodeOptions(max_seq_length=budget, overflow="truncate"))
    assert len(cut.samples) == 1 and cut.dropped_turns > 0 and cut.windowed_turns == 0
    assert cut.trained_turns + cut.dropped_turns == whole.trained_turns
    left_out = [r for r, _ in cut.omissions if r != "template_no_native_tool_calls"]  # ChatML renders no calls
    assert left_out == ["turn_too_long"] * cut.dropped_turns
    sample = cut.samples[0]
    assert len(sample.input_ids) <= budget
    assert sample.input_ids == full.input_ids[: len(sample.input_ids)]
    assert sample.labels == full.labels[: len(sample.labels)]
    assert smollm2_tokenizer.decode(sample.input_ids[-1:]) == "<|im_end|>" and sample.labels[-1] != IGNORE_INDEX


def test_window_trains_every_later_turn_with_the_start_and_recent_history(smollm2_tokenizer):
    row = REAL_ROWS[0][2]  # tau-bench: a 1,300-token system prompt, 15 assistant turns
    whole = encode_row(row, smollm2_tokenizer)
    budget = 2048
    windowed = encode_row(row, smollm2_tokenizer, EncodeOptions(max_seq_length=budget))
    truncated = encode_row(row, smollm2_tokenizer, EncodeOptions(max_seq_length=budget, overflow="truncate"))
    assert windowed.samples[0] == truncated.samples[0]  # what fits with full history is trained alike
    assert windowed.dropped_turns == 0 and windowed.trained_turns == whole.trained_turns
    assert windowed.windowed_turns == truncated.dropped_turns > 0
    assert sorted(t for s in windowed.samples for t in s.turns) == list(range(whole.trained_turns))
    system = json.loads(row["input"])[0]["content"][:60]
    first_user = json.loads(row["input"])[1]["content"]
    for sample in windowed.samples[1:]:
        text = smollm2_tokenizer.decode(sample.input_ids)
        assert sample.history == WINDOW and len(sample.input_ids) <= budget
        assert text.startswith("<|im_start|>system\n" + system) and first_user in text
    # The last turn is trained exactly as in the full render, only with less history before it.
    last = trained_texts(windowed.samples[-1], smollm2_tokenizer)[-1]
    assert last == trained_texts(whole.samples[0], smollm2_tokenizer)[-1]
    assert {r for r, _ in windowed.omissions} == {"history_shortened", "template_no_native_tool_calls"}
    assert all(s.history == FULL_HISTORY for s in truncated.samples)


def test_window_slack_lets_the_turns_after_a_shortened_history_share_it(smollm2_tokenizer):
    """With slack a shortened history resumes later than it could, so the next turns fit over the same
    start: under ChatML (history kept verbatim) they train as one sample. Each turn's text is the same."""
    row = REAL_ROWS[0][2]
    tight, slack = (
        encode_row(row, smollm2_tokenizer, EncodeOptions(max_seq_length=2048, window_slack=share)) for share in (0, 0.5)
    )
    assert tight.windowed_turns == slack.windowed_turns > 0 and tight.trained_turns == slack.trained_turns
    windows = [[s for s in encoded.samples if s.history == WINDOW] for encoded in (tight, slack)]
    assert len(windows[1]) < len(windows[0]) and slack.num_tokens < tight.num_tokens
    assert all(len(s.input_ids) <= 2048 for s in windows[1])
    texts = [[t for s in encoded.samples for t in trained_texts(s, smollm2_tokenizer)] for encoded in (tight, slack)]
    assert texts[0] == texts[1]


def test_a_row_whose_only_assistant_turn_does_not_fit_is_too_long_not_bad(smollm2_tokenizer):
    row = {"input": "Summarise.", "output": "word " * 500}
    for overflow in ("window", "truncate"):
        with pytest.raises(DataError, match="max_seq_length=64") as info:
            encode_row(row, smollm2_tokenizer, EncodeOptions(max_seq_length=64, overflow=overflow))
        assert info.value.reason == "too_long"


def test_tokenizer_without_chat_template_is_a_clear_error(smollm2_tokenizer):
    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_row(EDGE_CASES["non_ascii"], tokenizer)


OPENS_REASONING_BY_DEFAULT = (  # like Cohere2's: the generation prompt opens a reasoning block unless told not to
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if reasoning is not defined or reasoning %}{{ '[R]' }}{%- else %}{{ '[R][/R]' }}{%- endif %}{%- endif %}"
)


def test_a_turn_without_reasoning_is_written_in_the_mode_without_reasoning():
    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = OPENS_REASONING_BY_DEFAULT
    sample = only_sample({"input": "Hi", "output": "Hello!"}, tokenizer)
    assert tokenizer.decode(sample.input_ids).endswith("<|im_start|>assistant\n[R][/R]Hello!<|im_end|>")
    assert trained_texts(sample, tokenizer) == ["Hello!<|im_end|>"]


def test_a_template_that_always_appends_its_generation_prompt_is_refused_not_guessed():
    """Command-R7B's tool-use template ends every conversation with its generation prompt: where a turn
    ends would be a guess, so the template is refused with a message saying why."""
    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{{ '<|im_start|>assistant\\n' }}"
    )
    with pytest.raises(ValueError, match="appends its generation prompt .* to every conversation"):
        encode_row({"input": "Hi", "output": "Hello!"}, tokenizer)
