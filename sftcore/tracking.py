"""Training metrics: OUTPUT_DIR/metrics.jsonl always, wandb on rank 0 when asked, a loss-curve PNG at the end."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sftcore.storage import StoragePath

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
ROLLED_BACK_FILE = "metrics_rolled_back.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def stable_run_id(output_dir: str) -> str:
    """The same wandb run id for every launch into the same output dir, so a resumed run continues it."""
    return "sft-" + hashlib.sha256(StoragePath.of(output_dir).uri.encode()).hexdigest()[:12]


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _parse_rows(path: StoragePath) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a metrics file (none if it is not there), and whether a torn last line was dropped."""
    rows, torn = [], False
    text = path.read_text() if path.is_file() else ""
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a process killed mid-write
            torn = True
            logger.warning("dropping a torn line from %s: %r", path, line[:80])
    return rows, torn


def _roll_back(output_dir: StoragePath, resumed_step: int) -> list[dict[str, Any]]:
    """Move rows past resumed_step (steps trained after the checkpoint, then lost to a crash or stop)
    from metrics.jsonl to metrics_rolled_back.jsonl, marked, so metrics.jsonl holds each step once.
    Returns the rows kept."""
    path = output_dir / METRICS_FILE
    rows, torn = _parse_rows(path)
    kept = [r for r in rows if r["step"] <= resumed_step]
    later = [r for r in rows if r["step"] > resumed_step]
    if later:
        rolled_back = output_dir / ROLLED_BACK_FILE
        earlier = rolled_back.read_text() if rolled_back.is_file() else ""  # no append in a bucket: rewrite
        rolled_back.write_text(
            earlier + "".join(json.dumps({**r, "rolled_back_to_step": resumed_step}) + "\n" for r in later)
        )
        logger.warning(
            "steps %d-%d were trained after the checkpoint at step %d and will be trained again; "
            "their first metrics moved to %s",
            min(r["step"] for r in later),
            max(r["step"] for r in later),
            resumed_step,
            ROLLED_BACK_FILE,
        )
    if later or torn:
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsLogger:
    """Rank 0's sink for metrics. On resume, rows past the resumed step are moved aside (marked) so
    metrics.jsonl reads like one uninterrupted run. Locally each row is appended as it comes; for a
    bucket (no append there) rows go to a local copy, uploaded whole every SYNC_SECONDS, at each
    checkpoint and at the end."""

    SYNC_SECONDS = 60.0

    def __init__(self, output_dir: str, resumed_step: int, report_to: str, project: str, run_config: dict):
        self.output_dir = StoragePath.of(output_dir)
        self.output_dir.mkdir()
        kept = _roll_back(self.output_dir, resumed_step)
        if self.output_dir.is_local:
            self.file, self.staging = (self.output_dir / METRICS_FILE).local_path, None
        else:
            self.staging = tempfile.TemporaryDirectory(prefix="sftcore-metrics-")
            self.file = Path(self.staging.name) / METRICS_FILE
            self.file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.synced = time.monotonic()
        self.run = None
        if report_to == "wandb":
            import wandb

            # wandb keeps its files on a local disk: for a bucket, in the temp directory
            wandb_dir = (
                self.file.parent
                if self.output_dir.is_local
                else Path(tempfile.gettempdir()) / stable_run_id(output_dir)
            )
            wandb_dir.mkdir(parents=True, exist_ok=True)
            mode = os.environ.get("WANDB_MODE") or None
            if mode is None and not _has_wandb_credentials():
                mode = "offline"
                logger.warning("wandb: no API key and no login found; logging offline under %s/wandb", wandb_dir)
            self.run = wandb.init(
                project=project,
                id=stable_run_id(output_dir),
                resume="allow",
                dir=str(wandb_dir),
                mode=mode,
                config=run_config,
            )

    def log(self, row: dict[str, Any]) -> None:
        with self.file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if time.monotonic() - self.synced > self.SYNC_SECONDS:
            self.sync()
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def sync(self) -> None:
        """Upload the rows so far (for a bucket; locally they are already in place)."""
        if self.staging is not None:
            (self.output_dir / METRICS_FILE).write_bytes(self.file.read_bytes())
        self.synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self.staging is not None:
            self.staging.cleanup()
        if self.run is not None:
            self.run.finish()


def read_metrics(output_dir: str | os.PathLike | StoragePath) -> list[dict[str, Any]]:
    """The rows of OUTPUT_DIR/metrics.jsonl (none if it is not there)."""
    path = StoragePath.of(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(output_dir: str | os.PathLike | StoragePath) -> StoragePath | None:
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
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    out = StoragePath.of(output_dir) / LOSS_CURVE_FILE
    out.write_bytes(image.getvalue())
    return out
