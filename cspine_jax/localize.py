r"""Runs a trained localizer over a converted dataset: predicted masks and vertebra boxes.

  python -m cspine_jax.localize --workdir=LOCALIZER_WORKDIR --data=CONVERTED [--checkpoint=latest]
  python -m data_tools.localize ...   (the same command, under the name the data tools use)

For every ok study of CONVERTED/manifest.jsonl writes
  CONVERTED/predicted_segmentations/<UID>/   zarr3 uint8 on the volume's full grid, 0 background,
                                             1-7 = C1-C7 (the layout of segmentations/)
and adds to its manifest record
  predicted_vertebra_boxes   {"C1": [z0, y0, x0, z1, y1, x1], ...} end-exclusive voxel indices
  localizer                  {"workdir": ..., "step": ..., "method": ..., "coarse": {"workdir":
                             ..., "step": ...}} (which models and post-processing predicted
                             them; "coarse" for a localizer with a coarse pass)
WORKDIR is the localizer of configs/localizer.py; its config names the coarse pass
(configs/localizer_coarse.py, `config.localizer.coarse_workdir`), which places its crop. A
one-pass localizer (data.crop_mode='volume', e.g. trained with configs/localizer_coarse.py or an
older configs/localizer.py) runs alone.
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

import os
import time

from absl import app
from absl import flags

from cspine_jax import cli
from cspine_jax import localize_lib
from cspine_jax.data import kvstore
from cspine_jax.data import store

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'Localizer training workdir (configs/localizer.py).')
  flags.DEFINE_string('data', None, 'Converted dataset (python -m data_tools.convert).')
  flags.DEFINE_string('checkpoint', 'latest', 'latest or a step.')
  flags.DEFINE_bool('keep_largest', True, 'Keep the largest connected component per vertebra.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar on stderr.')
  flags.mark_flags_as_required(['workdir', 'data'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  data = store.dataset(FLAGS.data, '--data', write=True)
  if not os.path.isfile(os.path.join(FLAGS.workdir, 'config.json')):
    raise cli.UsageError(f'--workdir={FLAGS.workdir}: not a training workdir (no config.json)')
  start = time.time()
  records = localize_lib.run(FLAGS.workdir, data, FLAGS.checkpoint, FLAGS.keep_largest,
                             FLAGS.progress)
  located = [r for r in records if r.get('predicted_vertebra_boxes')]
  full = [r for r in located if len(r['predicted_vertebra_boxes']) == 7]
  print(f'{len(located)} studies localized ({len(full)} with all of C1-C7) in '
        f'{time.time() - start:.1f} s -> '
        f'{kvstore.join(data, store.PREDICTED_SEGMENTATIONS)}')
  dice = localize_lib.full_grid_dice(data)
  if dice:
    print(f'Dice against the {dice["studies"]} true masks (full grid): mean '
          f'{dice["dice_mean"]:.3f}; ' + ', '.join(
              f'{k[5:]} {v:.3f}' for k, v in dice.items() if k.startswith('dice_C')))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
