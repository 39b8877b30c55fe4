"""TrainConfig is the one source of truth for flags: the CLI, its validation and the table in docs/flags.md."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from sftcore.config import TrainConfig, parse_config, read_config_file, save_resolved_config


def test_every_flag_is_in_the_docs_flags_table_with_its_help_and_default():
    table = REPO.joinpath("docs", "flags.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `--")}
    fields = dataclasses.fields(TrainConfig)
    assert len(rows) == len(fields)
    for f in fields:
        names = " / ".join(f"`{n}`" for n in [f"--{f.name}", *f.metadata["aliases"]])
        assert names in rows, f"docs/flags.md has no row for {names}"
        row = rows[names]
        assert f.metadata["help"] in row, f"docs/flags.md's help for --{f.name} differs from --help"
        default = "required" if f.name == "data_path" else ("auto" if f.default is None else f"`{f.default}`")
        assert row.split("|")[2].strip() == default, f"docs/flags.md's default for --{f.name}"


def test_aliases_and_booleans_parse():
    cfg = parse_config(["--data_path", "x.jsonl", "--num-workers", "3", "--use_lora", "--use_gpu", "false"])
    assert (cfg.num_workers, cfg.use_lora, cfg.use_gpu) == (3, True, False)
    assert cfg.eval_steps == cfg.save_steps


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--save_total_limit", "0", "--save_total_limit must be at least 1, got 0"),
        ("--per_device_batch_size", "0", "--per_device_batch_size must be at least 1, got 0"),
        ("--validation_split", "1", "--validation_split must be in [0, 1), got 1.0"),
        ("--window_slack", "-0.5", "--window_slack must be in [0, 1), got -0.5"),
        ("--gpus_per_worker", "0.5", "--gpus_per_worker must be at least 1, got 0.5"),
    ],
)
def test_invalid_values_are_a_usage_error_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data_path", "x.jsonl", flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_fsdp_with_lora_is_refused_with_what_to_do_instead(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--data_path", "x.jsonl", "--strategy", "fsdp", "--use_lora"])
    assert exit_info.value.code == 2
    assert "train it with --strategy ddp" in capsys.readouterr().err


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_a_config_file_sets_options_and_flags_override_it(tmp_path):
    config = write_config(
        tmp_path,
        "data_path: rows.jsonl\nnum-workers: 2\nuse_lora: true\nlearning_rate: 1e-4\nmax_steps: 7\nuse_gpu: null\n",
    )
    cfg = parse_config(["--config", config, "--max_steps", "9"])
    assert (cfg.data_path, cfg.num_workers, cfg.use_lora, cfg.max_steps) == ("rows.jsonl", 2, True, 9)
    assert cfg.learning_rate == 1e-4  # YAML reads 1e-4 as text; it is a number here
    assert cfg.lora_r == TrainConfig.lora_r  # what the file leaves out keeps its default


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rte: 0.1\n", "unknown option 'learning_rte'; did you mean 'learning_rate'?"),
        ("zzz: 1\n", "unknown option 'zzz' (python workflows/train.py --help lists them)"),
        ("lora_r: eight\n", "lora_r: expected an integer, got 'eight'"),
        ("lora_r: 2.5\n", "lora_r: expected an integer, got 2.5"),
        ("use_lora: 1\n", "use_lora: expected true or false, got 1"),
        ("strategy: zero3\n", "strategy: 'zero3' is not one of ddp, fsdp"),
        ("lora_r: null\n", "lora_r: needs a value"),
        ("- data_path\n", "expected a mapping of option: value, got list"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_config_file_mistakes_are_one_usage_error_naming_the_file_and_option(tmp_path, text, message, capsys):
    config = write_config(tmp_path, "data_path: rows.jsonl\n" + text if not text.startswith("-") else text)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", config])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: --config {config}: " in last and message in last


def test_a_saved_resolved_config_reads_back_as_the_same_config(tmp_path):
    cfg = parse_config(["--data_path", "rows.jsonl", "--use_lora", "--chat_template", "{{ messages }}\n"])
    saved = save_resolved_config(cfg, tmp_path)
    assert saved.name == "train_config.yaml"
    assert parse_config(["--config", str(saved)]) == cfg


@pytest.mark.parametrize("example", sorted(REPO.joinpath("examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(example):
    cfg = parse_config(["--config", str(example)])
    assert cfg.data_path and read_config_file(str(example))
