"""metrics.jsonl, locally and in a bucket: each step once across resumes, the rest rolled back and marked."""

from __future__ import annotations

import json

from sftcore.console import summarize_run
from sftcore.tracking import METRICS_FILE, ROLLED_BACK_FILE, MetricsLogger, plot_loss_curve, read_metrics


def row(step: int) -> dict:
    return {"step": step, "loss": 2.0 / step, "trained_tokens": 10}


def test_a_resume_rolls_back_later_steps_and_logging_continues(output_dir):
    first = MetricsLogger(output_dir.uri, 0, "none", "p", {})
    for step in (1, 2, 3):
        first.log(row(step))
    first.close()  # a bucket's copy is uploaded at checkpoints and at the end
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3]

    (output_dir / METRICS_FILE).write_text((output_dir / METRICS_FILE).read_text() + '{"step": 4, "lo')  # torn
    resumed = MetricsLogger(output_dir.uri, 1, "none", "p", {})  # resumed from the checkpoint at step 1
    resumed.log(row(2))
    resumed.sync()
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2]
    rolled_back = [json.loads(line) for line in (output_dir / ROLLED_BACK_FILE).read_text().splitlines()]
    assert [(r["step"], r["rolled_back_to_step"]) for r in rolled_back] == [(2, 1), (3, 1)]
    resumed.close()

    curve = plot_loss_curve(output_dir)
    assert curve == output_dir / "loss_curve.png" and curve.read_bytes().startswith(b"\x89PNG")
    summary = summarize_run(output_dir, 5.0, curve)
    assert f"model: {output_dir / 'final'}" in summary
    if not output_dir.is_local:  # transformers cannot read a bucket: the summary says how to copy it down
        assert f"fs.copy_files('{output_dir / 'final'}', 'final')" in summary
        assert 'from_pretrained("final")' in summary
