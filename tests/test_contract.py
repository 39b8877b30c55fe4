"""The token contract on real vocabularies: every template family on its model's own tokenizer (built offline
from llama.cpp's vocab-only GGUFs, tests/vocabs/SOURCES.md), checked token by token against the
independent oracle in tests/contract.py, on tau-bench and FireAct rows and on rows made from them with
reasoning, answers that start with whitespace, parallel tool calls and a tools list."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, trained_texts
from contract import check_token_contract, edge_rows, ids, template_target
from real_vocabs import PRE_TOKENIZER_REGEXES, REAL_FAMILIES, real_tokenizer, vector_mismatches, vocab_directory

from sftcore import DataError, encode_row
from sftcore.templates import template_support


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


TAU, FIRE = _rows("taubench_airline_dev.jsonl"), _rows("fireact_hotpotqa.jsonl")
EDGES = edge_rows(TAU, FIRE)
# a fifth of the tau-bench rows (the long agent trajectories) and the first FireAct ones, then the edge cases
ROWS = [(f"tau:{n + 1}", r) for n, r in enumerate(TAU) if n % 5 == 0]
ROWS += [(f"fireact:{n + 1}", r) for n, r in enumerate(FIRE[:8])]
ROWS += list(EDGES.items())
# family -> the rows its template cannot render ("*": any row), refused as template errors
REFUSED = {
    # DeepSeek-R1's template renders every tool-call message after the first without its header
    "deepseek_r1": "*",
    "deepseek_r1_always_thinks": "*",
    "llama31": {"parallel_tool_calls"},  # "This model only supports single tool-calls at once!"
}


@pytest.mark.parametrize("vocab", sorted({spec["vocab"] for spec in REAL_FAMILIES.values()}))
def test_each_vocabulary_reproduces_llama_cpp_test_vectors(vocab):
    """The vocabularies are built once (cached) and checked at build; checked again here, so a changed
    tokenizers release that tokenizes differently from the model's own fails loudly."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab_directory(vocab))
    assert vector_mismatches(tokenizer, vocab) == []
    assert vocab == "phi-3" or vocab in PRE_TOKENIZER_REGEXES


@pytest.fixture(scope="module", params=list(REAL_FAMILIES))
def real_family(request):
    return request.param, real_tokenizer(request.param)


def test_every_trained_turn_meets_the_token_contract_on_its_real_vocabulary(real_family):
    name, tokenizer = real_family
    target = template_target(REAL_FAMILIES[name]["template"])
    adaptations, refused = set(), set()
    for where, row in ROWS:
        try:
            per_turn = check_token_contract(tokenizer, row, target)
        except DataError as e:
            assert e.reason == "template_error" and (REFUSED.get(name) == "*" or where in REFUSED.get(name, ())), (
                f"{name} {where}: {e}"
            )
            refused.add(where)
            continue
        adaptations |= {a for names in per_turn.values() for a in names}
    assert len(refused) <= len(ROWS) * 3 // 5, f"{name}: {sorted(refused)}"
    assert "tool_calls_written_as_text" not in adaptations or not template_support(tokenizer).tool_calls
    if name in ("qwq_always_thinks", "deepseek_r1_always_thinks"):
        assert "think_block_closed_by_the_turn" in adaptations


def test_qwq_trains_the_close_of_the_think_block_its_prompt_opens_as_its_own_tokens():
    """QwQ as Qwen ships it (the prompt always opens "<think>\\n"): a turn without reasoning closes the
    block. The prompt's tokens end "Ċ", "<think>", "Ċ" as at inference; the turn trains "\\n</think>\\n\\n"
    and the answer, its first newline a token of its own, never merged with the prompt's."""
    tokenizer = real_tokenizer("qwq_always_thinks")
    sample = encode_row({"input": "What is 2+2?", "output": "The answer is 4."}, tokenizer).samples[0]
    first, _ = sample.spans[0]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert sample.input_ids[:first] == ids(tokenizer, prompt)
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[first - 4 : first]) == ["assistant", "Ċ", "<think>", "Ċ"]
    assert trained_texts(sample, tokenizer) == ["\n</think>\n\nThe answer is 4.<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[first : first + 3]) == ["Ċ", "</think>", "ĊĊ"]


WEATHER = {
    "input": "Weather in Paris?",
    "output": [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C in Paris."},
    ],
}


@pytest.mark.parametrize("family", ["deepseek_r1_always_thinks", "deepseek_v31_string_arguments"])
def test_deepseek_templates_that_concatenate_arguments_get_them_as_json_and_train_native_calls(family):
    tokenizer = real_tokenizer(family)
    support = template_support(tokenizer)
    assert support.tool_calls and support.tool_arguments == "json"
    encoded = encode_row(WEATHER, tokenizer)
    trained = "".join(run for s in encoded.samples for run in trained_texts(s, tokenizer))
    arguments = '{"city": "Paris"}'
    call = f"<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>"
    if family.startswith("deepseek_r1"):
        call = f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{arguments}\n```<｜tool▁call▁end｜>"
    assert "<｜tool▁calls▁begin｜>" + call + "<｜tool▁calls▁end｜>" in trained
    assert "<tool_call>" not in trained and not encoded.omissions


def test_templates_that_take_arguments_as_a_mapping_keep_getting_one():
    for family in ("qwen3", "llama31", "deepseek_v31", "command_r_plus"):
        assert template_support(real_tokenizer(family)).tool_arguments == "object", family


def test_a_template_that_renders_no_tool_calls_says_so_on_every_row_that_has_some():
    tokenizer = real_tokenizer("phi35")
    encoded = encode_row(WEATHER, tokenizer)
    assert [reason for reason, _ in encoded.omissions] == ["template_no_native_tool_calls"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in "".join(
        trained_texts(encoded.samples[0], tokenizer)
    )


def test_phi_never_trains_its_assistant_token_when_an_answer_starts_with_whitespace():
    """<|assistant|> strips the whitespace after it (rstrip): tokenized as one string, the turn's first
    token would be the prompt's own <|assistant|>. The prompt ends with it; the turn's own tokens follow."""
    tokenizer = real_tokenizer("phi35")
    row = {"input": "Write code", "output": [{"role": "assistant", "content": "    print('hi')"}]}
    sample = encode_row(row, tokenizer).samples[0]
    first, _ = sample.spans[0]
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[first - 1]) == "<|assistant|>"
    assert sample.labels[first - 1] == -100
    assert trained_texts(sample, tokenizer) == ["    print('hi')<|end|>"]


def test_command_r_plus_tools_without_descriptions_are_refused_in_words_a_user_acts_on():
    tokenizer = real_tokenizer("command_r_plus")
    row = dict(
        WEATHER,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            }
        ],
    )
    with pytest.raises(DataError, match=r"needs a 'description' .* get_weather, get_weather\.city") as info:
        encode_row(row, tokenizer)
    assert info.value.reason == "template_needs_tool_fields"
    row["tools"][0]["function"]["description"] = "Current weather"
    row["tools"][0]["function"]["parameters"]["properties"]["city"]["description"] = "A city"
    trained = [run for s in encode_row(row, tokenizer).samples for run in trained_texts(s, tokenizer)]
    assert '"tool_name": "get_weather"' in trained[0] and trained[-1] == "It is 18C in Paris.<|END_OF_TURN_TOKEN|>"


def test_command_r7b_whose_template_always_ends_with_its_prompt_is_a_data_error():
    from conftest import TEMPLATES
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vocab_directory("command-r"))
    tokenizer.chat_template = (TEMPLATES / "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja").read_text()
    with pytest.raises(DataError, match="appends its generation prompt") as info:
        encode_row({"input": "Hi", "output": "Hello!"}, tokenizer)
    assert info.value.reason == "template_refused"
