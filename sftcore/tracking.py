"""Training metrics: OUTPUT_DIR/metrics.jsonl always, wandb on rank 0 when asked, a loss-curve PNG at the end."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
ROLLED_BACK_FILE = "metrics_rolled_back.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def stable_run_id(output_dir: str) -> str:
    """The same wandb run id for every launch into the same output dir, so a resumed run continues it."""
    return "sft-" + hashlib.sha256(os.path.abspath(output_dir).encode()).hexdigest()[:12]


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _roll_back(path: Path, resumed_step: int) -> None:
    """Move rows past resumed_step (steps trained after the checkpoint, then lost to a crash or stop)
    from metrics.jsonl to metrics_rolled_back.jsonl, marked, so metrics.jsonl holds each step once."""
    rows, torn = [], False
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a process killed mid-write
            torn = True
            logger.warning("dropping a torn line from %s: %r", path, line[:80])
    later = [r for r in rows if r["step"] > resumed_step]
    if later:
        with (path.parent / ROLLED_BACK_FILE).open("a") as f:
            f.writelines(json.dumps({**r, "rolled_back_to_step": resumed_step}) + "\n" for r in later)
        logger.warning(
            "steps %d-%d were trained after the checkpoint at step %d and will be trained again; "
            "their first metrics moved to %s",
            min(r["step"] for r in later),
            max(r["step"] for r in later),
            resumed_step,
            ROLLED_BACK_FILE,
        )
    if later or torn:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resumed_step))
        tmp.replace(path)


class MetricsLogger:
    """Rank 0's sink for metrics. On resume, rows past the resumed step are moved aside (marked) so
    metrics.jsonl reads like one uninterrupted run."""

    def __init__(self, output_dir: str, resumed_step: int, report_to: str, project: str, run_config: dict):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _roll_back(self.path, resumed_step)
        self.run = None
        if report_to == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE") or None
            if mode is None and not _has_wandb_credentials():
                mode = "offline"
                logger.warning("wandb: no API key and no login found; logging offline under %s/wandb", output_dir)
            self.run = wandb.init(
                project=project,
                id=stable_run_id(output_dir),
                resume="allow",
                dir=output_dir,
                mode=mode,
                config=run_config,
            )

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of OUTPUT_DIR/metrics.jsonl (none if it is not there)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(output_dir: str) -> Path | None:
    """loss and eval_loss against step, from metrics.jsonl, as OUTPUT_DIR/loss_curve.png."""
    rows = read_metrics(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "eval_loss"):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(output_dir) / LOSS_CURVE_FILE
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
