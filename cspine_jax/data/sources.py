"""Random-access sources: study records (metadata only) and lazy per-process TensorStore reads.

A Grain source element here is a small dict around a ``manifest.Study``: no voxels. Voxels are
read by the crop transforms through a ``VolumeReader``, which opens its TensorStore context and
arrays lazily in the process that reads, so no open context or handle ever crosses a ``fork()``
(it would deadlock) or gets pickled into a spawned worker: a pickled reader carries only its
settings. (Importing the tensorstore module, as this one does, opens nothing and is safe.)
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Sequence

import numpy as np
import tensorstore as ts

from cspine_jax.data import manifest as manifest_lib
from cspine_jax.data import store


class VolumeReader:
  """Reads voxel blocks of the contract's zarr3 arrays; one TensorStore context per process.

  Thread-safe. The context's ``cache_pool`` caps decoded-chunk memory at ``cache_bytes`` for all
  threads together; at most ``max_open`` array handles are kept (LRU), so memory does not grow
  with the number of studies.
  """

  def __init__(self, root: str, cache_bytes: int = 256 << 20, max_open: int = 64,
               concurrency: int | None = None):
    self.root = os.fspath(root)
    self.cache_bytes = int(cache_bytes)
    self.max_open = int(max_open)
    self.concurrency = concurrency  # TensorStore decode/IO threads (None: its default, all cores)
    self._reset()

  def _reset(self):
    self._pid = os.getpid()
    self._lock = threading.Lock()
    self._context = None
    self._open = collections.OrderedDict()

  def __getstate__(self):
    return {'root': self.root, 'cache_bytes': self.cache_bytes, 'max_open': self.max_open,
            'concurrency': self.concurrency}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def open(self, kind: str, uid: str):
    """The TensorStore of ``ROOT/<kind>/<uid>/`` (opened once per process, then cached)."""
    if self._pid != os.getpid():  # Forked copy: never reuse the parent's handles.
      self._reset()
    key = (kind, uid)
    with self._lock:
      if key in self._open:
        self._open.move_to_end(key)
        return self._open[key]
      if self._context is None:
        self._context = store.shared_context(self.cache_bytes, self.concurrency)
      context = self._context
    array = store.open_array(store.array_path(self.root, kind, uid), context)
    with self._lock:
      self._open[key] = array
      while len(self._open) > self.max_open:
        self._open.popitem(last=False)
    return array

  def read(self, kind: str, uid: str, lo, hi) -> np.ndarray:
    """The [lo, hi) block (z, y, x) of one array, as numpy; only the chunks it touches decode."""
    array = self.open(kind, uid)
    (z0, y0, x0), (z1, y1, x1) = (int(v) for v in lo), (int(v) for v in hi)
    return array[z0:z1, y0:y1, x0:x1].read().result()

  def read_into(self, kind: str, uid: str, lo, hi, out: np.ndarray) -> None:
    """Reads the [lo, hi) block straight into ``out`` (a numpy view of that shape): no
    intermediate array (device_blocks fills its padded block this way)."""
    array = self.open(kind, uid)
    (z0, y0, x0), (z1, y1, x1) = (int(v) for v in lo), (int(v) for v in hi)
    ts.array(out).write(array[z0:z1, y0:y1, x0:x1]).result()

  def reader_for(self, kind: str, uid: str):
    """``read(lo, hi)`` closure for ``geometry.resample``."""
    return lambda lo, hi: self.read(kind, uid, lo, hi)

  def reader_into(self, kind: str, uid: str):
    """``read_into(lo, hi, out)`` closure for ``device_blocks.region_block``."""
    return lambda lo, hi, out: self.read_into(kind, uid, lo, hi, out)


class StudySource(Sequence):
  """Grain random-access source: element i is ``{"study": Study, "mask": True}``.

  ``pad_to`` appends padding elements ``{"study": None, "mask": False}`` (eval batches); the
  transforms turn them into zero images without reading anything.
  """

  def __init__(self, studies: Sequence[manifest_lib.Study], pad_to: int | None = None):
    self._studies = list(studies)
    self._len = max(len(self._studies), pad_to or 0)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(index)
    if index >= len(self._studies):
      return {'study': None, 'mask': False}
    return {'study': self._studies[index], 'mask': True}

  def __repr__(self) -> str:
    return f'StudySource({len(self._studies)} studies, len={self._len})'
