"""`alignloop export RUN_DIR [--round N] --out DIR`: a kept round's policy as a plain HF model folder (weights,
config, tokenizer; a LoRA round's adapter merged into its base) that transformers and vLLM load as they load
any model, without the checkpoint's training state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import is_checkpoint
from .models import load_causal_lm, load_tokenizer


class ExportError(ValueError):
    """A round that cannot be exported (the message says which and why)."""


def kept_rounds(run_dir: Path) -> list[int]:
    """The rounds whose checkpoint is on disk and complete, in order."""
    return sorted(int(d.parent.name[1:]) for d in (run_dir / "rounds").glob("r*/checkpoint") if is_checkpoint(d))


def export_round(run_dir: str | Path, out: str | Path, round_index: int | None = None,
                 trust_remote_code: bool = False) -> tuple[int, Path]:
    """Write round `round_index`'s policy (None: the last kept round's) to `out`, which must not exist yet;
    written beside it first and renamed into place, so a failed export leaves nothing. Returns the round and
    the folder."""
    run_dir, out = Path(run_dir), Path(out)
    kept = kept_rounds(run_dir)
    if not kept:
        raise ExportError(f"{run_dir}: no round has a complete checkpoint to export")
    if round_index is None:
        round_index = kept[-1]
    if round_index not in kept:
        raise ExportError(f"{run_dir}: round {round_index} has no checkpoint (never trained, or deleted under "
                          f"keep_checkpoints); kept: {', '.join(map(str, kept))}")
    if out.exists():
        raise ExportError(f"--out {out}: already exists; choose a new folder")
    checkpoint = run_dir / "rounds" / f"r{round_index:03d}" / "checkpoint"
    model = load_causal_lm(str(checkpoint), "float32", trust_remote_code)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(str(checkpoint), trust_remote_code).save_pretrained(tmp)
    os.replace(tmp, out)
    return round_index, out
