r"""Runs a trained localizer over a converted dataset: predicted masks and vertebra boxes.

  python -m data_tools.localize --workdir=LOCALIZER_WORKDIR --data=CONVERTED [--checkpoint=latest]

For every ok study of CONVERTED/manifest.jsonl writes
  CONVERTED/predicted_segmentations/<UID>/   zarr3 uint8 on the volume's full grid, 0 background,
                                             1-7 = C1-C7 (the layout of segmentations/)
and adds to its manifest record
  predicted_vertebra_boxes   {"C1": [z0, y0, x0, z1, y1, x1], ...} end-exclusive voxel indices
  localizer                  {"workdir": ..., "step": ...} (which model predicted them)
Studies with a true mask get a prediction too, scored against it on the full grid (Dice per
vertebra, printed at the end and kept in the study's .localize record); crops still use the true
mask where one exists (manifest.Study.boxes).

Resumable like the converter: each mask is written under a temporary name and renamed into
place, then a per-study record goes to CONVERTED/.localize/<UID>.json; a rerun skips studies
whose record names the same localizer checkpoint and post-processing version, and the manifest
is rewritten atomically at the end (and every 30 s). Rerun this after re-running the converter
(which rewrites the manifest from its own records, without predicted boxes).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from data_tools import convert

STATE_DIR = '.localize'
KIND = 'predicted_segmentations'
# Bumped when the post-processing changes (2: pieces of a split vertebra kept, probabilities
# upsampled linearly), so a rerun redoes studies an older version localized.
METHOD_VERSION = 2


def _read_manifest(data: str) -> list[dict]:
  with open(os.path.join(data, convert.MANIFEST)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _state_path(data: str, uid: str) -> str:
  return os.path.join(data, STATE_DIR, uid + '.json')


def _load_state(data: str, uid: str) -> dict | None:
  try:
    with open(_state_path(data, uid)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _done(data: str, state: dict | None, tag: dict) -> bool:
  return bool(state) and state.get('localizer') == tag and os.path.isfile(
      os.path.join(data, KIND, state['uid'], 'zarr.json'))


def _clean_temporaries(data: str) -> None:
  for sub in (KIND, STATE_DIR, '.'):
    folder = os.path.join(data, sub)
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.startswith('.tmp-'):
          path = os.path.join(folder, name)
          convert.shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _merge(records: list[dict], states: dict[str, dict]) -> list[dict]:
  out = []
  for r in records:
    r = dict(r)
    r.pop('predicted_vertebra_boxes', None)
    r.pop('localizer', None)
    s = states.get(r['uid'])
    if r.get('status') == 'ok' and s:
      r['predicted_vertebra_boxes'] = s['predicted_vertebra_boxes']
      r['localizer'] = s['localizer']
    out.append(r)
  return out


def run(workdir: str, data: str, checkpoint: str = 'latest', keep_largest: bool = True,
        progress: bool = False) -> list[dict]:
  """Localizes every ok study of ``data`` not already done; returns the new manifest records."""
  # Heavy imports here: `--help` and the converter's tests stay light.
  from cspine_jax import localize_lib  # pylint: disable=g-import-not-at-top
  from cspine_jax import seg_metrics  # pylint: disable=g-import-not-at-top
  from cspine_jax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from cspine_jax.data import sources  # pylint: disable=g-import-not-at-top
  from data_tools import volume_store  # pylint: disable=g-import-not-at-top

  data = os.path.abspath(data)
  if not os.path.isfile(os.path.join(data, convert.MANIFEST)):
    raise FileNotFoundError(f'--data={data}: no {convert.MANIFEST} (run python -m '
                            'data_tools.convert first)')
  localizer = localize_lib.Localizer(workdir, checkpoint)
  tag = {'workdir': os.path.abspath(workdir), 'step': int(localizer.step),
         'method': METHOD_VERSION}
  os.makedirs(os.path.join(data, KIND), exist_ok=True)
  os.makedirs(os.path.join(data, STATE_DIR), exist_ok=True)
  _clean_temporaries(data)
  records = _read_manifest(data)
  ok = [r for r in records if r.get('status') == 'ok']
  states = {}
  todo = []
  for r in ok:
    s = _load_state(data, r['uid'])
    if _done(data, s, tag):
      states[r['uid']] = s
    else:
      todo.append(r)
  logging.info('%d ok studies: %d already localized, %d to do', len(ok), len(states), len(todo))
  reader = sources.VolumeReader(data, cache_bytes=64 << 20)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(todo), unit='study', desc='localize', file=sys.stderr)
  last_manifest = time.monotonic()
  for r in todo:
    uid = r['uid']
    study = manifest_lib.parse_study(r)
    loc = localizer.localize(reader, study, keep_largest=keep_largest)
    attrs = volume_store.read_attributes(os.path.join(data, 'volumes', uid))
    attrs.update({'units': 'label', 'labels': {'0': 'background', **{
        str(i + 1): v for i, v in enumerate(localize_lib.constants.VERTEBRAE)}},
                  'localizer': tag})
    tmp = tempfile.mkdtemp(prefix=f'.tmp-{uid}-', dir=os.path.join(data, KIND))
    convert.shutil.rmtree(tmp)  # TensorStore creates the array folder itself
    try:
      volume_store.write_array(tmp, loc.mask, attrs)
      convert._place(tmp, os.path.join(data, KIND, uid))  # pylint: disable=protected-access
    finally:
      if os.path.exists(tmp):
        convert.shutil.rmtree(tmp, ignore_errors=True)
    state = {'uid': uid, 'predicted_vertebra_boxes': loc.boxes, 'localizer': tag}
    if r.get('has_segmentation'):
      true = volume_store.read_array(os.path.join(data, 'segmentations', uid))
      state['dice'] = [None if d != d else round(float(d), 5)
                       for d in seg_metrics.dice_per_class(loc.mask, true)]
    convert._atomic_write(_state_path(data, uid),  # pylint: disable=protected-access
                          json.dumps(state, sort_keys=True))
    states[uid] = state
    if bar:
      bar.update(1)
    if time.monotonic() - last_manifest > 30:  # a killed run still leaves a useful manifest
      convert.write_manifest(data, _merge(records, states))
      last_manifest = time.monotonic()
  if bar:
    bar.close()
  merged = _merge(records, states)
  convert.write_manifest(data, merged)
  return merged


def full_grid_dice(data: str) -> dict | None:
  """Dice of the predicted masks against the true ones on the volumes' full grids.

  {studies, dice_mean, dice_C1..dice_C7} over the studies of ``data`` that have a true mask,
  from the records `run` wrote; None when none has one.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cspine_jax import seg_metrics  # pylint: disable=g-import-not-at-top
  rows = []
  for r in _read_manifest(data):
    s = _load_state(data, r['uid']) if r.get('status') == 'ok' else None
    if s and s.get('dice') is not None:
      rows.append([np.nan if d is None else d for d in s['dice']])
  if not rows:
    return None
  return {'studies': len(rows), **seg_metrics.summarize(np.asarray(rows, float))}


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Localizer training workdir (configs/localizer.py).')
  flags.DEFINE_string('data', None, 'Converted dataset (python -m data_tools.convert).')
  flags.DEFINE_string('checkpoint', 'latest', 'latest or a step.')
  flags.DEFINE_bool('keep_largest', True, 'Keep the largest connected component per vertebra.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr.')
  flags.mark_flags_as_required(['workdir', 'data'])


def main(argv):
  del argv
  start = time.time()
  records = run(FLAGS.workdir, FLAGS.data, FLAGS.checkpoint, FLAGS.keep_largest, FLAGS.progress)
  located = [r for r in records if r.get('predicted_vertebra_boxes')]
  full = [r for r in located if len(r['predicted_vertebra_boxes']) == 7]
  print(f'{len(located)} studies localized ({len(full)} with all of C1-C7) in '
        f'{time.time() - start:.1f} s -> {os.path.join(FLAGS.data, KIND)}')
  dice = full_grid_dice(FLAGS.data)
  if dice:
    print(f'Dice against the {dice["studies"]} true masks (full grid): mean '
          f'{dice["dice_mean"]:.3f}; ' + ', '.join(
              f'{k[5:]} {v:.3f}' for k, v in dice.items() if k.startswith('dice_C')))


if __name__ == '__main__':
  define_flags()
  app.run(main)
