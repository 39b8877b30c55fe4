"""TrainConfig: the single source of truth for training options; the CLI is generated from it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftcore.attention import ATTENTION_CHOICES, trains_trees
from sftcore.data import DATA_FORMATS, TRAIN_ON
from sftcore.dataset import VALIDATION_LINES_KEPT
from sftcore.masking import HISTORY_REWRITES, OVERFLOW, EncodeOptions
from sftcore.storage import StoragePath


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


@dataclass
class TrainConfig:
    data_path: str = _opt(
        None,
        "trajectory rows (required; their shapes: --data_format): JSONL files (.jsonl, .jsonl.gz, "
        ".jsonl.zst), Parquet files, datasets' save_to_disk folders, directories of them, globs "
        "('data/**/*.jsonl'), URIs (s3://, gs://, any pyarrow filesystem) or hub datasets (hf://datasets/ORG/NAME), "
        "comma-separated; 'SOURCE:WEIGHT' trains that source's rows WEIGHT times per epoch "
        "(0.5: a seeded half of them)",
    )
    data_format: str = _opt(
        "auto",
        "the rows' shape: rows ({input, output}), messages (OpenAI / TRL {messages, tools}, or {prompt, "
        "completion}), sharegpt ({conversations: [{from, value}], system, tools}); auto tells them apart by "
        "their keys, row by row",
        DATA_FORMATS,
    )
    model_name_or_path: str = _opt(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "hub id, local HF directory, or the bundled offline model 'smollm2-135m-instruct'",
    )
    output_dir: str = _opt(
        "checkpoints/sft",
        "where checkpoint-{step}/, final/ and metrics.jsonl land: a directory, or a bucket URI (s3://, gs://)",
    )
    use_lora: bool = _opt(False, "train a LoRA adapter instead of all weights")
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA alpha")
    lora_dropout: float = _opt(
        0.0, "LoRA dropout on each adapted layer's input (0 skips the dropped-out copy of every such input)"
    )
    lora_target_modules: str = _opt("all-linear", "comma-separated module names, or 'all-linear'")
    num_epochs: int = _opt(3, "passes over the training split (ignored when --max_steps is set)")
    max_steps: int | None = _opt(None, "total optimizer steps; overrides --num_epochs")
    validation_split: float = _opt(
        0.1,
        "fraction of valid rows held out for evaluation, chosen per row by a seeded hash of its file and line (so "
        "about this fraction, at least one row; 0 disables eval)",
    )
    per_device_batch_size: int = _opt(
        2,
        "sequences per micro-batch on each worker (packs of up to --max_seq_length tokens, or samples)",
    )
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step on each worker")
    max_seq_length: int = _opt(
        4096, "longest training sequence in tokens; turns that do not fit with their history follow --overflow"
    )
    overflow: str = _opt(
        "window",
        "a turn whose history does not fit --max_seq_length: window: train it with the system prompt, the first "
        "user message and recent history (--window_slack); truncate: drop it (and every later turn of the row)",
        OVERFLOW,
    )
    window_slack: float = _opt(
        0.5,
        "with --overflow window: the share of a shortened history's room for recent messages that it leaves to "
        "the turns after it, so that they train over the same start (one prefix tree) instead of one sequence "
        "each; each such turn keeps at least the rest; 0: each turn the most recent history that fits",
    )
    history_rewrites: str = _opt(
        "split",
        "for chat templates that render earlier turns differently once later turns follow (Qwen3, gpt-oss, ...): "
        "split: train each turn in the context it has at inference (a row becomes several samples); refuse: "
        "reject such rows",
        HISTORY_REWRITES,
    )
    train_on: str = _opt(
        "all",
        "assistant messages of 'output' to train (each may opt out with \"train\": false): all; last: only the "
        "last; final: only those after the last user message",
        TRAIN_ON,
    )
    chat_template: str | None = _opt(
        None,
        "set or replace the model's chat template: a Jinja file, or one shipped with sftcore ('chatml'); saved "
        "with the tokenizer in every checkpoint and final/",
    )
    packing: bool = _opt(
        True, "pack whole samples into sequences of --max_seq_length tokens (samples never attend to each other)"
    )
    tree_packing: str = _opt(
        "auto",
        "auto: merge each row's samples into prefix trees (shared prefixes stored once, each token attending to "
        "its ancestors only: the same losses and gradients as the samples, at a fraction of their tokens), where "
        "the attention computes them (packed_sdpa, packed_varlen; auto picks one of them but for models with "
        "soft-capped or sliding-window attention); off: train the samples as they are",
        ("auto", "off"),
    )
    attn_implementation: str = _opt(
        "auto",
        "attention kernel. packed_sdpa: causal sdpa over each sample (each tree segment over its ancestors), no "
        "pack-wide mask (memory grows with the sample, not the pack squared); packed_varlen: the same in one call of "
        "torch's varlen flash kernel (CUDA, torch >= 2.10); packed_eager: the model's own eager attention over each "
        "sample (sinks, soft-capping, sliding windows), no trees; sdpa / eager: transformers' own, with a block mask "
        "for packs, no trees; flash_attention_2 needs flash-attn, no trees. auto: on CUDA flash_attention_2 when "
        "installed and no trees, else packed_varlen; elsewhere packed_sdpa; packed_eager for models whose attention "
        "computes more than causal softmax (gpt-oss, Gemma-2/3, Cohere2, sliding windows)",
        ATTENTION_CHOICES,
    )
    gradient_checkpointing: bool | None = _opt(
        None,
        "recompute activations in backward: less memory, about a third more compute (default: on when training on "
        "CPU, where memory runs out first; off on GPUs)",
    )
    tiled_mlp: bool = _opt(
        False,
        "run each layer's MLP over the sequence in tiles of 4,096 tokens, each recomputed in backward (ALST): less "
        "activation memory per token for long trajectories, for one more MLP forward; dense MLPs only",
    )
    torch_compile: bool = _opt(False, "torch.compile the model (GPU; the first steps are slow while it compiles)")
    learning_rate: float = _opt(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    lr_scheduler: str = _opt("cosine", "learning-rate schedule after warmup", ("cosine", "linear", "constant"))
    warmup_ratio: float = _opt(0.03, "fraction of total steps spent warming up linearly from 0")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    seed: int = _opt(42, "seed for the split, shuffling and initialisation")
    save_steps: int = _opt(100, "checkpoint every N optimizer steps (and at the end)")
    save_total_limit: int = _opt(3, "keep the newest N checkpoint-{step} directories (at least 1)")
    eval_steps: int | None = _opt(None, "evaluate every N steps (default: --save_steps); always at the end")
    logging_steps: int = _opt(1, "log training metrics every N steps")
    eval_generate_rows: int = _opt(
        0,
        "at each evaluation, also generate each assistant turn of N validation rows and score the next action "
        "(tool name, arguments, answer: workflows/evaluate.py's metrics, as eval_*)",
    )
    eval_max_new_tokens: int = _opt(256, "longest generation per turn for --eval_generate_rows")
    resume: str = _opt(
        "auto",
        "auto: continue from the newest checkpoint in output_dir; never: refuse a non-empty output_dir",
        ("auto", "never"),
    )
    on_bad_rows: str = _opt(
        "error",
        "malformed rows: error: stop before training and list them; skip: train on the valid rows (either way, "
        "output_dir/rejected_rows.jsonl lists every line, turn or text not trained, with its reason)",
        ("error", "skip"),
    )
    max_failures: int = _opt(
        0, "restart from the newest checkpoint up to N times when a worker dies or errors (-1: no limit)"
    )
    max_bad_steps: int = _opt(
        5, "stop after N consecutive steps with a non-finite loss or gradient (such steps are skipped)"
    )
    verbose: bool = _opt(
        False, "also show Ray's and the libraries' own logs on the console (they are always in Ray's log files)"
    )
    report_to: str = _opt("wandb", "wandb (offline when no API key) or none", ("wandb", "none"))
    wandb_project: str = _opt("sft-trajectory", "wandb project name")
    strategy: str = _opt(
        "ddp",
        "ddp: each worker holds the whole model; fsdp: weights, gradients and optimizer state sharded over "
        "workers (FSDP2, full fine-tuning), for models that do not fit one device",
        ("ddp", "fsdp"),
    )
    num_workers: int = _opt(
        1,
        "Ray Train workers (one per GPU on GPU machines); under torchrun, its process count instead",
        aliases=("--num-workers",),
    )
    sequence_parallel: int = _opt(
        1,
        "workers that share each pack, each holding 1/N of its tokens outside attention (Ulysses: an all-to-all "
        "gives each the whole sequence for 1/N of the heads): activations of samples N times longer in the same "
        "memory per worker. Must divide --num-workers; --max_seq_length is the whole pack",
    )
    use_gpu: bool | None = _opt(None, "train on GPUs (default: when the cluster has them)")
    cpus_per_worker: int | None = _opt(None, "CPUs per worker (default: 1 with GPUs, else all CPUs / workers)")
    placement_strategy: str = _opt(
        "PACK",
        "where Ray places workers: PACK fills a node first (fast links); SPREAD puts them on different nodes",
        ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    )
    gpus_per_worker: float = _opt(
        1.0,
        "GPUs each worker reserves on GPU runs; a worker trains on one, so more only holds the rest idle "
        "(NCCL cannot share a GPU between workers)",
    )
    address: str | None = _opt(None, "Ray cluster to join (default: $RAY_ADDRESS, else start Ray in-process)")
    trust_remote_code: bool = _opt(False, "allow model repos to run their own Python code")

    def __post_init__(self) -> None:
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        at_least_one = (
            "num_workers",
            "sequence_parallel",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "save_steps",
            "save_total_limit",
            "eval_steps",
            "logging_steps",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.strategy == "fsdp" and self.use_lora:
            raise ValueError(
                "--strategy fsdp shards full fine-tuning; a LoRA adapter is small, so train it with --strategy ddp "
                "(or drop --use_lora)"
            )
        if self.eval_generate_rows and self.strategy == "fsdp":
            raise ValueError(
                "--eval_generate_rows generates on each worker's own copy of the model, which --strategy fsdp "
                "does not have; use --strategy ddp, or evaluate final/ with workflows/evaluate.py"
            )
        if not 0 <= self.eval_generate_rows <= VALIDATION_LINES_KEPT:
            raise ValueError(
                f"--eval_generate_rows must be 0 to {VALIDATION_LINES_KEPT} (generating on more rows takes longer than "
                f"the training steps between evaluations), got {self.eval_generate_rows}"
            )
        if self.sequence_parallel > 1 and self.torch_compile:
            raise ValueError("--torch_compile with --sequence_parallel is untested: drop one of them")
        if self.gpus_per_worker < 1:
            raise ValueError(f"--gpus_per_worker must be at least 1, got {self.gpus_per_worker}")
        for name in ("validation_split", "window_slack"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def data_parallel(self) -> int:
        """How many groups of workers train different packs (each worker, without sequence parallelism)."""
        return self.num_workers // self.sequence_parallel

    def trains_trees(self, model_config: Any) -> bool:
        """Whether rows train as prefix trees with this model (sftcore.attention.trains_trees)."""
        return trains_trees(self.attn_implementation, self.tree_packing, model_config, self.max_seq_length)

    def encode_options(self, trees: bool = False) -> EncodeOptions:
        """How rows become training sequences (sftcore.masking; ``trees``: sftcore.attention.trains_trees)."""
        return EncodeOptions(
            self.max_seq_length,
            self.history_rewrites,
            self.overflow,
            self.train_on,
            self.window_slack,
            trees,
            self.data_format,
        )


# The options that decide what a row renders into: the tools that show or score training's samples
# (workflows/inspect_data.py, workflows/evaluate.py) take them too, with training's defaults.
RENDERING_OPTIONS = (
    "data_path",
    "data_format",
    "model_name_or_path",
    "max_seq_length",
    "overflow",
    "window_slack",
    "history_rewrites",
    "train_on",
    "chat_template",
    "trust_remote_code",
)

# The options that decide which sequences each worker gets at each step. A checkpoint's place in the
# data counts batches of its run's plan: resumed under another plan it would replay other rows, or run
# past the end of an epoch. (--max_steps and --num_epochs may grow: the run then continues.)
DATA_PLAN = (
    "strategy",
    "num_workers",
    "sequence_parallel",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "overflow",
    "window_slack",
    "history_rewrites",
    "train_on",
    "packing",
    "tree_packing",
    "validation_split",
    "seed",
)


def plan_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The data-plan options that differ from the saved run's, as ``--name saved (now new)``."""
    flags = {f.name: (f.metadata["aliases"] or (f"--{f.name}",))[0] for f in dataclasses.fields(TrainConfig)}
    return [
        f"{flags[name]} {saved[name]} (now {getattr(cfg, name)})"
        for name in DATA_PLAN
        if name in saved and saved[name] != getattr(cfg, name)
    ]


RESOLVED_CONFIG_FILE = "train_config.yaml"  # in output_dir: every option of the run, for --config


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _checked_value(name: str, kind: str, choices: tuple[str, ...] | None, value: Any) -> Any:
    """A YAML value for field ``name`` of type ``kind`` (its annotation, as text), or ValueError saying why not."""
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}: needs a value")
    if kind.startswith("bool"):
        ok, what = isinstance(value, bool), "true or false"
    elif kind.startswith(("int", "float")):
        number = int if kind.startswith("int") else float
        what = "an integer" if number is int else "a number"
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as text
            with contextlib.suppress(ValueError):
                value = number(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and (number is float or value == int(value))
        value = number(value) if ok else value
    else:
        ok, what = isinstance(value, str), "a string"
    if not ok:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    if choices and value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def read_config_file(path: str, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The TrainConfig options a YAML file sets, checked: every key must be an option (a typo is an error
    that names the closest one) with a value of its type. ``only``: the options a tool uses; the file's
    other training options are valid but ignored, so that one run config serves every tool."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(loaded).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    aliases = {alias.lstrip("-").replace("-", "_"): f.name for f in fields.values() for alias in f.metadata["aliases"]}
    values = {}
    for key, value in loaded.items():
        name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else " (python workflows/train.py --help lists them)"
            raise ValueError(f"--config {path}: unknown option {key!r}{hint}")
        if only is not None and name not in only:
            continue
        try:
            values[name] = _checked_value(name, str(fields[name].type), fields[name].metadata["choices"], value)
        except ValueError as e:
            raise ValueError(f"--config {path}: {e}") from None
    return values


def save_resolved_config(cfg: TrainConfig, output_dir: str | os.PathLike | StoragePath) -> StoragePath:
    """Every option of this run, defaults included, as --config reads it: ``--config`` with this file
    (and a new --output_dir) reproduces the run."""
    path = StoragePath.of(output_dir) / RESOLVED_CONFIG_FILE
    header = "# Every option of this run; `python workflows/train.py --config THIS_FILE` runs it again.\n"
    path.write_text(header + yaml.safe_dump(asdict(cfg), sort_keys=False, allow_unicode=True, width=120))
    return path


def add_config_arguments(
    parser: argparse.ArgumentParser,
    only: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
    argv: list[str] | None = None,
) -> None:
    """One flag per TrainConfig field (or per field in ``only``), with its help, type, choices and default
    (``defaults`` overrides some, for tools that share a few of training's options), and ``--config
    FILE``, whose options (read from ``argv``, checked) become the defaults that flags override."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML file of options (any of the flags below, without the dashes); flags given as well override it",
    )
    found, _ = _config_flag_parser().parse_known_args(argv)
    try:
        from_file = read_config_file(found.config, only) if found.config else {}
    except ValueError as e:
        parser.error(str(e))
    defaults = {**(defaults or {}), **from_file}
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        names = [f"--{f.name}", *f.metadata["aliases"]]
        default = defaults.get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": default}
        kind = str(f.type)
        if "bool" in kind:
            # `--use_lora` alone means true; `--use_lora false` is accepted too.
            kwargs.update(nargs="?", const=True, type=_parse_bool)
        elif "int" in kind:
            kwargs["type"] = int
        elif "float" in kind:
            kwargs["type"] = float
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "data_path" and default is None:
            kwargs["required"] = True
        if default is not None and f.name != "data_path":
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(*names, **kwargs)


def _config_flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    return parser


def build_parser(description: str = "", argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, argv=argv)
    return parser


def parse_config(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    parser = build_parser(description, argv)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    try:
        return TrainConfig(**args)
    except ValueError as e:
        parser.error(str(e))  # usage line + one-line error, exit code 2
