"""Shared fixtures: the bundled tokenizer under several chat-template families, and the real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sftcore.models import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
SHARED_DATA = Path(os.environ.get("SFTCORE_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_DATA_FILES = [SHARED_DATA / "taubench_airline_dev.jsonl", SHARED_DATA / "fireact_hotpotqa.jsonl"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return _tokenizer_with_template(template_text("qwen25"))


@pytest.fixture(scope="session")
def think_tokenizer():
    return _tokenizer_with_template(template_text("think_strip"))
