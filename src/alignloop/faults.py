"""Named crash points, so that the kill -9 tests stop a run at an exact moment instead of racing it.

`ALIGNLOOP_CRASH_AT=NAME` makes the process SIGKILL itself the first time it reaches the crash point NAME;
`NAME#K` the K-th time; `NAME@R` (or `NAME#K@R`) only in the process of rank R under a launcher. The points
are where a crash is most likely to lose or corrupt work:
- `checkpoint.tmp`: a checkpoint's temporary folder holds the weights, not yet the training state;
- `sample.batch`: a batch of HF generate is done, the stage's records are not yet written;
- `sample.chunk`, `label.chunk`: a chunk of a stage is written and recorded, the next not begun;
- `mark_done.STAGE`: a stage's output is written, the manifest does not yet record it.
Unset (always, outside the tests), a crash point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("ALIGNLOOP_CRASH_AT")
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    target, _, nth = spec.partition("#")
    if target != name or (rank and rank != os.environ.get("RANK", "0")):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
