"""The engine/trainer split for `sampler.devices` (the vLLM engine on devices of its own). The GPU cases are
computed from given GPU counts and CUDA_VISIBLE_DEVICES values, as no GPU is here; the CPU binding is
applied for real (tests/test_vllm.py runs an engine and a loop with it)."""

from __future__ import annotations

import os

import pytest
import torch

from alignloop.config import ConfigError, load_config
from alignloop.sampling.placement import PlacementError, cpu_thread_binding, process_cores, split_devices, trainer_on


def test_gpu_split_engine_gets_its_gpus_trainer_the_first_other():
    p = split_devices([2, 3], 2, gpu_count=4, visible=None, cores=[0, 1])
    assert p.on_gpu and p.engine_env == {"CUDA_VISIBLE_DEVICES": "2,3"} and p.trainer_devices == (0,)
    p = split_devices([0], 1, gpu_count=2, visible=None, cores=[0, 1])
    assert p.trainer_devices == (1,)  # the engine may take cuda:0; the trainer moves over


def test_gpu_indices_mean_what_cuda_i_means_under_a_narrowed_visible_list():
    p = split_devices([1], 1, gpu_count=3, visible="4,6,7", cores=[0])
    assert p.engine_env == {"CUDA_VISIBLE_DEVICES": "6"} and p.trainer_devices == (0,)
    p = split_devices([0], 1, gpu_count=2, visible="GPU-aaaa, GPU-bbbb", cores=[0])
    assert p.engine_env == {"CUDA_VISIBLE_DEVICES": "GPU-aaaa"} and p.trainer_devices == (1,)


@pytest.mark.parametrize("devices, tp, count, message", [
    ([2], 1, 2, "no GPU 2 here"),
    ([0, 1], 2, 2, "leaves none for the trainer"),
    ([1, 2], 1, 4, "lists 2 GPUs for an engine with tensor_parallel_size 1"),
])
def test_gpu_splits_that_cannot_work_are_refused(devices, tp, count, message):
    with pytest.raises(PlacementError, match=message):
        split_devices(devices, tp, gpu_count=count, visible=None, cores=[0, 1])


def test_cpu_split_binds_engine_threads_and_leaves_the_rest():
    p = split_devices([2, 3], 1, gpu_count=0, visible=None, cores=[0, 1, 2, 3])
    assert not p.on_gpu and p.trainer_devices == (0, 1)
    assert p.engine_env == {"VLLM_CPU_OMP_THREADS_BIND": "2,3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert p.describe() == {"engine": {"cores": [2, 3]}, "trainer": {"cores": [0, 1]}}
    with pytest.raises(PlacementError, match="core 5 is not one this process may use"):
        split_devices([5], 1, gpu_count=0, visible=None, cores=[0, 1])
    with pytest.raises(PlacementError, match="takes every core"):
        split_devices([0, 1], 1, gpu_count=0, visible=None, cores=[0, 1])


def test_cpu_thread_binding_gives_each_tensor_parallel_rank_its_own_cores():
    assert cpu_thread_binding([0, 1, 2, 3], 1) == "0,1,2,3"
    assert cpu_thread_binding([4, 5, 6, 7, 8], 2) == "4,5|6,7"
    with pytest.raises(PlacementError):
        cpu_thread_binding([0], 2)


def test_devices_config_is_validated_and_saved():
    from alignloop.config import dump_config

    assert "devices:\n  - 1" in dump_config(load_config(None, ["sampler.backend=vllm", "sampler.devices=[1]"]))
    for bad, message in ((["sampler.backend=hf", "sampler.devices=[1]"], "needs backend 'vllm'"),
                         (["sampler.backend=vllm", "sampler.devices=[1, 1]"], "distinct"),
                         (["sampler.backend=vllm", "sampler.devices=[]"], "distinct")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_trainer_on_binds_every_thread_of_this_process_then_restores():
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    keep = min(cores)
    p = split_devices(sorted(cores - {keep}), 1, gpu_count=0, visible=None, cores=sorted(cores))
    with trainer_on(p):
        for tid in os.listdir("/proc/self/task"):
            assert os.sched_getaffinity(int(tid)) == {keep}
        assert process_cores() == {keep} and torch.get_num_threads() == 1
    assert process_cores() == cores and torch.get_num_threads() == threads


def test_under_a_launcher_each_process_takes_its_own_slice_of_the_cores(monkeypatch):
    """`launched_placement`: process k of N on a node gets the k-th of N equal slices of the usable cores for
    its engine (in the process itself) and its trainer alike (the GPU case, one GPU per LOCAL_RANK, needs a
    GPU and is not run here)."""
    from alignloop.config import VLLMSamplerConfig
    from alignloop.sampling import placement

    monkeypatch.setattr(placement, "usable_cores", lambda: [0, 1, 2, 3, 4])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, cores in (("0", (0, 1)), ("1", (2, 3))):
        monkeypatch.setenv("LOCAL_RANK", rank)
        p = placement.launched_placement(VLLMSamplerConfig())
        assert p.colocated and p.launched and p.engine_devices == p.trainer_devices == cores
        # a tensor-parallel engine of both processes: each process's shard on the same slice
        assert placement.launched_placement(VLLMSamplerConfig(tensor_parallel_size=2)) == p
    with pytest.raises(PlacementError, match="tensor_parallel_size 4 must divide the number of processes per node"):
        placement.launched_placement(VLLMSamplerConfig(tensor_parallel_size=4))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(PlacementError, match="5 cores cannot give each of 8 processes one"):
        placement.launched_placement(VLLMSamplerConfig())
    with pytest.raises(PlacementError, match="sampler.devices places the engine of a single process"):
        placement.launched_placement(VLLMSamplerConfig(devices=[1]))
