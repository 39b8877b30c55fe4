"""Next-action evaluation: prompts are training's own, tool calls parse back in every template's own
syntax, a replay of the reference scores 1.0, a corrupted replay scores what is counted by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DATA, OFFICIAL_FAMILIES, REPO, official_tokenizer

from sftcore.data import DataError
from sftcore.evaluation import (
    ToolCall,
    collect_turns,
    evaluate_turns,
    parse_tool_calls,
    row_turns,
    summarize,
    tool_call_syntax,
)
from sftcore.masking import EncodeOptions, encode_row

TAU = DATA / "taubench_airline_dev.jsonl"
TAU_ROWS = [json.loads(line) for line in TAU.read_text().splitlines()]
OPTIONS = EncodeOptions(max_seq_length=4096)
FAMILIES = ["chatml", *OFFICIAL_FAMILIES]


def tokenizer_of(name: str, smollm2_tokenizer):
    return smollm2_tokenizer if name == "chatml" else official_tokenizer(name)


def replay(turns):
    """A stand-in model that writes each reference turn exactly as training trains it."""
    return [(turn.reference_text, True) for turn in turns]


def test_prompts_are_the_training_samples_before_each_trained_turn(smollm2_tokenizer):
    row = TAU_ROWS[50]
    encoded = encode_row(row, smollm2_tokenizer, OPTIONS)
    turns = row_turns(row, 51, smollm2_tokenizer, OPTIONS).turns
    assert [t.turn for t in turns] == list(range(encoded.trained_turns))
    for turn in turns:
        sample = next(s for s in encoded.samples if turn.turn in s.turns)
        cut = len(turn.prompt_ids)
        assert sample.input_ids[:cut] == turn.prompt_ids
        assert sample.labels[cut - 1] == -100 and sample.labels[cut] != -100  # the turn's first trained token


@pytest.mark.parametrize("name", FAMILIES)
def test_every_reference_tool_call_parses_back_in_the_templates_own_syntax(name, smollm2_tokenizer):
    tokenizer = tokenizer_of(name, smollm2_tokenizer)
    syntax = tool_call_syntax(tokenizer)
    checked = 0
    for n, row in enumerate(TAU_ROWS):
        try:
            turns = row_turns(row, n + 1, tokenizer, OPTIONS).turns
        except DataError:  # a row the template cannot render (DeepSeek-R1's on most rows): training refuses it too
            continue
        for turn in turns:
            assert parse_tool_calls(turn.reference_text, syntax) == turn.reference_calls, turn.reference_text
            checked += bool(turn.reference_calls)
        if checked >= 12:
            break
    assert checked >= (4 if name == "deepseek_r1" else 8)  # DeepSeek-R1's renders one tool-call message per row


def test_the_fallback_and_broken_arguments_parse_as_calls_with_invalid_arguments(smollm2_tokenizer):
    syntax = tool_call_syntax(smollm2_tokenizer)  # ChatML: sftcore's <tool_call> JSON fallback
    assert syntax.kind == "json"
    text = (
        '<think>maybe {"name": "ignored", "arguments": {}}</think>'
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
        '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": [2]}"}\n</tool_call>'
        '<tool_call>\n{"name": "c", "arguments": {"z": 3}\n</tool_call><|im_end|>'
    )
    assert parse_tool_calls(text, syntax) == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": [2]}), ToolCall("c", None)]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_replay_of_the_reference_scores_one_on_every_metric(name, smollm2_tokenizer):
    tokenizer = tokenizer_of(name, smollm2_tokenizer)
    syntax = tool_call_syntax(tokenizer)
    turns = []
    for n in [*range(50, 60), *range(50)]:  # 3 rows with tool calls that the template renders, from row 50 on
        try:
            found = row_turns(TAU_ROWS[n], n + 1, tokenizer, OPTIONS).turns
        except DataError:  # DeepSeek-R1's template fails on most rows (training refuses them too)
            continue
        if any(t.reference_calls for t in found):
            turns += found
        if len({t.line for t in turns}) == 3:
            break
    report = summarize(evaluate_turns(turns, replay, syntax, tokenizer))
    for key in (
        "tool_name_accuracy",
        "arguments_exact_match",
        "arguments_valid_json",
        "argument_f1",
        "no_call_accuracy",
        "final_answer_match",
        "stop_rate",
    ):
        assert report[key] == 1.0, (key, report)


def test_tool_call_turns_count_the_assistant_messages_with_tool_calls(smollm2_tokenizer):
    turns, counts = collect_turns(str(TAU), smollm2_tokenizer, OPTIONS, range(50, 60), None, 0)
    report = summarize(evaluate_turns(turns, replay, tool_call_syntax(smollm2_tokenizer), smollm2_tokenizer))
    messages = [m for row in TAU_ROWS[50:60] for m in row["output"] if m["role"] == "assistant"]
    assert report["tool_call_turns"] == sum(bool(m.get("tool_calls")) for m in messages)
    assert report["turns"] == len(messages) and "turns_not_evaluated: turn_too_long" not in counts


def test_a_corrupted_replay_scores_what_is_counted_by_hand(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    syntax = tool_call_syntax(tokenizer)
    turns, _ = collect_turns(str(TAU), tokenizer, OPTIONS, range(50, 52), None, 0)
    single = [t for t in turns if len(t.reference_calls) == 1 and len(t.reference_calls[0].arguments) >= 2]
    renamed, changed, broken = single[:3]
    stray = next(t for t in turns if not t.reference_calls)
    finals = [t for t in turns if t.last and not t.reference_calls and t.reference_answer]
    wrong_final = finals[0]
    assert stray is not wrong_final

    def call_text(name: str, arguments: str) -> str:
        return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call><|im_end|>'

    def corrupt(turns):
        out = []
        for t in turns:
            text, stopped = t.reference_text, True
            if t is renamed:  # a wrong tool name: name, exact match and every argument pair wrong
                text = call_text("wrong_tool", json.dumps(t.reference_calls[0].arguments))
            elif t is changed:  # one argument changed: the name right, exact match wrong, F1 from the pairs
                call = t.reference_calls[0]
                key = next(iter(call.arguments))
                text = call_text(call.name, json.dumps(call.arguments | {key: "changed"}))
            elif t is broken:  # arguments that do not parse, and no stop token
                text, stopped = call_text(t.reference_calls[0].name, '{"x": ').removesuffix("<|im_end|>"), False
            elif t is stray:  # a call where the reference answers
                text = call_text("x", "{}")
            elif t is wrong_final:
                text = "Something else.<|im_end|>"
            out.append((text, stopped))
        return out

    report = summarize(evaluate_turns(turns, corrupt, syntax, tokenizer))
    with_calls = [t for t in turns if t.reference_calls]
    n, answers = len(with_calls), len(turns) - len(with_calls)
    generated = sum(len(t.reference_calls) for t in with_calls) + 1  # the stray call
    pairs = len(changed.reference_calls[0].arguments)
    assert report["turns"] == len(turns) and report["tool_call_turns"] == n
    assert report["tool_name_accuracy"] == pytest.approx((n - 1) / n)
    assert report["arguments_exact_match"] == pytest.approx((n - 3) / n)
    assert report["arguments_valid_json"] == pytest.approx((generated - 1) / generated)
    assert report["argument_f1"] == pytest.approx(((n - 3) + (pairs - 1) / pairs) / n)
    assert report["no_call_accuracy"] == pytest.approx((answers - 1) / answers)
    assert report["final_answer_match"] == pytest.approx((len(finals) - 1) / len(finals))
    assert report["stop_rate"] == pytest.approx((len(turns) - 1) / len(turns))
    tool = renamed.reference_calls[0].name
    assert report["per_tool"][tool]["tool_name_accuracy"] < 1.0


def test_evaluate_workflow_writes_the_report_keys_and_one_record_per_turn(tmp_path, tiny_model):
    report_path, turns_path = tmp_path / "report.json", tmp_path / "turns.jsonl"
    command = [sys.executable, "workflows/evaluate.py", "--model_name_or_path", tiny_model, "--data_path", str(TAU)]
    command += ["--rows", "50:52", "--max_new_tokens", "4", "--output_json", str(report_path)]
    command += ["--output_jsonl", str(turns_path), "--compare", tiny_model]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(report_path.read_text())
    assert set(reports) == {"model", "base"}
    report = reports["model"]
    keys = ["turns", "tool_call_turns", "tool_name_accuracy", "arguments_exact_match", "arguments_valid_json"]
    keys += ["argument_f1", "no_call_accuracy", "final_answer_match", "stop_rate"]
    assert set(keys) <= set(report) and "per_tool" in report
    records = turns_path.read_text().splitlines()
    assert len(records) == 2 * report["turns"]
    assert "tool_call_turns" in done.stdout

    bad = subprocess.run(command[:-2] + ["--rows", "50"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rows takes START:END" in bad.stderr


def test_a_model_trained_with_packed_attention_generates_like_sdpa_in_padded_batches(tmp_path, smollm2_tokenizer):
    """Generation pads batches and decodes against a KV cache; hf_generator switches a packed-attention
    model to transformers' sdpa for it, so it writes what an sdpa model writes."""
    import torch
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    from sftcore.evaluation import hf_generator

    path = save_tiny_model(tmp_path, smollm2_tokenizer)
    syntax = tool_call_syntax(smollm2_tokenizer)
    turns, _ = collect_turns(str(TAU), smollm2_tokenizer, EncodeOptions(max_seq_length=1024), range(50, 51), None, 0)
    turns = turns[:4]  # prompts of different lengths: padded in one batch
    assert len({len(t.prompt_ids) for t in turns}) > 1
    outputs = []
    for implementation in ("sdpa", "packed_sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation).eval()
        outputs.append(hf_generator(model, smollm2_tokenizer, syntax, max_new_tokens=6, batch_tokens=10**6)(turns))
        assert model.config._attn_implementation == implementation  # restored after generating
    assert outputs[0] == outputs[1]
    with pytest.raises(ValueError, match="unpacked_attention"):
        model.generate(torch.tensor([turns[0].prompt_ids]), max_new_tokens=2)


def test_compare_frees_the_first_model_before_it_loads_the_second(tmp_path, tiny_model, monkeypatch):
    import gc
    import weakref

    monkeypatch.syspath_prepend(str(REPO / "workflows"))
    import evaluate

    loaded = []

    def load_model(name, trust_remote_code):
        gc.collect()
        assert all(ref() is None for ref in loaded), "the first model is still held while the second loads"
        model = original(name, trust_remote_code)
        loaded.append(weakref.ref(model))
        return model

    original = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", load_model)
    args = ["--model_name_or_path", tiny_model, "--data_path", str(TAU), "--rows", "50:51", "--max_new_tokens", "2"]
    assert evaluate.main([*args, "--compare", tiny_model]) == 0
    assert len(loaded) == 2
