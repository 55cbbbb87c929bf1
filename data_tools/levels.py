r"""Adds the derived levels to a dataset converted before they existed.

  python -m data_tools.levels --data=/data/rsna_converted [--workers=2]

The converter writes, beside each volume, the same scan on isotropic 1 and 2 mm grids
(cspine_jax/data/levels.py), which training crops read instead of the full resolution. A
dataset converted earlier still trains (crops then read the full volumes, several times slower,
with a warning naming this command), except with ``data.crop_on='device'``, which needs them.
This command computes the missing levels from the volumes, exactly as the converter would (the
result is byte-identical to a fresh conversion), and records them in the manifest and in the
converter's per-study records (so a later converter rerun keeps them). Each array is placed
whole; a killed run loses nothing and a rerun does only what is left. It holds the converter's
lock: it never runs beside a conversion of the same folder.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys

from absl import flags

from cspine_jax import cli
from cspine_jax.data import levels
from cspine_jax.data import kvstore
from cspine_jax.data import store
from data_tools import convert

FLAGS = flags.FLAGS


def _expected(record: dict) -> list[str]:
  return list(store.VOLUME_LEVELS) + (list(store.LABEL_LEVELS)
                                      if record.get('has_segmentation') else [])


def _missing(root: str, record: dict) -> bool:
  return record.get('status') == 'ok' and set(record.get('levels', [])) != set(_expected(record))


def _one(root: str, record: dict) -> list[str]:
  """Writes the study's missing levels (a run killed before its manifest was written may have
  placed some whole); returns all its level kinds."""
  uid = record['uid']
  spacing = record['spacing_mm']
  have = lambda kinds: all(store.array_exists(root, kind, uid) for kind in kinds)
  if not have(store.VOLUME_LEVELS):
    path = store.array_path(root, store.VOLUMES, uid)
    levels.write(root, uid, levels.SlabReader(path), spacing, store.read_attributes(path))
  if record.get('has_segmentation') and not have(store.LABEL_LEVELS):
    path = store.array_path(root, store.SEGMENTATIONS, uid)
    levels.write_labels(root, uid, store.read_array(path), spacing, store.read_attributes(path))
  return _expected(record)


def upgrade(root: str, workers: int = 1) -> tuple[int, int]:
  """Writes the missing levels of every ok study; returns (studies upgraded, ok studies)."""
  root = store.dataset(root, '--data', write=True)
  lock = store.try_lock(kvstore.join(root, convert.RUN_LOCK))
  if lock is None:
    raise cli.Failure(f'--data={root} is being written by data_tools.convert (it holds '
                      f'{kvstore.join(root, convert.RUN_LOCK)}); wait for it to finish')
  try:
    store.clean_temporaries(root, tuple(store.LEVELS))
    records = store.read_manifest(root)
    todo = [r for r in records if _missing(root, r)]
    job_records = store.JobRecords(root, convert.STATE_DIR)
    # Threads: the filters and TensorStore release the GIL, and nothing crosses a fork().
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      for record, kinds in zip(todo, pool.map(lambda r: _one(root, r), todo)):
        record['levels'] = kinds
        state = job_records.load(record['uid'])
        if state is not None:
          job_records.save({**state, 'levels': kinds})
    store.write_manifest(root, records)
    return len(todo), sum(r.get('status') == 'ok' for r in records)
  finally:
    lock.close()


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]} (flags are --name=value)')
  if not FLAGS.data:
    raise cli.UsageError('--data is required (a folder written by python -m data_tools.convert)')
  if FLAGS.workers < 0:
    raise cli.UsageError(f'--workers={FLAGS.workers}: must be >= 0 (0: all cores)')
  done, ok = upgrade(FLAGS.data, FLAGS.workers or os.cpu_count() or 1)
  print(f'levels written for {done} of {ok} converted studies -> {FLAGS.data}', file=sys.stdout)


if __name__ == '__main__':
  flags.DEFINE_string('data', None, 'Converted dataset folder (python -m data_tools.convert).')
  flags.DEFINE_integer('workers', 0, 'Studies processed at once (0: all cores).')
  cli.run(main)
