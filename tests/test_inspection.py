"""The data inspection report and workflows/inspect_data.py."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REAL_DATA_FILES, REPO, TEMPLATES

from sftcore.inspection import format_report, highlight_html, highlight_terminal, inspect_file
from sftcore.masking import EncodeOptions


def test_report_counts_add_up_and_name_bad_lines(tmp_path, smollm2_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"input": "hi", "output": "hello"}\n'
        "\n"
        "not json\n"
        '{"input": "x", "output": [{"role": "robot", "content": "y"}]}\n'
        '{"input": "long", "output": "' + "word " * 300 + '"}\n'
    )
    report = inspect_file(path, smollm2_tokenizer, EncodeOptions(max_seq_length=64))
    assert (report.lines, report.blank_lines, report.rows, report.rejected_total) == (5, 1, 1, 3)
    assert report.lines == report.blank_lines + report.rows + report.rejected_total
    assert set(report.rejected_counts) == {"invalid_json", "unknown_role", "too_long"}
    text = format_report(report)
    assert f"{path}:3: not valid JSON" in text and f"{path}:4: output[0]: unknown role 'robot'" in text
    assert f"{path}:5: too long" in text
    assert report.bad_row_count() == 2  # too long is counted, but it is not bad input


def test_highlighting_marks_exactly_the_trained_text(smollm2_tokenizer):
    report = inspect_file(REAL_DATA_FILES[1], smollm2_tokenizer, num_examples=2)
    plain = highlight_terminal(report.examples[0][2].samples[0], smollm2_tokenizer, color=False)
    assert "[[Thought:" in plain and "<|im_end|>]]" in plain and "[[<|im_start|>" not in plain
    page = highlight_html(report, smollm2_tokenizer)
    assert page.count("<h2>") == 2 and 'class="trained"' in page


def test_inspect_data_cli_on_real_data(tmp_path):
    out = tmp_path / "report.html"
    result = subprocess.run(
        [
            sys.executable,
            "workflows/inspect_data.py",
            "--data_path",
            str(REAL_DATA_FILES[0]),
            "--model_name_or_path",
            "smollm2-135m-instruct",
            "--max_seq_length",
            "4096",
            "--html",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "rows to train: 60   rejected: 0" in result.stdout
    assert "trained tokens:" in result.stdout and out.exists()
    # SmolLM2's ChatML renders no tool calls: the turns after the first call are named, the rest exact
    assert f"token contract in {REAL_DATA_FILES[0]}: 163 of 790 trained turns exact" in result.stdout
    assert "627 the template renders no tool calls: sftcore's <tool_call> JSON in prompt or turn" in result.stdout


def test_the_contract_outcomes_name_why_a_turn_is_not_exact(smollm2_tokenizer):
    """Turns of a window or after fallback tool calls are named; tampering with a sample is caught."""
    from sftcore.data import parse_row
    from sftcore.inspection import EXACT, MISMATCH, SHORTENED, contract_outcomes
    from sftcore.masking import encode_conversation

    fire = [json.loads(line) for line in REAL_DATA_FILES[1].read_text().splitlines()[:3]]
    long_row = {"input": "Count.", "output": [{"role": "assistant", "content": f"{n} " * 15} for n in range(4)]}
    for row, options, expected in [
        (fire[0], EncodeOptions(), {EXACT}),
        (long_row, EncodeOptions(max_seq_length=64), {EXACT, SHORTENED}),
    ]:
        conv = parse_row(row)
        encoded = encode_conversation(conv, smollm2_tokenizer, options)
        assert set(contract_outcomes(conv, smollm2_tokenizer, encoded)) == expected
    sample = encoded.samples[0]
    first, _ = sample.spans[0]
    sample.labels[first - 1] = sample.input_ids[first - 1]  # a prompt token trained
    assert contract_outcomes(conv, smollm2_tokenizer, encoded)[MISMATCH] == 1


def test_inspect_data_cli_missing_file_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "workflows/inspect_data.py", "--data_path", str(tmp_path / "nope.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "workflows/inspect_data.py", "--no_color", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_inspect_data_shows_per_turn_samples_with_reasoning_and_drops_by_reason(tmp_path):
    rows = tmp_path / "reasoning.jsonl"
    turn = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Look the order up first.",
        "tool_calls": [{"type": "function", "function": {"name": "find_order", "arguments": {"id": 7}}}],
    }
    output = [
        {**turn, "content": "Let me check."},
        {"role": "tool", "content": "order 7: shipped"},
        {"role": "assistant", "content": "It has shipped.", "reasoning_content": "The tool says shipped."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    rows.write_text(json.dumps({"input": "Where is order 7?", "output": output}) + "\n")

    qwen3 = run_inspect("--data_path", str(rows), "--chat_template", str(TEMPLATES / "Qwen-Qwen3-0.6B.jinja"))
    assert qwen3.returncode == 0, qwen3.stderr
    # Qwen3 keeps reasoning after the last user message only: the tool loop is one sample, the answer
    # to "Thanks!" (whose context no longer shows that reasoning) another.
    assert f"{rows}:1 sample 1/2 (turn 1-2; full history)" in qwen3.stdout
    assert f"{rows}:1 sample 2/2 (turn 3; full history)" in qwen3.stdout
    assert "((Look the order up first.))" in qwen3.stdout and "((The tool says shipped.))" in qwen3.stdout
    assert "samples: 2 (1 rows split into several)" in qwen3.stdout

    llama = run_inspect(
        "--data_path", str(rows), "--chat_template", str(TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja")
    )
    assert llama.returncode == 0, llama.stderr
    assert "template_drops_text_beside_tool_calls: 1 in 1 row(s)" in llama.stdout
    assert "template_drops_reasoning: 1 in 1 row(s)" in llama.stdout
    assert f"{rows}:1: assistant turn 1: its text is not in the rendered turn" in llama.stdout


def test_inspect_data_cli_unknown_chat_template_is_one_line(tmp_path):
    result = run_inspect("--data_path", str(REAL_DATA_FILES[0]), "--chat_template", "no-such-template")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --chat_template no-such-template: no such file, and not a template")


def test_inspect_data_reads_a_run_config_and_ignores_its_training_only_options(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: {REAL_DATA_FILES[0]}\nmax_seq_length: 1024\nuse_lora: true\nnum_workers: 4\n")
    result = run_inspect("--config", str(config), "--examples", "0")
    assert result.returncode == 0, result.stderr
    assert "turns with a shortened history (--overflow window): 790" in result.stdout
