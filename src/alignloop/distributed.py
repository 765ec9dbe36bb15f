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

# DeepSpeed, which libraries underneath import where it is installed, prints a warning on every start when it
# has to guess that there is no GPU; say it.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
    # The launcher's number when the group is gone: a vLLM engine under a launcher takes it down when it closes
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


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


def my_share(count: int, group_size: int = 1) -> list[int]:
    """The indices of `count` work items this process takes: every world()-th one, starting at its rank. With
    `group_size` g, the processes work in groups of g consecutive ranks (one tensor-parallel engine each) and a
    group's processes all take the group's share."""
    groups = world() // group_size
    return list(range(rank() // group_size, count, groups))


def gather_shares(count: int, mine: list[Any], group_size: int = 1) -> list[Any]:
    """All `count` results in order, on every process, from each process's results for `my_share(count,
    group_size)` (a group's first process speaks for it)."""
    if world() == 1:
        return mine
    shares = gather_objects(mine)[::group_size]
    merged: list[Any] = [None] * count
    for g, share in enumerate(shares):
        merged[g::len(shares)] = share
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

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


def strategy(configured: str) -> str:
    """How the trainer spreads the policy: "none" (one process), "ddp" (a whole copy per process, gradients
    averaged), "fsdp" (FSDP2: parameters, gradients and moments sharded) or "deepspeed" (a DeepSpeed ZeRO-2/3
    engine: moments and gradients partitioned, and under ZeRO-3 the parameters too; `deepspeed_config`).
    "auto" takes what an `accelerate launch` config asks for (FSDP or DeepSpeed), else DDP."""
    if world() == 1:
        return "none"
    if configured == "auto":
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return "deepspeed"
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"
    return configured


def device() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def parallelize(model: torch.nn.Module, how: str, optim) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model, on this process's device, wrapped for `how` (see `strategy`), and its AdamW (`optim`: the
    OptimConfig). FSDP2 shards each transformer block (the classes a HF model names in `_no_split_modules`)
    and then the rest of the model. Under DeepSpeed the model is the engine, which owns the AdamW (ZeRO
    partitions its moments and steps it, see `step`); the AdamW returned is that same torch optimizer, for
    the learning-rate scheduler."""
    model = model.to(device())
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device().index] if device().type == "cuda" else None)
    elif how == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device().type, (world(),))
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # fused: one kernel over all parameters, with no temporary copies of them (the default, foreach, makes a
    # few, which set the step's peak memory)
    # (the parameters that train: a LoRA adapter's alone, its base frozen, gets moments)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    if how == "deepspeed":
        deepspeed = import_deepspeed()
        model, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(optim))
        optimizer = model.optimizer.optimizer  # the torch AdamW inside the ZeRO optimizer, over the partitions
    return model, optimizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without DDP's wrapper or DeepSpeed's engine (an FSDP2 model is its own module)."""
    return getattr(model, "module", model) if type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine") else model


def is_deepspeed(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: gradients are averaged among the processes only
    on the micro-batch that completes an optimizer step (`sync`), and accumulate locally before it."""
    import contextlib

    if is_deepspeed(model):
        # ZeRO-2/3 reduce (and partition) every micro-batch's gradients as they come; what the engine must be
        # told is which micro-batch ends the accumulation, since the trainer's last step may take fewer.
        model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()
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


def backward(model: torch.nn.Module, loss: torch.Tensor) -> None:
    """`loss.backward()`, through the DeepSpeed engine when there is one (the loss comes already divided by
    the accumulation, so the engine does not divide it again)."""
    if is_deepspeed(model):
        model.backward(loss, scale_wrt_gas=False)
    else:
        loss.backward()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip the gradients to `max_grad_norm`, take the optimizer step and clear them; returns the gradient
    norm before clipping, over all processes. DeepSpeed clips inside its ZeRO optimizer (the gradients are
    partitioned, so `clip_grad_norm_` on one process would see only its part) with torch's formula."""
    if is_deepspeed(model):
        model.step()
        return float(model.get_global_grad_norm())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over every process's shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad()
    return float(grad_norm)


def release(model: torch.nn.Module) -> None:
    """Free what a DeepSpeed engine holds beyond the model (its hooks and buffers); nothing otherwise."""
    if is_deepspeed(model):
        model.destroy()


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------------------------

ZERO_STAGES = (2, 3)


def import_deepspeed():
    """`deepspeed`, ready to start an engine without compiling anything: on a CPU the accelerator is named
    (DS_ACCELERATOR=cpu, which silences its guess), and the shared-memory all-reduce op that DeepSpeed's torch
    backend builds on start (a C++ JIT compile of a minute or more, used only by DeepSpeed's inference
    all-reduce) is not built."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401
    except ImportError as e:
        raise ImportError(f"optim.strategy: deepspeed needs DeepSpeed (pip install 'alignloop[deepspeed]'): {e}") from e
    import sys

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # `import a.b.torch as m` gives torch itself
    return deepspeed


def accelerate_deepspeed_file() -> dict:
    """The DeepSpeed JSON an `accelerate launch` config names (`deepspeed_config_file`), or {}."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        return {}
    import json

    with open(path) as f:
        return json.load(f)


def zero_stage(optim) -> int:
    """The ZeRO stage: `optim.zero_stage`, else the `accelerate launch` config's (`zero_stage`, or its
    deepspeed_config_file's zero_optimization.stage), else 3."""
    stage = optim.zero_stage
    if stage is None:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        stage = accelerate_deepspeed_file().get("zero_optimization", {}).get("stage")
    stage = 3 if stage in (None, "auto") else int(stage)
    if stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported by alignloop's trainer; use 2 or 3 "
                         "(or optim.strategy: ddp for whole copies)")
    return stage


def deepspeed_config(optim) -> dict:
    """The DeepSpeed config alignloop starts its engine with. alignloop keeps its own batch, accumulation,
    clipping and precision (`optim`): the weights keep `optim.dtype` (bf16 mixed precision is the same
    autocast around the forward as under DDP, entered by the engine), the optimizer is a torch AdamW (no fused or CPU Adam to
    compile), the learning rate follows alignloop's scheduler. From Accelerate it takes the ZeRO stage and
    any `zero_optimization` keys of a deepspeed_config_file (bucket sizes, stage3_* thresholds; values
    "auto" are left to DeepSpeed). Offloading is refused: not supported by alignloop yet."""
    zero = {k: v for k, v in accelerate_deepspeed_file().get("zero_optimization", {}).items() if v != "auto"}
    offload = [os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none") for what in ("OPTIMIZER", "PARAM")]
    offload += [str(zero.get(key, {}).get("device", "none")) for key in ("offload_optimizer", "offload_param")]
    if any(device not in ("none", "None") for device in offload):
        raise ValueError("DeepSpeed ZeRO offloading (offload_optimizer_device / offload_param_device) is not "
                         "supported by alignloop's trainer; set them to none")
    zero["stage"] = zero_stage(optim)
    config = {
        "train_micro_batch_size_per_gpu": max(1, -(-optim.batch_size // world())),
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if optim.mixed_precision == "bf16":
        # The engine's forward disables an autocast entered outside it unless its own is on. No module's
        # gradients are reduced in bfloat16 (DeepSpeed's default for Linear layers under its autocast): they
        # are averaged in float32, as under DDP.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if optim.dtype == "bfloat16":  # bfloat16 weights: DeepSpeed's bf16 mode keeps float32 master weights
        config["bf16"] = {"enabled": True}
    return config


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
