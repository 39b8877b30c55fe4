"""sftcore: supervised fine-tuning of language models on agent trajectories."""

from sftcore.data import Conversation, DataError, parse_row
from sftcore.masking import IGNORE_INDEX, EncodedRow, EncodeOptions, Sample, encode_conversation, encode_row
from sftcore.models import load_tokenizer, resolve_model_path
from sftcore.sources import read_jsonl

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataError",
    "EncodeOptions",
    "EncodedRow",
    "Sample",
    "encode_conversation",
    "encode_row",
    "load_tokenizer",
    "parse_row",
    "read_jsonl",
    "resolve_model_path",
]
