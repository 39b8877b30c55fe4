"""The data inspection report and workflows/inspect_data.py."""

from __future__ import annotations

import subprocess
import sys

from conftest import REAL_DATA_FILES, REPO

from sftcore.inspection import format_report, highlight_html, highlight_terminal, inspect_file


def test_report_counts_add_up_and_name_bad_lines(tmp_path, smollm2_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"input": "hi", "output": "hello"}\n'
        "\n"
        "not json\n"
        '{"input": "x", "output": [{"role": "robot", "content": "y"}]}\n'
        '{"input": "long", "output": "' + "word " * 300 + '"}\n'
    )
    report = inspect_file(path, smollm2_tokenizer, max_seq_length=64)
    assert (report.lines, report.blank_lines, report.rows, len(report.rejected)) == (5, 1, 1, 3)
    assert report.lines == report.blank_lines + report.rows + len(report.rejected)
    assert set(report.rejected_by_reason()) == {"invalid_json", "unknown_role", "too_long"}
    text = format_report(report)
    assert f"{path}:3: not valid JSON" in text and f"{path}:4: output[0]: unknown role 'robot'" in text
    assert f"{path}:5: too long" in text


def test_highlighting_marks_exactly_the_trained_text(smollm2_tokenizer):
    report = inspect_file(REAL_DATA_FILES[1], smollm2_tokenizer, num_examples=2)
    plain = highlight_terminal(report.examples[0][1], smollm2_tokenizer, color=False)
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
