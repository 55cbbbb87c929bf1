"""Where the converter's time goes: optional per-stage accounting for its benchmark.

  with stages.recording() as rec:
    convert.convert_study(...)
  rec.seconds  # {'decode (JPEG Lossless)': 1.23, 'zarr3 encode and write': 0.4, ...}

Outside ``recording()`` every ``stage(name)`` is one shared no-op context manager (a global
lookup and a branch per use), so the converter pays nothing for it. Nothing recorded here reaches
the manifest or any output: the benchmark prints it. Seconds of stages that run on several
threads at once (per-slice decoding) are summed over the threads.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time


class Recorder:
  """Seconds and calls per stage name; safe to use from several threads."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.calls: dict[str, int] = collections.defaultdict(int)
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - start
      with self._lock:
        self.seconds[name] += elapsed
        self.calls[name] += 1


_NOTHING = contextlib.nullcontext()
_active: Recorder | None = None


def stage(name: str):
  """A context manager that adds its block's time to ``name`` while recording(), else nothing."""
  return _NOTHING if _active is None else _active(name)


@contextlib.contextmanager
def recording():
  """Records every stage() entered inside the block (all threads of this process)."""
  global _active
  previous, _active = _active, Recorder()
  try:
    yield _active
  finally:
    _active = previous
