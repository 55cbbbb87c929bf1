"""Entry points of the input pipeline: train and eval iterators, and host -> mesh placement.

  it, num_train = make_train_iterator(config, jax.process_index(), jax.process_count())
  batch = next(it)                     # numpy: image (B/P, z, y, x, C), labels (B/P, 8), ...
  batch = to_global(batch, NamedSharding(mesh, P('data')))   # jax.Arrays of global batch B
  ckpt.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))

Order is defined once, globally: a stream of element indices g = 0, 1, 2, ... where g = e * N + k
is element k of epoch e (N training studies, reshuffled every epoch). Global batch s holds
g in [s * B, (s + 1) * B); process p reads only rows [p * B / P, (p + 1) * B / P) of it, so the
concatenation of all processes' batches at step s is the same array for any P. Augmentation is
seeded from (seed, transform, g), so an element never depends on threads, workers or processes.
"""
from __future__ import annotations

import collections
import json
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from cspine_jax import cli
from cspine_jax.data import config as data_config
from cspine_jax.data import device_blocks
from cspine_jax.data import levels
from cspine_jax.data import manifest as manifest_lib
from cspine_jax.data import sources
from cspine_jax.data import transforms


def _data_config(config):
  """Accepts a full experiment config (with ``.data``) or the data block itself."""
  return data_config.resolve(config)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    return jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index}, process_count={process_count}')
  return int(process_index), int(process_count)


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} not divisible by {process_count} processes')
  return global_batch // process_count


class ProcessRows(grain.MapDataset):
  """Process p's share of a globally indexed dataset, row block by row block.

  Local element k = s * b + r (b = B / P) is global element s * B + p * b + r: the rows
  [p * b, (p + 1) * b) of global batch s. Random transforms upstream are indexed by the global
  element, so they are untouched by the split. Lazy: only this process's rows are computed.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global = int(global_batch)
    self._local = local_batch_size(self._global, process_count)
    self._p = int(process_index)
    n = len(parent)
    self._len = sys.maxsize if n >= sys.maxsize else (n // self._global) * self._local

  def __len__(self) -> int:
    return self._len

  def global_index(self, index: int) -> int:
    step, row = divmod(int(index), self._local)
    return step * self._global + self._p * self._local + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.global_index(index)]

  def __str__(self) -> str:
    return f'ProcessRows(B={self._global}, b={self._local}, p={self._p})'


def _to_batches(ds: grain.MapDataset, local_batch: int, cfg) -> grain.IterDataset:
  """Element dataset -> prefetched local batches, buffers sized from the config.

  Threads only (num_workers=0): threads work on single elements and the buffer holds
  ``prefetch`` local batches worth of elements. With workers, whole batches are made in the
  workers (so batch contents do not depend on the worker count) and each buffers ``prefetch``.
  """
  threads = int(cfg.num_threads)
  if int(cfg.num_workers) > 0:
    _ensure_absl_flags_parsed()
    ds = ds.batch(local_batch, drop_remainder=True)
    opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(cfg.prefetch, threads))
    mp = grain.MultiprocessingOptions(num_workers=int(cfg.num_workers),
                                      per_worker_buffer_size=int(cfg.prefetch))
    return ds.to_iter_dataset(opts).mp_prefetch(mp)
  buffer = max(int(cfg.prefetch) * local_batch, threads)
  opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
  return ds.to_iter_dataset(opts).batch(local_batch, drop_remainder=True)


def _ensure_absl_flags_parsed():
  """Grain's worker processes read absl flags; in library use (tests, notebooks) none are
  parsed, which raises UnparsedFlagAccessError (DESIGN.md section 5)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _studies(cfg, which: str, uids: Sequence[str] | None = None):
  studies = manifest_lib.load_manifest(cfg.root)
  if uids is not None:
    wanted = set(uids)
    chosen = [s for s in studies if s.uid in wanted]
    missing = wanted - {s.uid for s in chosen}
    if missing:
      raise KeyError(f'{len(missing)} uids not ok in the manifest, e.g. {sorted(missing)[0]}')
    return chosen
  return manifest_lib.select(studies, which, fold=cfg.fold, num_folds=cfg.num_folds,
                             fold_seed=cfg.fold_seed,
                             require_segmentation=cfg.require_segmentation,
                             require_boxes=cfg.require_boxes,
                             pseudo_labels=bool(cfg.get('pseudo_labels', False)))


def split_studies(config, which: str) -> list:
  """The studies of one split ('train', 'eval', ...) under ``config.data``'s filters."""
  return _studies(_data_config(config), which)


_WARNED_LEVELS: set[str] = set()  # roots whose missing levels were reported


def check_levels(config, studies) -> None:
  """Device crops need every study's 1 mm level (ValueError naming the upgrade command); host
  crops without levels read the full-resolution volume, slower (one warning per dataset)."""
  cfg = _data_config(config)
  device = cfg.crop_on == 'device'
  if not (device or cfg.levels):
    return
  need = device_blocks.DEVICE_LEVEL
  missing = [s for s in studies if (need not in s.levels if device else not s.levels)]
  if not missing:
    return
  command = levels.UPGRADE_COMMAND.format(root=cfg.root)
  what = (f'{len(missing)} of {len(studies)} studies of {cfg.root} have no derived levels (e.g. '
          f'{missing[0].uid}: converted before they existed)')
  if device:
    raise ValueError(f"config.data.crop_on='device' crops the {need} level, but {what}; add "
                     f'them with: {command}')
  if cfg.root not in _WARNED_LEVELS:
    _WARNED_LEVELS.add(cfg.root)
    cli.warn(f'{what}: their crops read the full-resolution volume, several times slower; add '
             f'the levels with: {command}')


def make_reader(cfg) -> sources.VolumeReader:
  """One reader per pipeline; TensorStore's decode threads capped at num_threads so that the
  pipeline uses the cores it is given, not every core of the host."""
  return sources.VolumeReader(cfg.root, cache_bytes=int(cfg.cache_mb) << 20,
                              concurrency=int(cfg.num_threads) or None)


def train_elements(config, process_index: int, process_count: int, *, studies=None,
                   reader: sources.VolumeReader | None = None) -> tuple[grain.MapDataset, int]:
  """This process's infinite stream of training elements (before batching), and N."""
  cfg = _data_config(config)
  studies = _studies(cfg, 'train') if studies is None else list(studies)
  if not studies:
    raise ValueError(f'no training studies in {cfg.root} (fold={cfg.fold})')
  check_levels(cfg, studies)
  reader = reader or make_reader(cfg)
  ds = grain.MapDataset.source(sources.StudySource(studies)).seed(int(cfg.seed))
  if cfg.shuffle:
    ds = ds.shuffle()  # Reshuffled every epoch: permutation seeded by (seed, epoch).
  ds = ds.repeat()
  ds = ds.random_map(transforms.RandomCrop(reader, cfg))
  ds = ds.random_map(transforms.RandomIntensity(cfg))
  ds = ds.map(transforms.HUWindows(cfg))
  ds = ProcessRows(ds, cfg.batch_size, process_index, process_count)
  return ds, len(studies)


def make_train_iterator(config, process_index: int | None = None,
                        process_count: int | None = None, *, start_step: int = 0,
                        studies=None) -> tuple[grain.DatasetIterator, int]:
  """Endless iterator of this process's training batches, and the number of training studies.

  Yields {"image": (b, z, y, x, C) f32 [vertebrae: (b, 7, z, y, x, C)], "labels": (b, 8) f32,
  "labelled": (b,) bool, "mask": (b,) bool (all True), "uid": (b,) str
  [vertebrae: "vertebra_mask": (b, 7) bool]} with b = batch_size / process_count.

  The iterator is checkpointable (``get_state``/``set_state``, or
  ``grain.checkpoint.CheckpointSave/CheckpointRestore`` inside an Orbax Composite); its state
  is per process. ``start_step`` starts at global step s without a saved state (e.g. after a
  change of process count: batches are a function of the step only).
  """
  cfg = _data_config(config)
  p, n = _process(process_index, process_count)
  ds, num_train = train_elements(cfg, p, n, studies=studies)
  b = local_batch_size(cfg.batch_size, n)
  if start_step:
    ds = ds[int(start_step) * b:]
  logging.info('train pipeline: %d studies, global batch %d, process %d/%d', num_train,
               cfg.batch_size, p, n)
  return iter(_to_batches(ds, b, cfg)), num_train


def eval_elements(config, process_index: int, process_count: int, *, split: str = 'eval',
                  uids: Sequence[str] | None = None, studies=None,
                  reader: sources.VolumeReader | None = None) -> tuple[grain.MapDataset, int]:
  """This process's eval elements: every study once, padded to whole global batches."""
  cfg = _data_config(config)
  studies = _studies(cfg, split, uids) if studies is None else list(studies)
  check_levels(cfg, studies)
  reader = reader or make_reader(cfg)
  batch = int(cfg.eval_batch_size)
  padded = -(-len(studies) // batch) * batch
  ds = grain.MapDataset.source(sources.StudySource(studies, pad_to=padded))
  ds = ds.map(transforms.CenterCrop(reader, cfg))
  ds = ds.map(transforms.HUWindows(cfg))
  return ProcessRows(ds, batch, process_index, process_count), len(studies)


def make_eval_iterator(config, split: str = 'eval', *, uids: Sequence[str] | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       studies=None) -> tuple[grain.DatasetIterator, int]:
  """One pass over ``split`` ('eval' = held-out fold, 'train', 'labelled', 'test', 'all'), or
  over exactly ``uids``; returns (iterator, number of real studies).

  No augmentation. Batches are eval_batch_size / process_count rows; the last global batch is
  padded with all-zero rows whose ``mask`` is False (and uid ''). Across processes every study
  appears exactly once.
  """
  cfg = _data_config(config)
  p, n = _process(process_index, process_count)
  ds, count = eval_elements(cfg, p, n, split=split, uids=uids, studies=studies)
  b = local_batch_size(int(cfg.eval_batch_size), n)
  return iter(_to_batches(ds, b, cfg)), count


def to_global(batch: dict[str, Any], sharding) -> dict[str, Any]:
  """Process-local numpy batch -> global ``jax.Array``s laid out by ``sharding``.

  ``sharding`` is typically ``NamedSharding(mesh, P('data'))`` (batch axis over all devices of
  all processes); rows of process p land at [p * b, (p + 1) * b) of the global batch, matching
  ``ProcessRows``. Non-numeric fields (uids) stay process-local numpy.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in 'biuf':
      out[key] = jax.make_array_from_process_local_data(sharding, value)
    else:
      out[key] = value
  return out


class DevicePrefetch:
  """Global batches put on the devices ``size`` steps ahead (double-buffered ``device_put``).

  ``next`` hands out batch s while batches s+1.. are already being transferred, so the step
  never waits for the host-to-device copy. Checkpointable like the iterator it wraps (Grain's
  checkpoint handler calls ``get_state``/``set_state``; the file is the same JSON): the state is
  the wrapped iterator's *before the oldest batch not yet handed out*, so a restore replays
  exactly the batches no step has taken. Only array fields are kept (uids stay on the host).
  """

  def __init__(self, iterator, sharding, size: int = 2):
    self._it = iterator
    self._sharding = sharding
    self._size = max(1, int(size))
    self._queue = collections.deque()  # (state before the batch, global batch)

  def __iter__(self):
    return self

  def _fill(self):
    state = self._it.get_state()
    batch = to_global(next(self._it), self._sharding)  # dispatches the copies, returns at once
    self._queue.append((state, {k: v for k, v in batch.items() if isinstance(v, jax.Array)}))

  def __next__(self) -> dict:
    while len(self._queue) < self._size:
      self._fill()
    return self._queue.popleft()[1]

  def get_state(self) -> bytes:
    state = self._queue[0][0] if self._queue else self._it.get_state()
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self._queue.clear()
    self._it.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Grain's checkpoint handler calls this after ``set_state``."""
    start = getattr(self._it, 'start_prefetch', None)
    if start:
      start()

  def close(self):
    self._queue.clear()
    close = getattr(self._it, 'close', None)
    if close:
      close()
