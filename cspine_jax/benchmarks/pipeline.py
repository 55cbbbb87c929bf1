"""Input-pipeline benchmark (``python -m cspine_jax.bench pipeline``; flags in cspine_jax/bench.py).

Training crops/s, batches/s and peak memory of ``cspine_jax.data`` (threads over TensorStore), and
with ``compare_monai`` of the loader a PyTorch user would write today (MONAI ``LoadImaged`` of
NIfTI copies of the same volumes, crop around the same box, resize, the same augmentations and
windows, ``torch.utils.data.DataLoader`` with ``workers`` worker processes; ours gets ``workers``
reader threads: equal cores). Without a ``data.root`` a synthetic converted dataset of CT-sized
volumes is written to ``bench_dir`` first (reused on later runs). Each loader runs in its own
spawned process; memory is sampled over that process and its children (sum of RSS, and of PSS,
which counts shared pages once).

Every spawned loader process imports this module (its target lives here): what it imports at the
top is in both measured processes, so each loader's own stack (Grain/JAX for ours, torch/MONAI for
theirs) and what only the parent needs (nibabel) are imported where they are used.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import time

from absl import logging
import ml_collections
import numpy as np
import psutil

from cspine_jax.data import config as data_config
from cspine_jax.data import fixtures
from cspine_jax.data import geometry
from cspine_jax.data import manifest
from cspine_jax.data import sources
from cspine_jax.data import store


# ----------------------------------------------------------------------------------------------
# Data for the benchmark.


def synthetic_root(bench_dir, studies, shape, spacing) -> str:
  """A converted dataset of synthetic CT-sized studies (with derived levels), written once."""
  tag = f'synthetic_{studies}x' + 'x'.join(str(int(v)) for v in shape) + '_levels'

  root = os.path.join(bench_dir, tag)
  if not os.path.exists(store.manifest_path(root)):
    logging.info('writing synthetic dataset %s', root)
    tmp = root + '.partial'
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    fixtures.write_synthetic_dataset(tmp, studies, shape=shape, spacing_mm=spacing, seed=0)
    os.rename(tmp, root)
  return root


def _nifti_copies(root, studies, fmt, out_dir) -> list[dict]:
  """NIfTI copy of each volume (x, y, z voxel order, RAS affine); written once."""
  import nibabel as nib  # deferred: parent only, not in the measured loader processes
  os.makedirs(out_dir, exist_ok=True)
  reader = sources.VolumeReader(root, cache_bytes=0)
  items = []
  for s in studies:
    path = os.path.join(out_dir, f'{s.uid}.{fmt}')
    if not os.path.exists(path):
      vol = reader.read(store.VOLUMES, s.uid, (0, 0, 0), s.shape)
      # Columns: RAS direction * spacing of the x, y, z voxel axes (LPS -> RAS flips x, y).
      lps = np.asarray(s.direction)[::-1] * np.asarray(s.spacing_mm)[::-1, None]
      affine = np.eye(4)
      affine[:3, :3] = (lps * np.array([-1.0, -1.0, 1.0])).T
      affine[:3, 3] = np.asarray(s.origin) * np.array([-1.0, -1.0, 1.0])
      nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), affine),
               path + '.partial.' + fmt)
      os.rename(path + '.partial.' + fmt, path)
    items.append(path)
  return items


# ----------------------------------------------------------------------------------------------
# The loaders, each measured in its own spawned process.


def _tree_cpu_seconds() -> float:
  """User + system CPU time of this process and its live children (DataLoader workers)."""
  me = psutil.Process()
  total = 0.0
  for p in [me] + me.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def _timed(it, batches, warmup) -> dict:
  for _ in range(warmup):
    next(it)
  t, cpu = time.perf_counter(), _tree_cpu_seconds()
  for _ in range(batches):
    b = next(it)
  return {'seconds': time.perf_counter() - t, 'cpu_seconds': _tree_cpu_seconds() - cpu,
          'shape': list(b['image' if 'image' in b else 'block'].shape)}


def _run_ours(cfg_dict, batches, warmup, queue):
  from cspine_jax.data import pipeline as data_pipeline  # deferred: Grain/JAX in 'ours' only
  cfg = ml_collections.ConfigDict(cfg_dict)
  it, _ = data_pipeline.make_train_iterator(cfg, 0, 1)
  queue.put(_timed(it, batches, warmup))


def _monai_loader(cfg, studies, paths, workers):
  """What a PyTorch user writes: MONAI dict transforms + torch DataLoader worker processes."""
  import torch  # deferred: optional heavy dependency (bench only), MONAI loader process only
  from monai import transforms as mt  # deferred: as torch
  from monai.data import Dataset  # deferred: as torch

  shape_xyz = tuple(int(v) for v in cfg.input_shape[::-1])
  fov_mm_xyz = np.asarray(cfg.input_shape[::-1], float) * np.asarray(cfg.spacing_mm[::-1])
  aug = cfg.augment

  class BoxCropd(mt.MapTransform):
    """Crop the field of view around the box centre (padded with air where outside)."""

    def __call__(self, data):
      d = dict(data)
      img = d['image']  # (1, x, y, z) after EnsureChannelFirstd
      size = np.maximum(1, np.round(fov_mm_xyz / np.asarray(d['spacing_xyz']))).astype(int)
      crop = mt.SpatialCrop(roi_center=d['center_xyz'], roi_size=size)
      pad = mt.SpatialPad(spatial_size=size, mode='constant', value=cfg.pad_hu)
      d['image'] = pad(crop(img))
      return d

  def window_keys():
    return [f'w{c}' for c in range(len(cfg.windows))]

  xforms = [
      mt.LoadImaged(keys='image', image_only=True, dtype=np.float32),
      mt.EnsureChannelFirstd(keys='image'),
      BoxCropd(keys='image'),
      mt.Resized(keys='image', spatial_size=shape_xyz, mode='trilinear'),
      mt.RandAffined(keys='image', prob=1.0, rotate_range=[np.deg2rad(aug.rotate_deg)] * 3,
                     scale_range=[aug.scale] * 3,
                     translate_range=list(np.asarray(aug.jitter_mm)[::-1]
                                          / np.asarray(cfg.spacing_mm[::-1])),
                     mode='bilinear', padding_mode='border'),
      mt.RandFlipd(keys='image', prob=aug.flip_x_prob, spatial_axis=0),
      mt.RandScaleIntensityd(keys='image', factors=aug.intensity_scale, prob=1.0),
      mt.RandShiftIntensityd(keys='image', offsets=aug.intensity_shift_hu, prob=1.0),
      mt.RandGaussianNoised(keys='image', std=aug.noise_hu, prob=1.0),
      mt.CopyItemsd(keys='image', times=len(cfg.windows), names=window_keys()),
  ]
  for key, (center, width) in zip(window_keys(), cfg.windows):
    xforms.append(mt.ScaleIntensityRanged(keys=key, a_min=center - width / 2,
                                          a_max=center + width / 2, b_min=0.0, b_max=1.0,
                                          clip=True))
  xforms += [mt.ConcatItemsd(keys=window_keys(), name='image'),
             mt.DeleteItemsd(keys=window_keys()), mt.ToTensord(keys=['image', 'labels'])]

  items = []
  for s, path in zip(studies, paths):
    box = geometry.region_box(s.boxes)
    center = (geometry.box_center(box) if box is not None
              else (np.asarray(s.shape) - 1) / 2.0)
    items.append({'image': path, 'center_xyz': [float(v) for v in center[::-1]],
                  'spacing_xyz': list(s.spacing_mm[::-1]),
                  'labels': np.asarray(s.labels or [0] * 8, np.float32)})
  ds = Dataset(items, transform=mt.Compose(xforms))
  return torch.utils.data.DataLoader(
      ds, batch_size=int(cfg.batch_size), shuffle=True, num_workers=workers,
      persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
      drop_last=True,
      # Linux's usual start method (this process never touched TensorStore, so fork is safe);
      # spawned here it would have to pickle the dataset's local transform class.
      multiprocessing_context='fork' if workers > 0 else None)


def _run_monai(cfg_dict, studies, paths, workers, batches, warmup, queue):
  import torch  # deferred: optional heavy dependency (bench only), MONAI loader process only
  torch.set_num_threads(1)
  cfg = ml_collections.ConfigDict(cfg_dict)
  loader = _monai_loader(cfg, studies, paths, workers)

  def endless():
    while True:
      yield from loader

  queue.put(_timed(endless(), batches, warmup))


def _measure(target, args) -> dict:
  """Runs ``target(*args, queue)`` in a spawned process; samples its tree's memory."""
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  proc = ctx.Process(target=target, args=tuple(args) + (queue,))
  proc.start()
  peak = {'rss': 0, 'pss': 0}
  done = threading.Event()

  def sample():
    root = psutil.Process(proc.pid)
    while not done.is_set():
      rss = pss = 0
      try:
        for p in [root] + root.children(recursive=True):
          try:
            m = p.memory_full_info()
            rss, pss = rss + m.rss, pss + m.pss
          except psutil.Error:
            pass
      except psutil.Error:
        break
      peak['rss'], peak['pss'] = max(peak['rss'], rss), max(peak['pss'], pss)
      time.sleep(0.1)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    while True:  # A child that dies (e.g. killed for memory) must not hang the benchmark.
      try:
        result = queue.get(timeout=1.0)
        break
      except Exception:  # pylint: disable=broad-except  (queue.Empty)
        if not proc.is_alive():
          raise RuntimeError(f'{target.__name__} exited with {proc.exitcode} and no result')
  finally:
    done.set()
    proc.join(timeout=60)
    if proc.is_alive():
      proc.terminate()
  sampler.join()
  result['peak_rss_mb'] = round(peak['rss'] / 2**20, 1)
  result['peak_pss_mb'] = round(peak['pss'] / 2**20, 1)
  return result


def _rates(result, batch_size, batches) -> dict:
  crops = batch_size * batches
  return {'crops_per_s': round(crops / result['seconds'], 2),
          'batches_per_s': round(batches / result['seconds'], 3),
          # Contention-proof cost: CPU seconds (all threads and worker processes) per crop.
          'cpu_s_per_crop': round(result['cpu_seconds'] / crops, 3),
          'peak_rss_mb': result['peak_rss_mb'], 'peak_pss_mb': result['peak_pss_mb'],
          'batch_shape': result['shape']}


def bench_pipeline(config, *, batches: int = 12, warmup: int = 2, workers: int | None = None,
                   batch_size: int | None = None, cache_mb: int | None = None, repeats: int = 1,
                   compare_monai: bool = False, monai_formats=('nii.gz', 'nii'),
                   compare_paths: bool = False,
                   bench_dir: str = '/tmp/cspine_bench', bench_studies: int = 8,
                   bench_shape=(300, 512, 512), bench_spacing=(0.7, 0.35, 0.35)) -> dict:
  """The benchmark's report (see the module docstring; arguments as the command's flags)."""
  cfg = data_config.resolve(config)
  if not cfg.root:
    cfg.root = synthetic_root(bench_dir, bench_studies, [int(v) for v in bench_shape],
                               [float(v) for v in bench_spacing])
  if batch_size:
    cfg.batch_size = batch_size
  if cache_mb is not None:
    cfg.cache_mb = cache_mb
  workers = workers or int(cfg.num_threads)
  cfg.num_threads = workers
  cfg.num_workers = 0
  cfg.fold = -1  # every labelled study: the benchmark is about reading, not splits
  studies = manifest.select(manifest.load_manifest(cfg.root), 'train', fold=-1, num_folds=1)
  b = int(cfg.batch_size)
  out = {'benchmark': 'pipeline', 'root': cfg.root, 'studies': len(studies), 'batch_size': b,
         'workers': workers, 'cpu_count': os.cpu_count(), 'input_shape': list(cfg.input_shape),
         'spacing_mm': list(cfg.spacing_mm), 'windows': [list(w) for w in cfg.windows],
         'cache_mb': cfg.cache_mb, 'prefetch': cfg.prefetch}
  loaders = [('ours', _run_ours, (cfg.to_dict(), batches, warmup))]
  if compare_paths:
    # The same crops read the other ways, side by side (module docstring): the full-resolution
    # volume (the path before derived levels existed), and the other side of crop_on.
    variants = {'ours_full_resolution': {'levels': False, 'crop_on': 'host'},
                'ours_levels_host': {'levels': True, 'crop_on': 'host'}}
    if cfg.crop_mode == 'region' and not cfg.with_segmentation and not cfg.fit_to_box:
      variants['ours_device_blocks'] = {'levels': True, 'crop_on': 'device'}
    for name, changes in variants.items():
      if all(cfg[k] == v for k, v in changes.items()):
        continue  # that is 'ours' itself
      loaders.append((name, _run_ours, ({**cfg.to_dict(), **changes}, batches, warmup)))
  if compare_monai:
    for fmt in monai_formats:
      paths = _nifti_copies(cfg.root, studies, fmt, os.path.join(bench_dir, 'nifti',
                                                                os.path.basename(cfg.root)))
      loaders.append(('monai_' + fmt.replace('.', '_'), _run_monai,
                      (cfg.to_dict(), studies, paths, workers, batches, warmup)))
  # Loaders alternate, `repeats` rounds: on a shared machine the load changes by the minute, and
  # the best round of each is the least disturbed one.
  runs = {name: [] for name, _, _ in loaders}
  for r in range(repeats):
    for name, target, args in loaders:
      print(f'[{r + 1}/{repeats}] {name}: {workers} cores, batch {b}, {batches} batches',
            flush=True)
      runs[name].append(_rates(_measure(target, args), b, batches))
      print(f'  {runs[name][-1]}', flush=True)
  for name, rs in runs.items():
    best = max(rs, key=lambda x: x['crops_per_s'])
    out[name] = dict(best, cpu_s_per_crop=float(np.median([x['cpu_s_per_crop'] for x in rs])),
                     peak_rss_mb=max(x['peak_rss_mb'] for x in rs),
                     peak_pss_mb=max(x['peak_pss_mb'] for x in rs),
                     crops_per_s_runs=[x['crops_per_s'] for x in rs])
    if name.startswith('ours_'):
      out[name + '_cpu_ratio'] = round(out[name]['cpu_s_per_crop'] /
                                       out['ours']['cpu_s_per_crop'], 2)
    elif name != 'ours':
      out[name + '_speedup'] = round(out['ours']['crops_per_s'] / out[name]['crops_per_s'], 2)
      out[name + '_cpu_ratio'] = round(out[name]['cpu_s_per_crop'] /
                                       out['ours']['cpu_s_per_crop'], 2)
  return out
