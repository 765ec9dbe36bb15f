"""The trackers of `log_to`, with the real packages, each read back from what it wrote: TensorBoard's event
files, W&B's offline transaction log, trackio's local database. Everything a tracker or its package writes
(HOME caches included) goes under tmp_path; W&B runs offline."""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest

from alignloop.config import ConfigError
from alignloop.trackers import TRACKERS, Trackers, check_installed, numbers

CONFIG = {"seed": 3, "optim": {"lr": 1e-5, "strategy": "single"}, "sampler": {"stop": []}, "policy": None}
# two optimizer steps as the loop sends them: train rows with an event name, a nested dict and non-numbers
ROWS = [
    (1, {"event": "train_step", "step": 1, "loss": 0.69, "rewards/accuracy": 0.5, "grad_norm": 2.0,
         "length": {"tokens": 3, "note": "x"}, "stage": "train", "kl": None, "ratio": "nan", "ids": [1, 2]}),
    (2, {"event": "train_step", "step": 2, "loss": 0.25, "rewards/accuracy": 1.0, "grad_norm": 1.5,
         "length": {"tokens": 5}, "clipped": True}),
]
EXPECTED = {  # tag -> [(step, value)]: what every tracker must hold after ROWS
    "loss": [(1, 0.69), (2, 0.25)],
    "rewards/accuracy": [(1, 0.5), (2, 1.0)],
    "grad_norm": [(1, 2.0), (2, 1.5)],
    "length/tokens": [(1, 3), (2, 5)],
    "clipped": [(2, 1)],
}


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Every cache and config a tracker package reads or writes, under tmp_path; W&B offline and quiet."""
    home = tmp_path / "home"
    home.mkdir()
    for var, path in {"HOME": home, "XDG_CACHE_HOME": home / ".cache", "XDG_CONFIG_HOME": home / ".config",
                      "XDG_DATA_HOME": home / ".local/share", "HF_HOME": home / "hf",
                      "WANDB_DIR": tmp_path / "wandb_dir", "WANDB_CACHE_DIR": home / "wandb_cache",
                      "WANDB_CONFIG_DIR": home / "wandb_config", "WANDB_DATA_DIR": home / "wandb_data",
                      "TRACKIO_DIR": tmp_path / "trackio"}.items():
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(var, raising=False)
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:  # wandb reads its environment once a process; the next test's must be read again
        wandb.teardown()


def log_rows(trackers: Trackers, rows=ROWS) -> None:
    for step, row in rows:
        trackers.log(row, step=step)


def assert_series(series: dict[str, list[tuple[int, float]]], expected=EXPECTED) -> None:
    assert sorted(series) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in series[tag]] == [step for step, _ in points], tag
        assert [value for _, value in series[tag]] == pytest.approx([value for _, value in points]), tag


def test_numbers_flattens_and_keeps_only_numbers():
    assert numbers(ROWS[0][1]) == {"loss": 0.69, "rewards/accuracy": 0.5, "grad_norm": 2.0, "length/tokens": 3}
    assert numbers({"a": {"b": {"c": 1.5}}, "x": {"step": 4}, "flag": False}) == {"a/b/c": 1.5, "x/step": 4,
                                                                                 "flag": False}


# ---- TensorBoard ----

def tensorboard_series(logdir: Path) -> tuple[dict, dict]:
    """{tag: [(step, value)]} of every event file in `logdir` (in the order written), and the hparams."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(logdir))
    events.Reload()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {key: getattr(value, value.WhichOneof("kind")) for key, value in start.session_start_info.hparams.items()}
    return series, hparams


def test_tensorboard_writes_the_numbers_at_the_optimizer_step(tmp_path):
    with Trackers(["tensorboard"], tmp_path, CONFIG) as trackers:
        log_rows(trackers)
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    series, hparams = tensorboard_series(tmp_path / "tensorboard")
    assert_series(series)  # 'event', 'stage', 'note', None, "nan", the list and the row's own 'step' dropped
    assert hparams == {"seed": 3.0, "optim/lr": pytest.approx(1e-5), "optim/strategy": "single",
                       "sampler/stop": "[]", "policy": "None"}


def test_tensorboard_resumed_run_appends(tmp_path):
    with Trackers(["tensorboard"], tmp_path, CONFIG) as trackers:
        log_rows(trackers, ROWS[:1])
    with Trackers(["tensorboard"], tmp_path, CONFIG) as trackers:
        log_rows(trackers, ROWS[1:])
        series, _ = tensorboard_series(tmp_path / "tensorboard")  # flushed after each log: visible while open
        assert series["loss"] == [(1, pytest.approx(0.69)), (2, pytest.approx(0.25))]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_series(tensorboard_series(tmp_path / "tensorboard")[0])


# ---- W&B, offline ----

def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-ID.wandb`). wandb 0.31 has no Python reader of its
    own (wandb-core, in Go, writes and syncs it); the framing is LevelDB's log format after a 7-byte header:
    32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`, type full 1, first 2, middle 3,
    last 4."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), "not a W&B transaction log"
    pos, pieces = 7, b""
    while len(data) - pos >= 7:
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is zero padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        pieces += chunk
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""


def item_value(item):
    """A history, summary or config item's value: JSON, or one of the typed fields of newer wandb-core."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    return None if kind in (None, "none") else getattr(item, kind)


def wandb_flushed() -> None:
    """Wait until wandb-core has written everything down. `run.finish()` only tells wandb-core (a separate
    process) that the run is over; it closes the run's stream, and so completes the transaction log, later,
    by itself. `teardown` (run at exit in a real run) waits for that."""
    import wandb

    wandb.teardown()


def wandb_run(run_dir: Path) -> tuple[str, dict, dict]:
    """Run id, config and history {key: [(step, value)]} of the single offline run under run_dir/wandb/."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run_id, config, series = None, {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: item_value(item) for item in record.run.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    series.setdefault(key, []).append((record.history.step.num, item_value(item)))
    return run_id, config, series


def test_wandb_offline_run_holds_the_numbers_and_resumes_under_the_same_id(tmp_path):
    run_dir = tmp_path / "my-run"
    with Trackers(["wandb"], run_dir, CONFIG) as trackers:
        first_id = trackers.active["wandb"].run.id
        log_rows(trackers)
    wandb_flushed()
    run_id, config, series = wandb_run(run_dir)
    assert run_id == first_id == (run_dir / "tracker_run_id").read_text().strip()
    assert_series(series, {**EXPECTED, "clipped": [(2, True)]})  # W&B keeps a bool a bool
    assert {key: config[key] for key in CONFIG} == CONFIG
    assert not list((tmp_path / "wandb_dir").glob("*"))  # dir=RUN_DIR, not WANDB_DIR or the cwd

    with Trackers(["wandb"], run_dir, CONFIG) as trackers:  # a resumed run: the same W&B run
        assert trackers.active["wandb"].run.id == first_id
        assert trackers.active["wandb"].run.name == "my-run"
        trackers.log({"loss": 0.125}, step=3)
    wandb_flushed()
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(log.name == f"run-{first_id}.wandb" for log in logs)
    second = [(record.history.step.num, item_value(item)) for record in wandb_records(logs[-1])
              if record.WhichOneof("record_type") == "history"
              for item in record.history.item if (item.key or "/".join(item.nested_key)) == "loss"]
    assert second == [(3, 0.125)]


# ---- trackio, local ----

@pytest.fixture
def fresh_trackio(monkeypatch):
    """trackio reads TRACKIO_DIR once, when first imported: have it imported afresh under this test's."""
    for name in [name for name in sys.modules if name == "trackio" or name.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)


def trackio_series(run_name: str) -> dict:
    from trackio.sqlite_storage import SQLiteStorage

    series = {}
    for row in SQLiteStorage.get_logs("alignloop", run=run_name):
        for key, value in row.items():
            if key not in ("step", "timestamp") and not key.startswith("_"):
                series.setdefault(key, []).append((row["step"], value))
    return series


def test_trackio_local_database_holds_the_numbers_and_resumes(tmp_path, fresh_trackio):
    run_dir = tmp_path / "my-run"
    with Trackers(["trackio"], run_dir, CONFIG) as trackers:
        log_rows(trackers, ROWS[:1])
    with Trackers(["trackio"], run_dir, CONFIG) as trackers:  # a resumed run appends to the same trackio run
        log_rows(trackers, ROWS[1:])

    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path("alignloop").parent == tmp_path / "trackio"
    assert SQLiteStorage.get_project_db_path("alignloop").is_file()
    name = f"my-run-{(run_dir / 'tracker_run_id').read_text().strip()}"
    assert SQLiteStorage.get_runs("alignloop") == [name]
    assert_series(trackio_series(name))
    config = SQLiteStorage.get_run_config("alignloop", run=name)
    assert {key: config[key] for key in CONFIG} == CONFIG


# ---- start-up checks and failures ----

def test_check_installed_names_the_missing_extra(monkeypatch):
    check_installed(list(TRACKERS))  # all three are installed here (the test extra)
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    with pytest.raises(ConfigError) as e:
        check_installed(["tensorboard", "wandb"])
    assert str(e.value) == "log_to: 'wandb' needs the wandb package: pip install 'alignloop[wandb]'"
    with pytest.raises(ConfigError, match=r"log_to: unknown tracker 'mlflow'; known: tensorboard, wandb, trackio"):
        check_installed(["mlflow"])
    with pytest.raises(ConfigError, match="needs the wandb package"):  # Trackers checks too
        Trackers(["wandb"], Path("."), {})


def test_no_trackers_import_and_write_nothing(tmp_path, monkeypatch):
    for name in TRACKERS + ("torch.utils.tensorboard",):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them would raise ImportError
    with Trackers([], tmp_path / "run", CONFIG) as trackers:
        log_rows(trackers)
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_fails_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, caplog, fresh_trackio):
    import wandb

    with Trackers(["tensorboard", "wandb", "trackio"], tmp_path, CONFIG) as trackers:
        log_rows(trackers, ROWS[:1])
        wandb.finish()  # something else ends the W&B run: its log now raises UsageError
        with caplog.at_level(logging.WARNING, logger="alignloop.trackers"):
            log_rows(trackers, ROWS[1:])
            trackers.log({"loss": 0.125}, step=3)
        assert list(trackers.active) == ["tensorboard", "trackio"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "alignloop.trackers"]
    assert len(warnings) == 1 and warnings[0].startswith("log_to: wandb failed (UsageError:")
    series, _ = tensorboard_series(tmp_path / "tensorboard")
    assert series["loss"] == [(1, pytest.approx(0.69)), (2, pytest.approx(0.25)), (3, pytest.approx(0.125))]
    assert math.isclose(series["grad_norm"][-1][1], 1.5)
    assert trackio_series(f"{tmp_path.name}-{(tmp_path / 'tracker_run_id').read_text().strip()}")["loss"] == [
        (1, pytest.approx(0.69)), (2, pytest.approx(0.25)), (3, pytest.approx(0.125))]
    wandb_flushed()
    assert [step for step, _ in wandb_run(tmp_path)[2]["loss"]] == [1]  # W&B got only what came before


def test_a_tracker_that_fails_to_start_is_loud(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    with pytest.raises(ValueError, match="mode"):  # wandb's own message, naming the setting
        Trackers(["tensorboard", "wandb"], tmp_path, CONFIG)
