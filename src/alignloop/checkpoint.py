"""A checkpoint on disk: everything a later round needs to resume training, nothing pickled.

A plain HF model folder (safetensors weights, config, tokenizer, generation config) that vLLM and
transformers load as it is, plus a `training_state/` subfolder (kept out of the model folder proper: vLLM
loads every *.safetensors file it finds there) with the AdamW moments (`optimizer.safetensors` and
`optimizer.json`), the scheduler state and the trainer state (global step, per-round summaries). A checkpoint
is written to a temporary folder and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .faults import crash_point
from .records import write_json

TRAINING_STATE = "training_state"  # the subfolder of a checkpoint that holds the files below
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
TRAINER_STATE = "trainer_state.json"


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    write_json(folder / OPTIMIZER_META, {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    meta = json.loads((folder / OPTIMIZER_META).read_text())
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_training_state(optimizer: torch.optim.Optimizer, scheduler, checkpoint: str | Path) -> dict:
    """Restore the optimizer's moments and the scheduler's position from a checkpoint; returns the trainer
    state (global step, rounds)."""
    folder = training_state_dir(Path(checkpoint))
    load_optimizer(optimizer, folder)
    scheduler.load_state_dict(json.loads((folder / SCHEDULER_STATE).read_text()))
    return json.loads((folder / TRAINER_STATE).read_text())


def save_checkpoint(model, tokenizer, optimizer, scheduler, state: dict, out_dir: Path) -> None:
    """Everything a later round needs, written to a temporary folder and renamed into place."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, safe_serialization=True)
    crash_point("checkpoint.tmp")
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_STATE).mkdir()
    save_optimizer(optimizer, tmp / TRAINING_STATE)
    write_json(tmp / TRAINING_STATE / SCHEDULER_STATE, scheduler.state_dict())
    write_json(tmp / TRAINING_STATE / TRAINER_STATE, state)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def training_state_dir(checkpoint: Path) -> Path:
    """Where a checkpoint keeps its optimizer, scheduler and trainer state (checkpoints written before
    `training_state/` existed keep them beside the weights)."""
    return checkpoint / TRAINING_STATE if (checkpoint / TRAINING_STATE).is_dir() else checkpoint


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    state = training_state_dir(folder)
    return (folder / "config.json").exists() and all((state / f).exists() for f in (OPTIMIZER_TENSORS, SCHEDULER_STATE, TRAINER_STATE))

