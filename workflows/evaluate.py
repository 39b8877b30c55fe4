"""Next-action evaluation: for every assistant turn of each trajectory, does the model make the
reference's tool calls (name, arguments), or answer without one when the reference does?

    python workflows/evaluate.py --model_name_or_path OUTPUT_DIR/final --data_path rows.jsonl \
        [--rows 50:60] [--max_rows N] [--max_new_tokens 256] [--compare BASE_MODEL] \
        [--output_json report.json] [--output_jsonl turns.jsonl]

Each turn's prompt is the conversation up to it exactly as training renders it (the rendering
options, --max_seq_length, --overflow, --history_rewrites, --train_on and --chat_template, are
training's own, with the same defaults; `--config run.yaml` takes them from a run's config file).
Generation is greedy, batched, with a KV cache (transformers), up to the template's end-of-turn
token. The report's keys and what they mean are in the README ("Evaluate the next action").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from sftcore.config import RENDERING_OPTIONS, TrainConfig, add_config_arguments
from sftcore.console import configure_console_logging, quiet_libraries
from sftcore.data import DataError
from sftcore.evaluation import collect_turns, evaluate_turns, hf_generator, summarize, tool_call_syntax
from sftcore.models import load_tokenizer, native_bf16, resolve_model_path

METRICS = (
    "turns",
    "tool_call_turns",
    "tool_name_accuracy",
    "arguments_exact_match",
    "arguments_valid_json",
    "argument_f1",
    "no_call_accuracy",
    "final_answer_match",
    "stop_rate",
)


def row_range(text: str) -> range:
    """START:END (0-based, END excluded, either may be left out) as a range of row indices."""
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--rows takes START:END (e.g. 50:60), got {text!r}")
    try:
        return range(int(start or 0), int(end) if end else sys.maxsize)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes START:END with whole numbers, got {text!r}") from None


def load_model(name_or_path: str, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=torch.bfloat16 if native_bf16() else torch.float32,
        trust_remote_code=trust_remote_code,
    )
    return model.to("cuda" if cuda else "cpu").eval()


def evaluate_model(
    name: str, trust_remote_code: bool, tokenizer: Any, syntax: Any, turns: list, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """One model's records. The model (and the generator holding it) is freed on return, before
    --compare loads the next one."""
    model = load_model(name, trust_remote_code)
    generate = hf_generator(model, tokenizer, syntax, extra["max_new_tokens"], extra["batch_tokens"])
    return evaluate_turns(turns, generate, syntax, tokenizer)


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_reports(reports: dict[str, dict]) -> None:
    names = list(reports)
    width = max(len(n) for n in names) + 2
    print(f"{'metric':<24}" + "".join(f"{n:>{width}}" for n in names))
    for key in METRICS:
        print(f"{key:<24}" + "".join(f"{format_value(r[key]):>{width}}" for r in reports.values()))
    tools = sorted({tool for r in reports.values() for tool in r["per_tool"]})
    if tools:
        print("per tool: turns, name accuracy, arguments exact")
        name_width = max(22, *(len(tool) for tool in tools))  # tau-bench has names of 27 characters
        for tool in tools:
            cells = []
            for r in reports.values():
                t = r["per_tool"].get(tool)
                scores = None if t is None else (t["turns"], t["tool_name_accuracy"], t["arguments_exact_match"])
                cells.append("-" if scores is None else "{}, {:.2f}, {:.2f}".format(*scores))
            print(f"  {tool:<{name_width}}" + "".join(f"{c:>{max(width, 18)}}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options = (*RENDERING_OPTIONS, "seed")  # the seed picks the --max_rows sample
    add_config_arguments(parser, options, defaults={"model_name_or_path": "smollm2-135m-instruct"}, argv=argv)
    parser.add_argument("--rows", type=row_range, default=None, help="row indices START:END (0-based, END excluded)")
    parser.add_argument("--max_rows", type=int, default=None, help="a seeded sample of this many of those rows")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest generation per turn")
    parser.add_argument("--batch_tokens", type=int, default=16384, help="prompt + generation tokens per batch")
    parser.add_argument("--compare", default=None, help="also evaluate this (base) model, shown side by side")
    parser.add_argument("--output_json", default=None, help="write the report(s) here")
    parser.add_argument("--output_jsonl", default=None, help="write one record per evaluated turn here")
    args = vars(parser.parse_args(argv))
    extra = {k: args.pop(k) for k in ("rows", "max_rows", "max_new_tokens", "batch_tokens", "compare")}
    outputs = {k: args.pop(k) for k in ("output_json", "output_jsonl")}
    args.pop("config")
    cfg = TrainConfig(**args)
    configure_console_logging(logging.WARNING)
    quiet_libraries(verbose=False)

    start = time.perf_counter()
    models = {"model": cfg.model_name_or_path} | ({"base": extra["compare"]} if extra["compare"] else {})
    reports, records = {}, []
    try:
        tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
        syntax = tool_call_syntax(tokenizer)
        turns, skipped = collect_turns(
            cfg.data_path, tokenizer, cfg.encode_options(), extra["rows"], extra["max_rows"], cfg.seed
        )
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not turns:
        print(f"error: {cfg.data_path}: no assistant turn to evaluate ({dict(skipped)})", file=sys.stderr)
        return 2
    print(f"{len(turns)} turns from {cfg.data_path}; {dict(skipped) or 'every turn evaluated with its full history'}")
    for label, name in models.items():
        model_records = evaluate_model(name, cfg.trust_remote_code, tokenizer, syntax, turns, extra)
        reports[label] = summarize(model_records) | {"model": name, "counts": dict(skipped)}
        records += [r | {"model": label} for r in model_records]
    for label, name in models.items():
        print(f"{label}: {name}")
    print_reports(reports)
    if outputs["output_json"]:  # with --compare: {"model": report, "base": report}
        report = reports["model"] if len(reports) == 1 else reports
        with open(outputs["output_json"], "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if outputs["output_jsonl"]:
        with open(outputs["output_jsonl"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(f"({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
