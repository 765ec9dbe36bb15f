"""Experiment trackers beside `metrics.jsonl`: `log_to: [tensorboard, wandb, trackio]`, any subset.

metrics.jsonl is the run's record; a tracker is a view of the same numbers, under the same names, at x = the
optimizer's global step. Each tracker is an optional extra (`pip install 'alignloop[wandb]'`), imported only
when asked for. Starting a tracker is loud (a run that was asked to report to W&B and cannot must not train
for hours unseen); a tracker failing later is not (it must not kill the training it watches): it is warned
about once and dropped.

Where each writes: TensorBoard into RUN_DIR/tensorboard/; W&B into RUN_DIR/wandb/ (and to the server unless
WANDB_MODE=offline); trackio into its own database under TRACKIO_DIR (default ~/.cache/huggingface/trackio),
where `trackio show` finds it. A run directory resumed later continues the same W&B and trackio run: their
id is made once and kept in RUN_DIR/tracker_run_id, so a new run in a deleted-and-recreated directory is a
new run rather than the old one's continuation (W&B would drop every step below the old run's last).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path

from .config import ConfigError
from .records import atomic_write_text

TRACKERS = ("tensorboard", "wandb", "trackio")

logger = logging.getLogger(__name__)


def check_installed(names: list[str]) -> None:
    """At start-up, before anything is computed: an unknown tracker or a missing package is a ConfigError
    naming the fix. `find_spec` looks without importing (importing wandb alone takes seconds)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"log_to: {name!r} needs the {name} package: pip install 'alignloop[{name}]'")


def flatten(mapping: dict, prefix: str = "") -> dict:
    """A nested dict as one level, keys joined with '/' ({"length": {"tokens": 3}} -> "length/tokens")."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numbers(metrics: dict) -> dict[str, int | float | bool]:
    """The numbers among `metrics`, flattened. Strings (an event's name, "nan" written by a JSON encoder),
    None and lists are not plotted. A top-level `step` is the x axis itself, not a metric (trackio reserves
    the name)."""
    return {name: value for name, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and name != "step"}  # bool is an int


def tracker_run_id(run_dir: Path) -> str:
    """The run directory's id in W&B and trackio, made on first use and kept in the directory, so that a
    resumed run continues its tracker run and a fresh run at the same path starts a new one."""
    path = run_dir / "tracker_run_id"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


class TensorBoard:
    """Event files in RUN_DIR/tensorboard/; a resumed run adds a new event file that TensorBoard reads with
    the others. The config is written as the run's hparams (flattened, non-numbers as text)."""

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in flatten(config).items()}
        for summary in hparams(flat, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # so that a running run is visible

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run with files under RUN_DIR/wandb/. Online or offline as the environment says (WANDB_MODE);
    the API key, too, comes only from the environment (or wandb's own login) and is never written here."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "alignloop"), name=run_dir.name, dir=str(run_dir),
            config=config, id=tracker_run_id(run_dir), resume="allow",
            settings=wandb.Settings(silent=True),  # the loop prints its own table
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run in trackio's local database (TRACKIO_DIR, read when trackio is first imported), named
    after the run directory and its id so that two run directories of the same name stay apart. Nothing is
    served or uploaded unless the environment names a Space or a server (TRACKIO_SPACE_ID,
    TRACKIO_SERVER_URL)."""

    def __init__(self, run_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project="alignloop", name=f"{run_dir.name}-{tracker_run_id(run_dir)}", config=config,
                     resume="allow", embed=False)

    def log(self, metrics: dict, step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


class Trackers:
    """The trackers a run asked for, fed the same numbers as metrics.jsonl. With no names it does nothing
    and imports nothing."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        check_installed(names)
        run_dir = Path(run_dir).resolve()  # a name for "." too
        kinds = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}
        self.active: dict[str, TensorBoard | WandB | Trackio] = {}
        try:
            for name in dict.fromkeys(names):
                self.active[name] = kinds[name](run_dir, config)
        except BaseException:
            self.close()  # the ones already started
            raise

    def log(self, metrics: dict, step: int) -> None:
        """Send the numbers among `metrics` at x = `step`. A tracker that raises is warned about once and
        dropped; the run and the other trackers go on."""
        kept = numbers(metrics)
        if not kept:
            return
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(kept, step)
            except Exception as e:
                logger.warning("log_to: %s failed (%s: %s); no more metrics go to it in this run",
                               name, type(e).__name__, e)
                del self.active[name]  # not closed: finishing a broken tracker may hang too

    def close(self) -> None:
        """Finish every tracker; one failing to finish is warned about, not raised (the training is done)."""
        while self.active:
            name, tracker = self.active.popitem()  # the last started first
            try:
                tracker.close()
            except Exception as e:
                logger.warning("log_to: %s failed to finish (%s: %s)", name, type(e).__name__, e)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
