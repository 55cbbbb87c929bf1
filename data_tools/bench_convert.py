r"""Benchmark: our converter against SimpleITK's series reader writing compressed NIfTI.

  python -m data_tools.bench_convert --studies=4 --size=512 --workers=2

Generates (or reuses, with --input) RSNA-shaped studies, then, back to back on the same studies
and the same number of worker processes:
  ours:      python -m data_tools.convert (decode, sort, HU, zarr3 blosc-lz4 shards)
  simpleitk: ImageSeriesReader (GDCM) -> sitk.WriteImage(.nii.gz), the usual PyTorch-side step
Each side runs in its own process tree; peak RSS is the largest of that tree's processes.
``--chunks`` also measures random-crop reads for several zarr3 chunk shapes (the choice of
cspine_jax.data.store.READ_CHUNK). The last line is JSON.

The SimpleITK side's processes import this module (their worker function lives here) and their
peak RSS is measured: TensorStore and the synthetic-data writer are imported only where used.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from cspine_jax import cli  # absl only: the measured SimpleITK processes stay light

FLAGS = flags.FLAGS


def _sitk_one(args):
  folder, out = args
  import SimpleITK as sitk  # deferred: optional heavy dependency (bench only), workers only
  reader = sitk.ImageSeriesReader()
  names = reader.GetGDCMSeriesFileNames(folder)
  reader.SetFileNames(names)
  img = reader.Execute()
  sitk.WriteImage(sitk.Cast(img, sitk.sitkInt16), out, useCompression=True)
  return len(names)


def _sitk_all(input_root: str, out: str, workers: int) -> int:
  os.makedirs(out, exist_ok=True)
  base = os.path.join(input_root, 'train_images')
  jobs = [(os.path.join(base, u), os.path.join(out, u + '.nii.gz')) for u in sorted(os.listdir(base))]
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    return sum(pool.map(_sitk_one, jobs, chunksize=1))


def _timed_child(code: str) -> tuple[float, float, dict]:
  """Runs python code in a fresh process; returns (seconds, peak RSS MiB of its tree, result)."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    # One line: the child's last (its exception's); the whole stderr under CSPINE_TRACEBACK=1.
    if cli.traceback_wanted():
      sys.stderr.write(proc.stderr)
    last = ([l for l in proc.stderr.splitlines() if l.strip()] or ['no output'])[-1]
    raise cli.Failure(f'a benchmark process failed (exit {proc.returncode}): {last.strip()}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return seconds, result.pop('peak_rss_mib'), result


_PEAK = ('import resource, json\n'
         'def peak():\n'
         '  a = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
         '  b = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n'
         '  return max(a, b) / 1024\n')


def bench_convert(input_root: str, workers: int, scratch: str) -> dict:
  ours_out = os.path.join(scratch, 'ours')
  sitk_out = os.path.join(scratch, 'sitk')
  ours_code = (_PEAK + 'from data_tools import convert\n'
               f'r = convert.run({input_root!r}, {ours_out!r}, {workers}, progress=False)\n'
               'n = sum(x.get("source_slices", 0) for x in r)\n'
               'print(json.dumps({"slices": n, "peak_rss_mib": peak()}))\n')
  sitk_code = (_PEAK + 'from data_tools import bench_convert as b\n'
               f'n = b._sitk_all({input_root!r}, {sitk_out!r}, {workers})\n'
               'print(json.dumps({"slices": n, "peak_rss_mib": peak()}))\n')
  t_ours, rss_ours, r_ours = _timed_child(ours_code)
  t_sitk, rss_sitk, r_sitk = _timed_child(sitk_code)

  def size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

  return {
      'slices': r_ours['slices'],
      'ours_slices_per_s': round(r_ours['slices'] / t_ours, 1),
      'simpleitk_slices_per_s': round(r_sitk['slices'] / t_sitk, 1),
      'speedup': round((r_ours['slices'] / t_ours) / (r_sitk['slices'] / t_sitk), 2),
      'ours_peak_rss_mib': round(rss_ours, 1),
      'simpleitk_peak_rss_mib': round(rss_sitk, 1),
      'ours_mib_on_disk': round(size(ours_out) / 2**20, 1),
      'simpleitk_mib_on_disk': round(size(sitk_out) / 2**20, 1),
      'workers': workers,
  }


def bench_chunks(converted_root: str, scratch: str, crops: int = 40) -> dict:
  """Random 64^3 and 96^3 crop reads (cold cache) for several inner chunk shapes, on the first
  volume of ``converted_root``."""
  import tensorstore as ts  # deferred: kept out of the measured SimpleITK processes (docstring)
  from cspine_jax.data import store  # deferred: loads TensorStore (module docstring)
  vols = os.path.join(converted_root, store.VOLUMES)
  vol = store.read_array(os.path.join(vols, sorted(os.listdir(vols))[0]))
  results = {}
  for chunk in ((16, 64, 64), (32, 64, 64), (32, 128, 128), (64, 64, 64)):
    path = os.path.join(scratch, 'chunks_' + 'x'.join(map(str, chunk)))
    array = ts.open(store.spec(path, vol.shape, vol.dtype, {}, read_chunk=chunk),
                    create=True).result()
    array.write(vol).result()
    rng = np.random.default_rng(0)
    row = {}
    for crop in (64, 96):
      arr = store.open_array(path, ts.Context({'cache_pool': {'total_bytes_limit': 0}}))
      starts = [[rng.integers(0, n - crop + 1) for n in vol.shape] for _ in range(crops)]
      t = time.perf_counter()
      for s in starts:
        arr[s[0]:s[0] + crop, s[1]:s[1] + crop, s[2]:s[2] + crop].read().result()
      row[f'crop{crop}_per_s'] = round(crops / (time.perf_counter() - t), 1)
    row['mib'] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                           for f in fs) / 2**20, 1)
    results['x'.join(map(str, chunk))] = row
  return results


def define_flags():
  flags.DEFINE_string('input', None, 'RSNA-shaped root to convert (default: generate one).')
  flags.DEFINE_integer('studies', 4, 'Synthetic studies to generate when --input is not given.')
  flags.DEFINE_integer('size', 512, 'Slice size of generated studies.')
  flags.DEFINE_integer('workers', 2, 'Worker processes for both sides.')
  flags.DEFINE_bool('chunks', False, 'Also measure crop reads for several chunk shapes.')
  flags.DEFINE_string('scratch', None, 'Scratch folder (default: a temporary one, removed).')


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]} (flags are --name=value)')
  if FLAGS.input and not os.path.isdir(os.path.join(FLAGS.input, 'train_images')):
    raise cli.UsageError(f'--input {FLAGS.input}: no train_images/ folder in it (the RSNA layout)')
  if FLAGS.workers < 1 or FLAGS.studies < 1 or FLAGS.size < 32:
    raise cli.UsageError(f'--workers={FLAGS.workers} --studies={FLAGS.studies} '
                         f'--size={FLAGS.size}: need --workers >= 1, --studies >= 1, --size >= 32')
  scratch = FLAGS.scratch or tempfile.mkdtemp(prefix='bench_convert_')
  try:
    root = FLAGS.input
    if not root:
      from data_tools import synthetic  # deferred: loads TensorStore (module docstring)
      root = os.path.join(scratch, 'rsna')
      synthetic.generate(root, FLAGS.studies, FLAGS.size, seed=1, test_studies=0,
                         seg_fraction=0.5, workers=FLAGS.workers)
    result = bench_convert(root, FLAGS.workers, scratch)
    if FLAGS.chunks:
      result['chunks'] = bench_chunks(os.path.join(scratch, 'ours'), scratch)
    print(f'ours {result["ours_slices_per_s"]} slices/s vs SimpleITK->nii.gz '
          f'{result["simpleitk_slices_per_s"]} slices/s: {result["speedup"]}x')
    print(json.dumps(result))
  finally:
    if not FLAGS.scratch:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
