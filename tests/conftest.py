"""Shared fixtures: the bundled tokenizer under several chat-template families, and the real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

# No test reaches the Hugging Face hub (huggingface_hub reads this once, when it is first imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sftcore.models import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
DATA = Path(__file__).resolve().parent / "data"  # real trajectories, shipped with the tests (data/README.md)
REAL_DATA_FILES = [DATA / "taubench_airline_dev.jsonl", DATA / "fireact_hotpotqa.jsonl"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def trained_texts(sample, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens of a sample."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def template_text(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def real_rows() -> list[tuple[str, int, dict]]:
    rows = []
    for path in REAL_DATA_FILES:
        with path.open() as f:
            rows += [(path.name, n, json.loads(line)) for n, line in enumerate(f, start=1)]
    return rows


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def _tokenizer_with_template(template: str, special_tokens: list[str] | None = None):
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    if special_tokens:
        tokenizer.add_tokens(special_tokens, special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


# name -> (template file, its {% generation %}-tagged twin for the independent expectation, extra special tokens)
TEMPLATE_FAMILIES = {
    "smollm2_chatml": (None, "smollm2_generation", None),
    "qwen25_tools": ("qwen25", "qwen25_generation", None),
    "llama3_headers": ("llama3", "llama3_generation", LLAMA3_SPECIAL),
    "think_strip": ("think_strip", "think_strip_generation", None),
}


@pytest.fixture(scope="session", params=list(TEMPLATE_FAMILIES))
def family(request):
    """(name, tokenizer, generation-tagged template) for each chat-template family under test."""
    template, tagged, special = TEMPLATE_FAMILIES[request.param]
    if template is None:
        tokenizer = load_tokenizer("smollm2-135m-instruct")
    else:
        tokenizer = _tokenizer_with_template(template_text(template), special)
    return request.param, tokenizer, template_text(tagged)


# name -> verbatim template file, bos, eos and the family's special tokens (added to the SmolLM2 tokenizer
# so that each marker is one token, as in the family's own tokenizer)
OFFICIAL_FAMILIES = json.loads((TEMPLATES / "families.json").read_text(encoding="utf-8"))
_official_tokenizers: dict = {}


def official_tokenizer(name: str):
    """The SmolLM2 tokenizer with a model family's verbatim chat template, special tokens, BOS and EOS."""
    if name not in _official_tokenizers:
        family = OFFICIAL_FAMILIES[name]
        bos, eos = family["bos"], family["eos"]
        special = family["special_tokens"] + [t for t in (bos, eos) if t]
        tokenizer = _tokenizer_with_template(template_text(family["template"]), special)
        if bos:
            tokenizer.bos_token = bos
        tokenizer.eos_token = eos
        _official_tokenizers[name] = tokenizer
    return _official_tokenizers[name]


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return _tokenizer_with_template(template_text("qwen25"))


@pytest.fixture(scope="session")
def think_tokenizer():
    return _tokenizer_with_template(template_text("think_strip"))


# --- training runs (tests/test_train.py, tests/test_faults.py) ---


def tiny_llama_config(vocab_size: int, max_position_embeddings: int = 2048, **extra):
    """A 2-layer Llama config, 4 query heads over 2 key/value heads (grouped-query attention) unless
    extra says otherwise."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=max_position_embeddings,
        **{"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, **extra},
    )


def save_tiny_model(path: Path, tokenizer, poisoned_token_id: int | None = None) -> str:
    """A 2-layer random model with SmolLM2's architecture and tokenizer (ChatML template). With
    poisoned_token_id, that token's input embedding is inf, so any row containing it has a NaN loss."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer),
        tie_word_embeddings=poisoned_token_id is None,  # a poisoned tied head would poison every row
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    if poisoned_token_id is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[poisoned_token_id] = float("inf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), smollm2_tokenizer)


def write_rows(path, count: int) -> str:
    rows = [
        {
            "input": f"Question {i}: what is {i} + {i}?",
            "output": [
                {"role": "assistant", "content": f"Thought: add them.\nAction: calc[{i}+{i}]"},
                {"role": "user", "content": f"Observation: {2 * i}"},
                {"role": "assistant", "content": "The answer is " + str(2 * i) + "." * (i % 5 + 1)},
            ],
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_command(output_dir, *args: str) -> list[str]:
    return [sys.executable, "workflows/train.py", "--output_dir", str(output_dir), *args]


def train_env(env: dict[str, str | None] | None = None) -> dict[str, str]:
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return {k: v for k, v in full_env.items() if v is not None}  # None: unset


def train(output_dir, *args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """workflows/train.py run to completion in a subprocess (its own in-process Ray)."""
    return subprocess.run(
        train_command(output_dir, *args), cwd=REPO, capture_output=True, text=True, timeout=600, env=train_env(env)
    )


def losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


COMMON = [
    "--validation_split",
    "0",
    "--lr_scheduler",
    "constant",
    "--warmup_ratio",
    "0",
    "--learning_rate",
    "1e-3",
    "--max_seq_length",
    "256",
]


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 server (moto's server mode) on loopback with an empty bucket; the AWS_* variables that
    point pyarrow and boto3 at it are set for this test and the processes it starts. Yields a boto3 client
    and the bucket's name."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    # moto keeps its buckets in this process's memory, across servers: start each test from none
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    client = boto3.client("s3")
    client.create_bucket(Bucket="trajectories")
    try:
        yield client, "trajectories"
    finally:
        server.stop()


@pytest.fixture(params=["local", "bucket"])
def output_dir(request, tmp_path):
    """An empty OUTPUT_DIR as a StoragePath: a local directory, or a prefix in a real S3 server's bucket."""
    from sftcore.storage import StoragePath

    if request.param == "local":
        return StoragePath.of(tmp_path / "run")
    _, bucket = request.getfixturevalue("s3_bucket")
    return StoragePath.of(f"s3://{bucket}/runs/run")
