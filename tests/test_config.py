"""TrainConfig is the one source of truth for flags: the CLI, its validation and the README table."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from sftcore.config import TrainConfig, parse_config


def test_every_flag_is_in_the_readme_table_with_its_help_and_default():
    readme = REPO.joinpath("README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `--")}
    fields = dataclasses.fields(TrainConfig)
    assert len(rows) == len(fields)
    for f in fields:
        names = " / ".join(f"`{n}`" for n in [f"--{f.name}", *f.metadata["aliases"]])
        assert names in rows, f"README has no row for {names}"
        row = rows[names]
        assert f.metadata["help"] in row, f"README's help for --{f.name} differs from --help"
        default = "required" if f.name == "data_path" else ("auto" if f.default is None else f"`{f.default}`")
        assert row.split("|")[2].strip() == default, f"README's default for --{f.name}"


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
