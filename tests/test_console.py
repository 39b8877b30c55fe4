"""The console: one progress display, evaluation lines, the final summary."""

from __future__ import annotations

import io
import json

from sftcore.console import Progress, format_duration, summarize_run


def step_row(step: int) -> dict:
    return {"step": step, "loss": 1.5, "learning_rate": 2e-4, "tokens_per_second": 1234.4, "trained_tokens": 10}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_each_step_is_one_line_with_an_eta_after_the_first():
    out = io.StringIO()
    progress = Progress(total_steps=4, stream=out)
    for step in (1, 2):
        progress.show(step_row(step))
    progress.show({"step": 2, "eval_loss": 1.25, "eval_perplexity": 3.49, "eval_token_accuracy": 0.7})
    progress.show({"message": "warning: something the user must know"})
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/4 loss 1.5000 lr 2.00e-04 tok/s 1234"
    assert lines[1].startswith("step 2/4 loss 1.5000 lr 2.00e-04 tok/s 1234 eta ")
    assert lines[2:] == ["step 2 eval_loss 1.2500 ppl 3.49 acc 0.700", "warning: something the user must know"]


def test_a_step_shows_mfu_peak_memory_and_the_share_of_time_spent_waiting_for_data_when_measured():
    out = io.StringIO()
    progress = Progress(total_steps=4, stream=out)
    measured = {"mfu": 0.3512, "peak_memory_gb": 41.63, "step_seconds": 0.5, "data_wait_seconds": 0.01}
    progress.show(step_row(1) | measured)
    assert out.getvalue() == "step 1/4 loss 1.5000 lr 2.00e-04 tok/s 1234 mfu 35.1% mem 41.6G data-wait 2%\n"


def test_on_a_terminal_steps_move_one_bar_and_other_lines_print_above_it():
    out = Terminal()
    progress = Progress(total_steps=10, stream=out)
    progress.show(step_row(4))  # a resumed run starts its bar where it is
    assert progress.bar is not None and progress.bar.n == 4
    progress.show(step_row(5))
    assert progress.bar.n == 5
    progress.show({"message": "a line above the bar"})
    progress.close()
    text = out.getvalue()
    assert "train:" in text and "5/10" in text and "loss 1.5000" in text
    assert "a line above the bar\n" in text
    assert "step 5/10" not in text  # no per-step lines beside the bar


def test_the_summary_counts_the_run_and_says_how_to_load_the_model(tmp_path):
    rows = [step_row(1), step_row(2), {"step": 2, "eval_loss": 1.3}, step_row(3), {"step": 3, "eval_loss": 1.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize_run(tmp_path, 125.0, None).splitlines()
    assert summary[0] == "done: 3 steps, 2m05s this launch, 30 tokens trained"
    assert summary[1] == "eval_loss 1.4000 at the end, best 1.3000 (step 2)"
    assert summary[2] == f"model: {tmp_path / 'final'}"
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "final"}")' in summary[-1]
    assert format_duration(3725) == "1h02m" and format_duration(9) == "9s"
