r"""Benchmark: our converter against dcm2niix (the C++ tool most imaging users reach for).

  python -m data_tools.bench_convert --studies=4 --size=512 --workers=2

Generates (or reuses, with --input) RSNA-shaped studies, warms the page cache with them, then
converts them --repeats times with each tool, the tools taking turns, and keeps each tool's best
run (the machine may be shared: the best run is the one least disturbed):
  ours:      `python -m data_tools.convert --workers=N`, the command as a user runs it (interpreter
             start and imports included): decode, sort, HU, zarr3 blosc-lz4 shards, masks, manifest
  dcm2niix:  `dcm2niix -z n -b n` (uncompressed .nii, no BIDS sidecar), one process per study, as
             it is used; run one process at a time (its per-core rate, the issue's reference) and N
             at a time (the same cores as ours). It writes no masks, manifest or HU conversion
             (it stores the raw values with a scale in the header): less work than ours.
  simpleitk: (--baselines=...,simpleitk) ImageSeriesReader (GDCM) -> .nii.gz, N processes.
Per tool: slices/s, CPU seconds (user + system, every process of the tool), slices per CPU
second, the largest process's peak RSS (N of them run at once) and bytes written. ``ratio`` is
ours over dcm2niix one process at a time; ``ratio_same_cores`` over dcm2niix N at a time.

``--profile`` (default) then converts every study once more in one process with one thread
(stages add up to the total) and records where the time goes (data_tools/stages.py): file listing
and header parsing, sorting and geometry checks, pixel decode per transfer syntax, HU conversion,
mask alignment, zarr3 encode and write, manifest and bookkeeping, in ms per slice beside
dcm2niix's total for that study (one process); and a worker's start-up (interpreter and imports)
and exit. ``--chunks`` also measures random-crop reads for several zarr3 chunk shapes (the choice
of cspine_jax.data.store.READ_CHUNK). The last line is JSON.

The baselines' processes import this module (the SimpleITK worker function lives here): it
imports no TensorStore or converter code at module level.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

from cspine_jax import cli  # absl only: the measured SimpleITK processes stay light

FLAGS = flags.FLAGS
BASELINES = ('dcm2niix', 'simpleitk')


# ---------------------------------------------------------------------------------------------
# Running a tool and measuring it.
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict | None = None) -> dict:
  """Runs ``cmd`` to its end; its wall seconds, CPU seconds (user + system) and peak RSS (the
  largest process of its tree: os.wait4 reports the child and every descendant it waited for)."""
  with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): it gives no rusage
    seconds = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    stdout.seek(0)
    stderr.seek(0)
    out, err = stdout.read().decode(errors='replace'), stderr.read().decode(errors='replace')
  if code != 0:
    # One line: the child's last (its exception's); the whole stderr under CSPINE_TRACEBACK=1.
    if cli.traceback_wanted():
      sys.stderr.write(err)
    last = ([l for l in err.splitlines() if l.strip()] or ['no output'])[-1]
    raise cli.Failure(f'{os.path.basename(cmd[0])} failed (exit {code}): {last.strip()}')
  return {'seconds': seconds, 'cpu_s': usage.ru_utime + usage.ru_stime,
          'peak_rss_mib': usage.ru_maxrss / 1024, 'stdout': out}


def _dcm2niix_binary() -> str:
  import dcm2niix  # deferred: the bench extra's, only needed here (PyPI wheel of the C++ tool)
  return dcm2niix.bin


def _run_dcm2niix(folders: list[str], out: str, parallel: int) -> dict:
  """dcm2niix on every study folder, ``parallel`` processes at a time; seconds per study."""
  binary = _dcm2niix_binary()
  os.makedirs(out, exist_ok=True)

  def one(folder):
    # The series UID names the file: unique, and no patient tag in a file name.
    return os.path.basename(folder), _run([binary, '-z', 'n', '-b', 'n', '-f', '%j', '-o', out,
                                           folder])

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    runs = dict(pool.map(one, folders))
  return {'seconds': time.perf_counter() - start,
          'cpu_s': sum(r['cpu_s'] for r in runs.values()),
          'peak_rss_mib': max(r['peak_rss_mib'] for r in runs.values()),
          'per_study_s': {uid: r['seconds'] for uid, r in runs.items()}}


def _sitk_one(args):
  folder, out = args
  import SimpleITK as sitk  # deferred: optional heavy dependency (bench only), workers only
  reader = sitk.ImageSeriesReader()
  names = reader.GetGDCMSeriesFileNames(folder)
  reader.SetFileNames(names)
  img = reader.Execute()
  sitk.WriteImage(sitk.Cast(img, sitk.sitkInt16), out, useCompression=True)
  return len(names)


def _sitk_all(folders: list[str], out: str, workers: int) -> int:
  os.makedirs(out, exist_ok=True)
  jobs = [(f, os.path.join(out, os.path.basename(f) + '.nii.gz')) for f in folders]
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    return sum(pool.map(_sitk_one, jobs, chunksize=1))


def _child_env() -> dict:
  """The environment of the measured Python processes: this checkout first on the path, so
  they run the code this module belongs to."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
  return {**os.environ, 'PYTHONPATH': os.pathsep.join([here] + path)}


def _size_mib(path: str) -> float:
  return round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                   for f in fs) / 2**20, 1)


def _study_folders(input_root: str) -> list[str]:
  base = os.path.join(input_root, 'train_images')
  return [os.path.join(base, u) for u in sorted(os.listdir(base))]


def _warm_page_cache(input_root: str) -> None:
  """Reads every input file once, so that no tool pays for the disk and the other not."""
  for folder, _, names in os.walk(input_root):
    for name in names:
      with open(os.path.join(folder, name), 'rb') as f:
        while f.read(1 << 24):
          pass


# ---------------------------------------------------------------------------------------------
# The comparison.
# ---------------------------------------------------------------------------------------------


def bench_convert(input_root: str, workers: int, scratch: str, repeats: int = 3,
                  baselines=('dcm2niix',)) -> dict:
  """Each tool converts every study of ``input_root`` ``repeats`` times, taking turns; the best
  run of each is kept. Returns the JSON record (see the module docstring)."""
  folders = _study_folders(input_root)
  _warm_page_cache(input_root)
  env = _child_env()
  tools = {
      'ours': lambda out: _run([sys.executable, '-m', 'data_tools.convert',
                                f'--input={input_root}', f'--output={out}',
                                f'--workers={workers}', '--noprogress'], env),
  }
  if 'dcm2niix' in baselines:
    tools['dcm2niix'] = lambda out: _run_dcm2niix(folders, out, 1)
    tools['dcm2niix_same_cores'] = lambda out: _run_dcm2niix(folders, out, workers)
  if 'simpleitk' in baselines:
    code = ('from data_tools import bench_convert as b\n'
            f'print(b._sitk_all({folders!r}, {{out!r}}, {workers}))\n')
    tools['simpleitk'] = lambda out: _run([sys.executable, '-c', code.format(out=out)], env)
  best: dict[str, dict] = {}
  walls: dict[str, list[float]] = {name: [] for name in tools}
  for _ in range(repeats):
    for name, run in tools.items():
      out = os.path.join(scratch, name)
      shutil.rmtree(out, ignore_errors=True)  # a fresh output: ours would skip finished studies
      result = run(out)
      result['mib_on_disk'] = _size_mib(out)
      walls[name].append(round(result['seconds'], 2))
      if name not in best or result['seconds'] < best[name]['seconds']:
        best[name] = result
  slices = _converted_slices(os.path.join(scratch, 'ours'))
  record = {'slices': slices, 'studies': len(folders), 'workers': workers, 'repeats': repeats}
  for name, r in best.items():
    record[name] = {'slices_per_s': round(slices / r['seconds'], 1),
                    'seconds': round(r['seconds'], 2), 'all_runs_s': walls[name],
                    'cpu_s': round(r['cpu_s'], 2),
                    'slices_per_cpu_s': round(slices / r['cpu_s'], 1),
                    'peak_rss_mib': round(r['peak_rss_mib'], 1), 'mib_on_disk': r['mib_on_disk']}
  for name in best:
    if name != 'ours':
      record[f'ratio_vs_{name}'] = round(best[name]['seconds'] / best['ours']['seconds'], 2)
  if 'dcm2niix' in best:
    record['ratio'] = record['ratio_vs_dcm2niix']
    record['ratio_per_core'] = round(record['ratio'] / workers, 2)
    record['dcm2niix']['per_study_s'] = {
        uid: round(s, 3) for uid, s in best['dcm2niix']['per_study_s'].items()}
  return record


def _converted_slices(out: str) -> int:
  with open(os.path.join(out, 'manifest.jsonl')) as f:
    records = [json.loads(line) for line in f]
  failed = [r['uid'] for r in records if r['status'] != 'ok']
  if failed:
    raise cli.Failure(f'our converter failed on {failed}: see {out}/manifest.jsonl')
  return sum(r['source_slices'] for r in records)


# ---------------------------------------------------------------------------------------------
# Where the time goes.
# ---------------------------------------------------------------------------------------------


def _import_converter() -> float:
  """Runs in a fresh spawned worker: what a converter worker imports by the end of its first
  study with a mask (the command's module, the DICOM reader, the NIfTI reader), and how long it
  took."""
  start = time.perf_counter()
  # pylint: disable=import-outside-toplevel,unused-import
  from data_tools import convert, dicom, nifti
  return time.perf_counter() - start


def profile_studies(input_root: str, scratch: str) -> dict:
  """Runs in its own process (see ``profile``): every study converted by one worker's code on one
  thread under stages.recording(); a worker's start-up and exit."""
  from data_tools import convert, dicom, stages  # pylint: disable=import-outside-toplevel
  from cspine_jax.data import store  # pylint: disable=import-outside-toplevel
  dicom.DECODE_THREADS = store.SHARD_THREADS = 1  # one thread: the stages add up to the total
  out = os.path.join(scratch, 'profile')
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(os.path.join(out, convert.STATE_DIR))
  labels, boxes = convert.read_labels(input_root), convert.read_boxes(input_root)
  studies = {}
  for job in convert.discover(input_root):
    with stages.recording() as rec:
      start = time.perf_counter()
      args = (job, out, labels.get(job['uid']), boxes.get(job['uid'], []))
      record = convert._worker(args)  # pylint: disable=protected-access  # what a worker runs
      total = time.perf_counter() - start
    n = record.get('source_slices') or 1
    per_slice = {name: round(1000 * s / n, 3) for name, s in sorted(rec.seconds.items())}
    per_slice['other'] = round(1000 * (total - sum(rec.seconds.values())) / n, 3)
    studies[job['uid']] = {'status': record['status'], 'slices': n,
                           'transfer_syntaxes': record.get('transfer_syntaxes'),
                           'has_segmentation': record.get('has_segmentation'),
                           'total_ms_per_slice': round(1000 * total / n, 3),
                           'stages_ms_per_slice': per_slice}
  ctx = multiprocessing.get_context('spawn')
  start = time.perf_counter()
  pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
  imports = pool.submit(_import_converter).result()
  started = time.perf_counter()
  pool.shutdown()
  return {'studies': studies, 'worker_start_s': round(started - start, 3),
          'worker_imports_s': round(imports, 3),
          'worker_exit_s': round(time.perf_counter() - started, 3)}


def profile(input_root: str, scratch: str, dcm2niix_s: dict | None) -> dict:
  """``profile_studies`` in a fresh process (the converter's modules not yet imported), beside
  dcm2niix's time for each study (one process, from the comparison's best run)."""
  code = ('import json\nfrom data_tools import bench_convert as b\n'
          f'print(json.dumps(b.profile_studies({input_root!r}, {scratch!r})))\n')
  result = json.loads(_run([sys.executable, '-c', code], _child_env())['stdout'].splitlines()[-1])
  for uid, study in result['studies'].items():
    if dcm2niix_s and uid in dcm2niix_s:
      study['dcm2niix_ms_per_slice'] = round(1000 * dcm2niix_s[uid] / study['slices'], 3)
  return result


# ---------------------------------------------------------------------------------------------
# Chunk shapes.
# ---------------------------------------------------------------------------------------------


def bench_chunks(converted_root: str, scratch: str, crops: int = 40) -> dict:
  """Random 64^3 and 96^3 crop reads (cold cache) for several inner chunk shapes, on the first
  volume of ``converted_root``."""
  import tensorstore as ts  # deferred: kept out of the measured baseline processes (docstring)
  from cspine_jax.data import store  # pylint: disable=import-outside-toplevel
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
    row['mib'] = _size_mib(path)
    results['x'.join(map(str, chunk))] = row
  return results


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def define_flags():
  flags.DEFINE_string('input', None, 'RSNA-shaped root to convert (default: generate one).')
  flags.DEFINE_integer('studies', 4, 'Synthetic studies to generate when --input is not given.')
  flags.DEFINE_integer('size', 512, 'Slice size of generated studies.')
  flags.DEFINE_integer('workers', 2, 'Our worker processes, and dcm2niix processes at a time in '
                       'the same-cores run.')
  flags.DEFINE_integer('repeats', 3, 'Runs of each tool, taking turns; the best is kept.')
  flags.DEFINE_list('baselines', ['dcm2niix'], f'Tools to compare with: any of {BASELINES}.')
  flags.DEFINE_bool('profile', True, 'Also the per-stage profile of every study.')
  flags.DEFINE_bool('chunks', False, 'Also measure crop reads for several chunk shapes.')
  flags.DEFINE_string('scratch', None, 'Scratch folder (default: a temporary one, removed).')


def _summary(result: dict) -> str:
  ours = result['ours']
  lines = [f'ours: {ours["slices_per_s"]} slices/s ({result["slices"]} slices, '
           f'{result["workers"]} workers), {ours["slices_per_cpu_s"]} slices per CPU-s, '
           f'peak RSS {ours["peak_rss_mib"]} MiB']
  for name in BASELINES + ('dcm2niix_same_cores',):
    if name in result:
      r = result[name]
      lines.append(f'{name}: {r["slices_per_s"]} slices/s, {r["slices_per_cpu_s"]} slices per '
                   f'CPU-s, peak RSS {r["peak_rss_mib"]} MiB -> ours {result["ratio_vs_" + name]}x')
  for uid, study in result.get('profile', {}).get('studies', {}).items():
    stages_ms = ', '.join(f'{k} {v}' for k, v in study['stages_ms_per_slice'].items())
    lines.append(f'profile {uid[-8:]} ({study["slices"]} slices): {study["total_ms_per_slice"]} '
                 f'ms/slice on one thread (dcm2niix {study.get("dcm2niix_ms_per_slice")}): '
                 f'{stages_ms}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments {argv[1:]} (flags are --name=value)')
  if FLAGS.input and not os.path.isdir(os.path.join(FLAGS.input, 'train_images')):
    raise cli.UsageError(f'--input {FLAGS.input}: no train_images/ folder in it (the RSNA layout)')
  if FLAGS.workers < 1 or FLAGS.studies < 1 or FLAGS.size < 32 or FLAGS.repeats < 1:
    raise cli.UsageError(f'--workers={FLAGS.workers} --studies={FLAGS.studies} '
                         f'--size={FLAGS.size} --repeats={FLAGS.repeats}: need --workers >= 1, '
                         '--studies >= 1, --size >= 32, --repeats >= 1')
  unknown = sorted(set(FLAGS.baselines) - set(BASELINES))
  if unknown:
    raise cli.UsageError(f'--baselines: unknown {unknown}; known: {list(BASELINES)}')
  scratch = FLAGS.scratch or tempfile.mkdtemp(prefix='bench_convert_')
  try:
    root = FLAGS.input
    if not root:
      from data_tools import synthetic  # deferred: kept out of the measured processes' imports
      root = os.path.join(scratch, 'rsna')
      synthetic.generate(root, FLAGS.studies, FLAGS.size, seed=1, test_studies=0,
                         seg_fraction=0.5, workers=FLAGS.workers)
    result = bench_convert(root, FLAGS.workers, scratch, FLAGS.repeats, FLAGS.baselines)
    if FLAGS.profile:
      result['profile'] = profile(root, scratch, result.get('dcm2niix', {}).get('per_study_s'))
    if FLAGS.chunks:
      result['chunks'] = bench_chunks(os.path.join(scratch, 'ours'), scratch)
    print(_summary(result))
    print(json.dumps(result))
  finally:
    if not FLAGS.scratch:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
