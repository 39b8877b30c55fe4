"""Real vocabularies for the tests, built offline from llama.cpp's vocab-only GGUFs (tests/vocabs/SOURCES.md).

Each GGUF (stored xz-compressed) becomes a Hugging Face fast tokenizer once, cached on disk; the build is
checked against llama.cpp's own test vectors (the ``.inp``/``.out`` files beside it, made with each
model's Hugging Face tokenizer), so a vocabulary that tokenizes differently from its model's never
reaches a test. A model family's tokenizer is then its vocabulary with the family's added tokens at
their ids (tests/vocabs/families.json), its BOS/EOS and its verbatim chat template.

Byte-level BPE vocabularies are built here with ``tokenizers`` from the GGUF's tokens and merges and
llama.cpp's pre-tokenizer regexes (transformers' GGUF reader knows no Command-R and gives DeepSeek
the GPT-2 regex); SentencePiece ones (Phi-3) go through transformers' GGUF reader.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import shutil
import tempfile
from functools import cache
from pathlib import Path

from sftcore.models import cache_dir

VOCABS = Path(__file__).resolve().parent / "vocabs"
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
REAL_FAMILIES = json.loads((VOCABS / "families.json").read_text(encoding="utf-8"))

# llama.cpp's pre-tokenizer regexes by the GGUF's tokenizer.ggml.pre (src/llama-vocab.cpp, llama.cpp as
# vendored by llama-cpp-python 0.3.36): each splits the pieces of the one before.
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZER_REGEXES = {
    "qwen2": [_QWEN2],
    "llama-bpe": [_LLAMA3],
    "deepseek-llm": [  # non-ASCII as escapes: an editor's Unicode normalization would change the ranges
        "[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-"
        "\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
        "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
        "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
        "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
        "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}+",
    ],
    "command-r": [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
}
# vocabularies whose BPE takes a pre-token found whole in the vocabulary as is (tokenizer.json "ignore_merges")
IGNORE_MERGES = {"llama-bpe"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _gguf_path(name: str, directory: Path) -> Path:
    path = directory / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        path.write_bytes(lzma.decompress((VOCABS / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    return path


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    if len(field.data) == 1 and field.types and field.types[0].name == "STRING":
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    values = [field.parts[i] for i in field.data]
    if field.types[-1].name == "STRING":
        return [bytes(v).decode("utf-8") for v in values]
    return [int(v[0]) for v in values] if len(values) > 1 else int(values[0][0])


def _byte_level_bpe(path: Path, pre: str):
    """A byte-level BPE tokenizer from a GGUF's tokens and merges, with llama.cpp's pre-tokenizer."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    added = {i for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)}
    vocab = {token: i for i, token in enumerate(tokens)}  # added tokens too: they keep their ids
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES))
    splits = [
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in PRE_TOKENIZER_REGEXES[pre]
    ]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    if pre == "command-r":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False) for i in sorted(added)])
    assert all(tokenizer.token_to_id(tokens[i]) == i for i in added), f"{path.name}: added token ids moved"
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=tokens[bos], eos_token=tokens[eos])


def vector_mismatches(tokenizer, name: str) -> list[str]:
    """llama.cpp's test vectors that this tokenizer does not reproduce (each made with the model's own
    Hugging Face tokenizer)."""
    texts = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    wrong = []
    for text, ids in zip(texts, expected, strict=False):
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != [int(i) for i in ids.split()]:
            wrong.append(f"{text[:40]!r}: {got[:10]} != {ids.split()[:10]}")
    return wrong


def _build(name: str, target: Path) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        path = _gguf_path(name, Path(scratch))
        if name in PRE_TOKENIZER_REGEXES:
            tokenizer = _byte_level_bpe(path, name)
        else:  # SentencePiece
            tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=path.name)
        wrong = vector_mismatches(tokenizer, name)
        assert not wrong, f"ggml-vocab-{name}: {len(wrong)} of llama.cpp's test vectors differ: {wrong[:3]}"
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        tokenizer.save_pretrained(staging)
        staging.rename(target)


def vocab_directory(name: str) -> Path:
    """A saved Hugging Face tokenizer of the vocabulary ``name`` (built once per version of its files)."""
    digest = hashlib.sha256(
        b"".join((VOCABS / f"ggml-vocab-{name}.gguf{ext}").read_bytes() for ext in (".xz", ".inp", ".out"))
        + Path(__file__).read_bytes()
    ).hexdigest()[:12]
    target = cache_dir() / "test-vocabs" / f"{name}-{digest}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                shutil.rmtree(target, ignore_errors=True)
                _build(name, target)
    return target


def _with_added_tokens(tokenizer, added: list[dict]):
    """The tokenizer with these added tokens at their ids (replacing the placeholder there, or appended
    where the vocabulary has no such id) and their flags (special, rstrip, lstrip)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {entry["id"]: entry for entry in state["added_tokens"]}
    vocab = state["model"]["vocab"]
    for token in added:
        entry = by_id.get(token["id"])
        if entry is None:
            assert token["id"] >= len(tokenizer), f"{token}: that id is a regular token of the vocabulary"
            entry = {"id": token["id"], "single_word": False, "normalized": False}
            state["added_tokens"].append(entry)
        elif entry["content"] in vocab and vocab[entry["content"]] == token["id"]:
            vocab[token["content"]] = vocab.pop(entry["content"])
        entry.update(
            content=token["content"],
            special=token["special"],
            rstrip=token.get("rstrip", False),
            lstrip=token.get("lstrip", False),
        )
    state["added_tokens"].sort(key=lambda e: e["id"])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)))


@cache
def real_tokenizer(family: str):
    """A model family's tokenizer on its real vocabulary (tests/vocabs/families.json)."""
    from transformers import AutoTokenizer

    spec = REAL_FAMILIES[family]
    tokenizer = _with_added_tokens(AutoTokenizer.from_pretrained(vocab_directory(spec["vocab"])), spec["added_tokens"])
    tokenizer.bos_token, tokenizer.eos_token = spec["bos"], spec["eos"]
    template = (TEMPLATES / f"{spec['template']}.jinja").read_text(encoding="utf-8")
    for old, new in spec.get("template_edits", []):  # llama.cpp's own edits undone (tests/vocabs/SOURCES.md)
        assert old in template, (family, old)
        template = template.replace(old, new)
    tokenizer.chat_template = template
    for token in spec["added_tokens"]:
        assert tokenizer.convert_tokens_to_ids(token["content"]) == token["id"], (family, token)
    return tokenizer
