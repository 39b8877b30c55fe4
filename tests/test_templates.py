"""Verbatim chat templates of 14 models from 11 families (tests/chat_templates/SOURCES.md) on real and synthetic rows.

The independent expectation is a scan of each sample's text for the template's own markers: every
assistant turn is a region from the end of its header (and of any block the generation prompt
pre-fills) through its stop token. Regions map in order onto the row's assistant messages, so the
expected mask of a sample is the regions of the turns it trains. Separately, every trained message is
trained in exactly one sample, and its text is in its region unless an omission says the template
drops it.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import OFFICIAL_FAMILIES, REAL_DATA_FILES, official_tokenizer, real_rows, trained_texts
from contract import check_token_contract, template_target

from sftcore import DataError
from sftcore.data import parse_row
from sftcore.masking import EncodeOptions, encode_row

# family -> what its template cannot render (refused with these reasons; anything else fails)
ALLOWED_REJECTS = {name: set() for name in OFFICIAL_FAMILIES}
# DeepSeek-R1's template renders every tool-call message after the first without its assistant header
ALLOWED_REJECTS["deepseek_r1"] = {"template_error"}

REASONING_ROW = {
    "input": json.dumps(
        [{"role": "system", "content": "You are a travel agent."}, {"role": "user", "content": "Fly me to Paris."}]
    ),
    "output": [
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should search flights to CDG first.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search_flights", "arguments": '{"to": "CDG"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "search", "content": '[{"flight": "AF11"}]'},
        {"role": "assistant", "content": "I found AF11. Shall I book it?", "reasoning_content": "One flight: ask."},
        {"role": "user", "content": "Yes please."},
        {
            "role": "assistant",
            "content": "Booking AF11 now.",
            "tool_calls": [
                {"id": "call_2", "type": "function", "function": {"name": "book", "arguments": {"f": "AF11"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "name": "book", "content": "confirmed"},
        {"role": "assistant", "content": "<think>The booking is confirmed.</think>\nDone: AF11 is booked."},
    ],
}
OPT_OUT_ROW = {
    "input": "What is 17*3?",
    "output": [
        {"role": "assistant", "content": "Thought: multiply.\nAction: calc[17*4]", "train": False},
        {"role": "user", "content": "Observation: 68"},
        {"role": "assistant", "content": "Thought: wrong operand.\nAction: calc[17*3]"},
        {"role": "user", "content": "Observation: 51"},
        {"role": "assistant", "content": "The answer is 51.", "weight": 1},
    ],
}
WITH_TOOLS_ROW = {
    "input": "Weather in Oslo?",
    "output": [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "-3C, snow"},
        {"role": "assistant", "content": "It is -3C and snowing in Oslo."},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ],
}
REAL = real_rows()
# every other tau-bench row (the long ones) and the first 30 FireAct rows
ROWS = [(f"{name}:{n}", row) for name, n, row in REAL if (n % 2 if name == REAL_DATA_FILES[0].name else n <= 30)]
ROWS += [
    ("reasoning", REASONING_ROW),
    ("train_false", OPT_OUT_ROW),
    ("tools", WITH_TOOLS_ROW),
]


@pytest.fixture(scope="module", params=list(OFFICIAL_FAMILIES))
def family(request):
    return request.param, official_tokenizer(request.param)


def assistant_trained_flags(row: dict, train_on: str = "all") -> list[bool]:
    """Per assistant message of the row, in order: trained? (prompt-side ones never; opt-outs not)."""
    conv = parse_row(row, train_on)
    return [t for m, t in zip(conv.messages, conv.trained, strict=True) if m["role"] == "assistant"]


def check_row(family_name: str, tokenizer, row: dict) -> None:
    """The token contract (tests/contract.py: the template's own markers scanned in its render), and every
    trained message's text in the trained tokens unless an omission says the template drops it."""
    target = template_target(OFFICIAL_FAMILIES[family_name]["template"])
    try:
        check_token_contract(tokenizer, row, target)
    except DataError as e:
        assert e.reason in ALLOWED_REJECTS[family_name], f"{family_name}: {e}"
        return
    encoded = encode_row(row, tokenizer)
    dropped = {reason for reason, _ in encoded.omissions}
    if not dropped & {"template_drops_content", "template_drops_text_beside_tool_calls"}:
        flags = assistant_trained_flags(row)
        messages = [m for m in parse_row(row).messages if m["role"] == "assistant"]
        trained_text = "".join(run for s in encoded.samples for run in trained_texts(s, tokenizer))
        for k in (k for k, trained in enumerate(flags) if trained):
            assert json.dumps(messages[k]["content"].strip())[1:-1] in json.dumps(trained_text), family_name


def test_every_row_is_trained_exactly_or_refused_with_a_reason(family):
    name, tokenizer = family
    for _, row in ROWS:
        check_row(name, tokenizer, row)


def test_reasoning_is_trained_where_the_template_shows_it_and_reported_where_it_drops_it(family):
    """The newest turn's reasoning is trained once (in the template's own field or format, or after its
    generation prompt's <think>), or the template drops it and an omission says so (Llama-3.1 renders only
    the call of a tool-call message; DeepSeek gives no <think> after tool output)."""
    name, tokenizer = family
    if name == "deepseek_r1":  # its second tool-call message renders without a header: refused
        with pytest.raises(DataError, match="does not follow its own generation prompt"):
            encode_row(REASONING_ROW, tokenizer)
        return
    encoded = encode_row(REASONING_ROW, tokenizer)
    everything = "".join(run for s in encoded.samples for run in trained_texts(s, tokenizer))
    dropped = {what for reason, what in encoded.omissions if reason == "template_drops_reasoning"}
    reasoning_turns = {
        1: "I should search flights to CDG first.",
        2: "One flight: ask.",
        4: "The booking is confirmed.",
    }
    for turn, reasoning in reasoning_turns.items():
        reported = f"assistant turn {turn}: its reasoning is not in the rendered turn" in dropped
        assert everything.count(reasoning) == (0 if reported else 1), (name, reasoning)
    assert sum(len(s.reasoning) for s in encoded.samples) == 3 - len(dropped)  # located for highlighting
    assert name not in ("qwen3", "gpt_oss", "glm46", "qwq", "smollm3") or not dropped


def test_text_a_template_drops_is_reported_never_silent():
    """Llama-3.1 renders only the tool call of a message that also has text; Mistral-Nemo too."""
    for name in ("llama31", "mistral_nemo"):
        encoded = encode_row(REASONING_ROW, official_tokenizer(name))
        assert ("template_drops_text_beside_tool_calls", "assistant turn 3: its text is not in the rendered turn") in (
            encoded.omissions
        )
    encoded = encode_row(REASONING_ROW, official_tokenizer("qwen3"))
    assert not encoded.omissions


def test_qwen3_trains_every_real_row_in_per_turn_samples_and_counts_the_overhead():
    tokenizer = official_tokenizer("qwen3")
    samples = row_tokens = sample_tokens = turns = 0
    for _, _, row in REAL:
        encoded = encode_row(row, tokenizer)
        assert encoded.trained_turns == sum(assistant_trained_flags(row)) and not encoded.omissions
        samples += len(encoded.samples)
        row_tokens += encoded.row_tokens
        sample_tokens += encoded.num_tokens
        turns += encoded.trained_turns
    assert len(REAL) == 560 and samples > len(REAL)
    # Qwen3 adds an empty think block to the newest turn only: without reasoning in the data, every turn is
    # trained in a sample of its own, at a token cost that is counted.
    assert samples == turns and sample_tokens > 2 * row_tokens


def test_turns_after_a_pre_filled_generation_prompt_follow_it():
    """QwQ's generation prompt ends with "<think>\\n</think>" (outside thinking mode): a turn without
    reasoning is written after it; one with reasoning is written inside "<think>\\n" and closes it."""
    tokenizer = official_tokenizer("qwq")
    sample = encode_row({"input": "Hi", "output": "Hello!"}, tokenizer).samples[0]
    text = tokenizer.decode(sample.input_ids)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n</think>Hello!<|im_end|>"
    thinking = encode_row(
        {"input": "Hi", "output": [{"role": "assistant", "content": "Hello!", "reasoning": "greet"}]}, tokenizer
    )
    sample = thinking.samples[0]
    trained = "".join(trained_texts(sample, tokenizer))
    assert trained == "greet\n</think>\n\nHello!<|im_end|>"


def test_deepseek_r1_reasoning_is_written_into_the_think_block_its_prompt_opens():
    tokenizer = official_tokenizer("deepseek_r1")
    row = {"input": "2+2?", "output": [{"role": "assistant", "content": "4", "reasoning_content": "Add them."}]}
    sample = encode_row(row, tokenizer).samples[0]
    text = tokenizer.decode(sample.input_ids)
    assert text.endswith("<｜User｜>2+2?<｜Assistant｜><think>\nAdd them.\n</think>\n\n4<｜end▁of▁sentence｜>")
    trained = "".join(trained_texts(sample, tokenizer))
    assert trained == "Add them.\n</think>\n\n4<｜end▁of▁sentence｜>"


def test_gpt_oss_trains_the_return_token_of_a_final_answer_and_the_call_token_of_a_tool_call():
    tokenizer = official_tokenizer("gpt_oss")
    runs = [run for s in encode_row(WITH_TOOLS_ROW, tokenizer).samples for run in trained_texts(s, tokenizer)]
    assert runs == [
        ' to=functions.weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>',
        "<|channel|>final<|message|>It is -3C and snowing in Oslo.<|return|>",
    ]


def test_phi_end_of_conversation_eos_is_not_a_history_rewrite():
    tokenizer = official_tokenizer("phi35")
    encoded = encode_row(OPT_OUT_ROW, tokenizer)
    assert len(encoded.samples) == 1 and encoded.row_tokens == encoded.num_tokens


def test_glm_trains_the_role_token_it_stops_with():
    tokenizer = official_tokenizer("glm46")
    encoded = encode_row(WITH_TOOLS_ROW, tokenizer)
    sample = encoded.samples[0]
    trained = "".join(trained_texts(sample, tokenizer))
    assert "</tool_call><|observation|>" in trained and trained.endswith("snowing in Oslo.<|user|>")


def test_templates_without_system_role_or_alternation_get_the_system_prompt_in_the_first_user_turn():
    tokenizer = official_tokenizer("gemma2")
    encoded = encode_row(REASONING_ROW, tokenizer)
    text = tokenizer.decode(encoded.samples[-1].input_ids)
    assert text.startswith("<bos><start_of_turn>user\nYou are a travel agent.\n\nFly me to Paris.<end_of_turn>")


def test_mistral_tool_call_ids_become_nine_characters_and_match_their_results():
    tokenizer = official_tokenizer("mistral_nemo")
    text = tokenizer.decode(encode_row(REASONING_ROW, tokenizer).samples[-1].input_ids)
    ids = re.findall(r'"id": "([^"]+)"', text)
    assert ids and all(len(i) == 9 and i.isalnum() for i in ids)
    assert set(re.findall(r'"call_id": "([^"]+)"', text)) == set(ids)


@pytest.mark.parametrize("user", ["ok", "Yes.", "Do it please."])
def test_mistral_turns_after_a_short_user_message_train_only_what_the_assistant_writes(user):
    """Mistral moves the system prompt out of a user message once a turn follows it; the turn is then
    found after the re-rendered message's tail, however short that message is."""
    tokenizer = official_tokenizer("mistral_nemo")
    row = {
        "input": json.dumps([{"role": "system", "content": "You are an agent."}, {"role": "user", "content": user}]),
        "output": [{"role": "assistant", "content": "Sure, done."}, {"role": "user", "content": user}]
        + [{"role": "assistant", "content": "Done again."}],
    }
    texts = [
        tokenizer.decode(sample.input_ids[first:end])
        for sample in encode_row(row, tokenizer).samples
        for first, end in sample.spans
    ]
    assert texts == ["Sure, done.</s>", "Done again.</s>"]


def test_history_rewrites_refuse_keeps_the_old_behaviour():
    tokenizer = official_tokenizer("qwen3")
    with pytest.raises(DataError) as info:
        encode_row(REAL[0][2], tokenizer, EncodeOptions(history_rewrites="refuse"))
    assert info.value.reason == "template_rewrites_history"
