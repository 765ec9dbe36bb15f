"""The processes of one run, started by `torchrun` or `accelerate launch` (SPMD: every process runs the same
program on its share of the work), or a single process when started plainly.

A launcher describes the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); `init`
joins it with gloo on a CPU and NCCL on GPUs, with a timeout on every collective, so a process whose peer
died fails with an error instead of waiting forever. Everything here is also correct for one process, where
it does no communication at all.

The run directory lives on a filesystem every process sees. Only the main process writes record files and
the manifest; what the others need to know of them (a stage's manifest entry, say) they receive from it
through `broadcast`, so they never act on a file another node's cache shows stale.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "ALIGNLOOP_TIMEOUT_MINUTES"
# Waiting for the main process's one-process stages (an API judge labeling a large round) can take long;
# a dead peer is normally noticed sooner by the launcher, which stops every process when one fails.
DEFAULT_TIMEOUT_MINUTES = 60


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the launcher's process group (once; a no-op for a single process)."""
    if not launched() or dist.is_initialized():
        return
    # Under an accelerate FSDP config, transformers would load real weights on the first process only and
    # leave the others' empty for FSDP to fill in; every process here loads whole models (sampler, reward
    # model, reference) and shards the policy itself.
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MINUTES))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # object collectives go through the CPU, tensors through NCCL
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(value: T) -> T:
    """The main process's `value`, on every process."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(compute: Callable[[], T]) -> T:
    """`compute()` run by the main process alone, its result (or its error) on every process."""
    result, error = None, None
    if is_main():
        try:
            result = compute()
        except Exception as e:  # the others must not wait for a result that will never come
            error = e
            if world() == 1:
                raise
    result, failed = broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"the main process failed: {failed}")
    return result


def my_share(count: int) -> list[int]:
    """The indices of `count` work items this process takes: every world()-th one, starting at its rank."""
    return list(range(rank(), count, world()))


def gather_shares(count: int, mine: list[Any]) -> list[Any]:
    """All `count` results in order, on every process, from each process's results for `my_share(count)`."""
    if world() == 1:
        return mine
    merged: list[Any] = [None] * count
    for r, share in enumerate(gather_objects(mine)):
        merged[r::world()] = share
    return merged


def gather_objects(value: T) -> list[T]:
    """Every process's `value`, in rank order, on every process."""
    if world() == 1:
        return [value]
    values: list[T | None] = [None] * world()
    dist.all_gather_object(values, value)
    return values  # type: ignore[return-value]


def sum_over_processes(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over all processes (float64)."""
    if world() == 1:
        return list(values)
    device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --------------------------------------------------------------------------------------------------------------
# The policy across processes while it trains
# --------------------------------------------------------------------------------------------------------------

STRATEGIES = ("auto", "ddp", "fsdp")


def strategy(configured: str) -> str:
    """How the trainer spreads the policy: "none" (one process), "ddp" (a whole copy per process, gradients
    averaged) or "fsdp" (FSDP2: parameters, gradients and moments sharded). "auto" takes what an `accelerate
    launch` config asks for (FSDP), else DDP."""
    if world() == 1:
        return "none"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("DeepSpeed is not supported by alignloop's trainer; shard with FSDP2 instead "
                         "(optim.strategy: fsdp, or an accelerate config with distributed_type: FSDP)")
    if configured == "auto":
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"
    return configured


def device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def parallelize(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """The model, on this process's device, wrapped for `how` (see `strategy`). FSDP2 shards each transformer
    block (the classes a HF model names in `_no_split_modules`) and then the rest of the model."""
    model = model.to(device())
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device().index] if device().type == "cuda" else None)
    if how == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device().type, (world(),))
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without DDP's wrapper (an FSDP2 model is its own module)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: gradients are averaged among the processes only
    on the micro-batch that completes an optimizer step (`sync`), and accumulate locally before it."""
    import contextlib

    if sync or world() == 1:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-batch
        @contextlib.contextmanager
        def deferred():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return deferred()
    return contextlib.nullcontext()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
