"""A checkpoint on disk: everything a later round needs to resume training, nothing pickled.

A plain HF model folder (safetensors weights, config, tokenizer, generation config) that vLLM and
transformers load as it is, plus a `training_state/` subfolder (kept out of the model folder proper: vLLM
loads every *.safetensors file it finds there) with the AdamW moments (`optimizer.safetensors` and
`optimizer.json`), the scheduler state and the trainer state (global step, per-round summaries). Under
`policy_adapter` the model folder is a peft adapter folder instead (`alignloop.adapters`), and the moments are
the adapter's alone. A checkpoint
is written to a temporary folder and renamed into place, so a crash never leaves a half-written one.

Weights and moments are saved whole, gathered from however many processes held them (data-parallel copies or
FSDP shards, through `torch.distributed.checkpoint`'s state-dict API; DeepSpeed ZeRO partitions, through
DeepSpeed's `safe_get_full_*` functions), with the moments keyed by parameter name; so a checkpoint written by
N processes resumes on M, sharded or not, under any strategy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from . import distributed
from .adapters import ADAPTER_CONFIG, save_adapter
from .faults import crash_point
from .records import StorageError, storage_error, write_json

TRAINING_STATE = "training_state"  # the subfolder of a checkpoint that holds the files below
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FORMAT = 2  # 2: moments keyed by parameter name; 1 (release 0.1.0): by position in the optimizer
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the main process's CPU


def save_optimizer(state: dict, folder: Path) -> None:
    """A gathered optimizer state dict ({"state": {name: {key: value}}, "param_groups": [...]}), as safetensors
    (the tensors) and JSON (the rest)."""
    from safetensors.torch import save_file

    tensors, scalars = {}, {}
    for name, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}.{key}"] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    write_json(folder / OPTIMIZER_META, {"format": OPTIMIZER_FORMAT, "param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore the moments into `optimizer` over `model` as this process holds it (whole, its FSDP shard, or
    its ZeRO partition: `model` is then the DeepSpeed engine and `optimizer` the AdamW inside it)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    meta = json.loads((folder / OPTIMIZER_META).read_text())
    names = None
    if meta.get("format", 1) == 1:  # by position: the model's parameters in order
        names = [name for name, _ in distributed.unwrap(model).named_parameters()]
        meta["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]]
    state: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field = key.rsplit(".", 1)
        state.setdefault(names[int(name)] if names else name, {})[field] = value
    if distributed.is_deepspeed(model):
        set_deepspeed_moments(model, {"state": state, "param_groups": meta["param_groups"]})
        return
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, checkpoint: str | Path) -> dict:
    """Restore the optimizer's moments and the scheduler's position from a checkpoint; returns the trainer
    state (global step, rounds)."""
    folder = training_state_dir(Path(checkpoint))
    load_optimizer(model, optimizer, folder)
    scheduler.load_state_dict(json.loads((folder / SCHEDULER_STATE).read_text()))
    return json.loads((folder / TRAINER_STATE).read_text())


def save_checkpoint(model, tokenizer, optimizer, scheduler, state: dict, out_dir: Path, adapter=None) -> None:
    """Everything a later round needs, gathered from every process and written by the main process to a
    temporary folder, then renamed into place. Every process must call it. `adapter`: the peft wrapper of
    `model` when only a LoRA adapter trains; the checkpoint then holds the adapter instead of the weights."""
    if distributed.is_deepspeed(model):
        weights, moments = gather_deepspeed(model)
    else:
        weights = get_model_state_dict(model, options=GATHERED)
        moments = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if distributed.is_main():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_checkpoint(model, tokenizer, scheduler, state, out_dir, tmp, weights, moments, adapter)
        except (OSError, SafetensorError, StorageError) as e:  # a full disk, a file-size limit, a read-only folder:
            shutil.rmtree(tmp, ignore_errors=True)                # no half-written checkpoint stays
            if isinstance(e, StorageError):
                raise
            raise storage_error(tmp, e) from e
    distributed.barrier()


def _write_checkpoint(model, tokenizer, scheduler, state: dict, out_dir: Path, tmp: Path, weights: dict, moments: dict,
                      adapter) -> None:
    """`save_checkpoint`'s writing, on the main process: the gathered state into `tmp`, renamed to `out_dir`. A
    checkpoint that cannot fit the free space is not begun."""
    needed = _tensor_bytes(moments.get("state", {}))
    needed += needed // 2 if adapter is not None else _tensor_bytes(weights)  # an adapter: its weights, half its moments
    free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else Path.cwd()).free
    if needed > free:
        raise StorageError(f"{out_dir}: a checkpoint needs about {needed / 2**30:.2f} GiB and {free / 2**30:.2f} GiB "
                           "is free there; free space, then run the same command again")
    policy = distributed.unwrap(model)
    policy.config.use_cache = True
    if adapter is not None:  # the adapter alone: the base model is never written
        save_adapter(adapter, weights, tmp)
    else:
        # A tied parameter (lm_head sharing the embeddings) is saved once, as transformers saves it; gathered
        # FSDP shards no longer share storage, so transformers would not notice the tie by itself.
        tied = {name for name, _ in policy.named_parameters(remove_duplicate=False)} - {name for name, _ in policy.named_parameters()}
        weights = {name: tensor for name, tensor in weights.items() if name not in tied}
        policy.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    crash_point("checkpoint.tmp")
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_STATE).mkdir()
    save_optimizer(moments, tmp / TRAINING_STATE)
    write_json(tmp / TRAINING_STATE / SCHEDULER_STATE, scheduler.state_dict())
    write_json(tmp / TRAINING_STATE / TRAINER_STATE, state)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _tensor_bytes(tree) -> int:
    """The bytes of every tensor in a state dict (nested dicts of tensors)."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    return sum(_tensor_bytes(v) for v in tree.values()) if isinstance(tree, dict) else 0


def training_state_dir(checkpoint: Path) -> Path:
    """Where a checkpoint keeps its optimizer, scheduler and trainer state (checkpoints written before
    `training_state/` existed keep them beside the weights)."""
    return checkpoint / TRAINING_STATE if (checkpoint / TRAINING_STATE).is_dir() else checkpoint


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    state = training_state_dir(folder)
    model = (folder / "config.json").exists() or (folder / ADAPTER_CONFIG).exists()
    return model and all((state / f).exists() for f in (OPTIMIZER_TENSORS, SCHEDULER_STATE, TRAINER_STATE))


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3: `torch.distributed.checkpoint` sees neither its partitioned weights (ZeRO-3 leaves each
# parameter an empty tensor outside the forward) nor its optimizer, so whole tensors go through DeepSpeed's own
# functions, one parameter at a time. Every one of them is a collective: every process calls them in order.
# --------------------------------------------------------------------------------------------------------------

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors


def gather_deepspeed(engine) -> tuple[dict, dict]:
    """The model's state dict with whole weights (the ZeRO optimizer's float32 master copy, cast to the
    model's dtype) and the AdamW state in the format of `get_optimizer_state_dict` (whole moments keyed by
    parameter name), on the main process; empty dicts on the others."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    main = distributed.is_main()
    module, adamw = engine.module, engine.optimizer.optimizer
    params = dict(module.named_parameters())
    weights = {}
    for name, param in params.items():
        full = safe_get_full_fp32_param(param)
        if main:
            weights[name] = full.detach().to("cpu", param.dtype)
    if main:  # the rest of the state dict: persistent buffers, and a tied parameter under each of its names
        aliases = {id(p): n for n, p in params.items()}
        for name, param in module.named_parameters(remove_duplicate=False):
            weights.setdefault(name, weights[aliases[id(param)]])
        for prefix, sub in module.named_modules():
            for name, buffer in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    weights[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu()
    state = {}
    if adamw.state:  # torch creates it on the first step
        step = next(iter(adamw.state.values()))["step"]  # the same for all: every parameter steps every time
        for name, param in params.items():
            moments = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
            if main:
                state[name] = {"step": torch.as_tensor(step, dtype=torch.float32).detach().cpu().clone(),
                               **{key: value.detach().cpu() for key, value in moments.items()}}
    group = adamw.param_groups[0]
    hyper = {key: value for key, value in group.items() if key in adamw.defaults or key == "initial_lr"}
    moments = {"state": state, "param_groups": [{**hyper, "params": list(params)}]} if main else {}
    return weights if main else {}, moments


def set_deepspeed_moments(engine, saved: dict) -> None:
    """Load whole AdamW moments keyed by parameter name (and the hyperparameters saved with them, as
    `set_optimizer_state_dict` does) into a fresh engine's ZeRO partitions; its weights came from the
    checkpoint's model folder before `deepspeed.initialize`. torch creates the AdamW state on the first step,
    so it is made here first, over the float32 partitions the AdamW steps, then filled through DeepSpeed."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, adamw = engine.optimizer, engine.optimizer.optimizer
    for group, hyper in zip(adamw.param_groups, saved["param_groups"]):
        group.update({key: value for key, value in hyper.items() if key != "params"})
    params = dict(engine.module.named_parameters())
    if not saved["state"]:
        return
    step = float(next(iter(saved["state"].values()))["step"])
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    # ZeRO-3 empties the AdamW's param_groups between steps; these lists hold the partitions it steps.
    for flat in zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups:
        adamw.state[flat] = {"step": torch.tensor(step), **{key: torch.zeros_like(flat) for key in MOMENTS}}
    if not stage3:  # ZeRO-2 links each parameter's fragment of the partition to the state once: link anew
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in params.items():
        if name in saved["state"]:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, saved["state"][name][key].to(torch.float32), key)

