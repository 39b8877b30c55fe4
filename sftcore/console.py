"""What a run shows on its console: our log lines, one progress display, one line per evaluation and a
final summary. Ray's and the libraries' own logs stay in Ray's log files unless --verbose.

Under Ray the display runs in the driver and rank 0 sends it events through a Ray queue (sftcore.runtime);
under torchrun it runs in rank 0 itself. An event is a metrics row (a training step or an evaluation) or
{"message": text}.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from sftcore.storage import StoragePath
from sftcore.tracking import read_metrics


class ConsoleFormatter(logging.Formatter):
    """Our INFO lines as they are; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_console_logging(level: int) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def quiet_libraries(verbose: bool) -> None:
    """transformers' progress bars and advice stay off the console unless --verbose."""
    import transformers

    if not verbose:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def step_text(row: dict[str, Any]) -> str:
    text = f"loss {row['loss']:.4f} lr {row['learning_rate']:.2e} tok/s {row['tokens_per_second']:.0f}"
    if "mfu" in row:
        text += f" mfu {row['mfu']:.1%}"
    if "peak_memory_gb" in row:
        text += f" mem {row['peak_memory_gb']:.1f}G"
    if row.get("step_seconds"):
        text += f" data-wait {row['data_wait_seconds'] / row['step_seconds']:.0%}"
    return text


def eval_text(row: dict[str, Any]) -> str:
    text = (
        f"step {row['step']} eval_loss {row['eval_loss']:.4f} ppl {row['eval_perplexity']:.2f} "
        f"acc {row['eval_token_accuracy']:.3f}"
    )
    if "eval_turns" in row:  # --eval_generate_rows
        scores = [
            f"{label} {row[key]:.2f}"
            for label, key in (("tool-name", "eval_tool_name_accuracy"), ("args-exact", "eval_arguments_exact_match"))
            if key in row
        ]
        text += f" | next action on {row['eval_turns']} turns: " + (", ".join(scores) or "no tool calls")
    return text


class Progress:
    """The one progress display: on a terminal a tqdm bar (step, loss, learning rate, tokens/s, ETA);
    otherwise (a log file, `ray job logs`) one line per logged step with its ETA. Evaluations and
    messages print as lines, above the bar."""

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.first: tuple[float, int] | None = None  # (time, step) of the first step this launch showed

    def show(self, event: dict[str, Any]) -> None:
        if "message" in event:
            self._line(event["message"])
        elif "eval_loss" in event:
            self._line(eval_text(event))
        elif "loss" in event:
            self._step(event)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _step(self, row: dict[str, Any]) -> None:
        step, now = row["step"], time.monotonic()
        if self.first is None:
            self.first = (now, step)
        if self.stream.isatty():
            if self.bar is None:
                self.bar = tqdm(total=self.total_steps, initial=step - 1, file=self.stream, unit="step", desc="train")
            self.bar.set_postfix_str(step_text(row), refresh=False)
            self.bar.update(step - self.bar.n)
            return
        started, first_step = self.first
        eta = ""
        if step > first_step:
            eta = f" eta {format_duration((now - started) / (step - first_step) * (self.total_steps - step))}"
        self._line(f"step {step}/{self.total_steps} {step_text(row)}{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summarize_run(output_dir: str | os.PathLike | StoragePath, wall_seconds: float, curve: StoragePath | None) -> str:
    """The end of a run in a few lines: steps, time, tokens trained, best evaluation, where the model is
    and how to load it (from metrics.jsonl, which holds every step of the run once, across resumes)."""
    rows = read_metrics(output_dir)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    final = StoragePath.of(output_dir) / "final"
    lines = [
        f"done: {steps[-1]['step'] if steps else 0} steps, {format_duration(wall_seconds)} this launch, "
        f"{sum(r['trained_tokens'] for r in steps):,} tokens trained"
    ]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        lines.append(
            f"eval_loss {evals[-1]['eval_loss']:.4f} at the end, best {best['eval_loss']:.4f} (step {best['step']})"
        )
    lines.append(f"model: {final}" + (f"   loss curve: {curve}" if curve else ""))
    load_from = final.uri
    if not final.is_local:  # transformers loads from a local directory: copy the model down first
        load_from = "final"
        lines.append("download it:")
        lines.append(f"    python -c \"import pyarrow.fs as fs; fs.copy_files('{final}', 'final')\"")
    lines.append("load it:")
    lines.append("    from transformers import AutoModelForCausalLM, AutoTokenizer")
    lines.append(
        f'    model, tokenizer = AutoModelForCausalLM.from_pretrained("{load_from}"), '
        f'AutoTokenizer.from_pretrained("{load_from}")'
    )
    return "\n".join(lines)
