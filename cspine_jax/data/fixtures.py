"""Small converted datasets (the converter's output layout) for tests and the pipeline benchmark.

Independent of ``data_tools.convert``/``data_tools.synthetic`` on purpose: the pipeline's tests
must not move when the converter does. Volumes are simple (a body cylinder, seven stacked bone
blocks labelled C1..C7, Gaussian noise) but have the contract's dtype, layout and manifest.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cspine_jax import constants
from cspine_jax.data import levels
from cspine_jax.data import store

STANDARD_DIRECTION = ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))  # head-first axial


def synthetic_spine(shape: Sequence[int], rng: np.random.Generator, noise_hu: float = 15.0,
                    spine_z=(0.15, 0.85)) -> tuple[np.ndarray, np.ndarray]:
  """(int16 HU volume, uint8 segmentation) of a neck-like phantom; slabs bound the memory."""
  z, y, x = (int(v) for v in shape)
  yy, xx = np.ogrid[:y, :x]
  body = ((yy - 0.5 * y) / (0.45 * y)) ** 2 + ((xx - 0.5 * x) / (0.4 * x)) ** 2 <= 1.0
  cy, cx = 0.58 * y, 0.5 * x
  bone2d = (np.abs(yy - cy) <= 0.12 * y) & (np.abs(xx - cx) <= 0.14 * x)
  z0, z1 = spine_z[0] * z, spine_z[1] * z
  edges = np.linspace(z0, z1, len(constants.VERTEBRAE) + 1)
  level = np.zeros(z, np.uint8)  # vertebra label per slice (0 = disc / outside)
  for v in range(len(constants.VERTEBRAE)):
    lo, hi = int(round(edges[v])), int(round(edges[v + 1]))
    gap = max(1, (hi - lo) // 8)
    level[lo:hi - gap] = v + 1
  volume = np.empty((z, y, x), np.int16)
  seg = np.zeros((z, y, x), np.uint8)
  slab = max(1, (16 << 20) // (y * x * 4))
  base = np.where(body, 40.0, -1000.0).astype(np.float32)
  for s in range(0, z, slab):
    e = min(z, s + slab)
    block = np.broadcast_to(base, (e - s, y, x)).copy()
    lv = level[s:e]
    block[(lv > 0)[:, None, None] & bone2d[None]] = 700.0
    if noise_hu:
      block += rng.standard_normal(block.shape, np.float32) * np.float32(noise_hu)
    volume[s:e] = np.clip(np.rint(block), -32768, 32767)
    seg[s:e] = np.where(bone2d[None], lv[:, None, None], 0)
  return volume, seg


def write_study(root: str, uid: str, volume: np.ndarray, *, spacing_mm=(1.0, 1.0, 1.0),
                segmentation: np.ndarray | None = None, labels=None, split: str = 'train',
                direction=STANDARD_DIRECTION, origin=(0.0, 0.0, 0.0), status: str = 'ok',
                with_levels: bool = True, **extra) -> dict:
  """Writes one study's arrays under ``root`` and returns its manifest record.

  ``with_levels``: also the derived levels, as the converter writes them (False: a dataset
  converted before levels existed).
  """
  geometry = {'spacing_mm': [float(v) for v in spacing_mm], 'origin': [float(v) for v in origin],
              'direction': [[float(v) for v in r] for r in direction]}
  record = {'uid': uid, 'split': split, 'status': status, 'warnings': [],
            'shape': [int(v) for v in volume.shape], **geometry,
            'has_segmentation': segmentation is not None,
            'labels': None if labels is None else [int(v) for v in labels],
            'vertebra_boxes': {}, 'fracture_boxes': []}
  if status == 'ok':
    store.write_array(store.array_path(root, store.VOLUMES, uid), volume.astype(np.int16),
                      geometry)
    if segmentation is not None:
      store.write_array(store.array_path(root, store.SEGMENTATIONS, uid),
                        segmentation.astype(np.uint8), geometry)
      record['vertebra_boxes'] = store.vertebra_boxes(segmentation)
    if with_levels:
      record['levels'] = levels.write(root, uid, volume.astype(np.int16), spacing_mm, geometry)
      if segmentation is not None:
        record['levels'] += levels.write_labels(root, uid, segmentation.astype(np.uint8),
                                                spacing_mm, geometry)
  record.update(extra)
  return record


def write_manifest(root: str, records: Sequence[dict]) -> None:
  os.makedirs(root, exist_ok=True)
  store.write_manifest(root, records)


def random_labels(rng: np.random.Generator) -> list[int]:
  """An 8-label vector at the real data's per-vertebra rates; patient = OR of C1..C7."""
  v = (rng.uniform(size=7) < np.asarray(constants.POSITIVE_RATES[1:]) * 1.5).astype(int)
  return [int(v.any())] + v.tolist()


def write_synthetic_dataset(root: str, num_studies: int, shape=(40, 48, 48),
                            spacing_mm=(2.0, 1.0, 1.0), seed: int = 0, noise_hu: float = 15.0,
                            num_test: int = 0, segmented_fraction: float = 1.0) -> list[dict]:
  """``num_studies`` labelled studies (+ ``num_test`` unlabelled test ones) under ``root``.

  Unsegmented studies get no boxes (the crop falls back to the volume centre).
  """
  rng = np.random.default_rng(seed)
  records = []
  for i in range(num_studies + num_test):
    volume, seg = synthetic_spine(shape, rng, noise_hu)
    test = i >= num_studies
    segmented = (not test) and rng.uniform() < segmented_fraction
    records.append(write_study(
        root, f'1.2.826.0.1.{seed}.{i:04d}', volume, spacing_mm=spacing_mm,
        segmentation=seg if segmented else None,
        labels=None if test else random_labels(rng), split='test' if test else 'train'))
  write_manifest(root, records)
  return records
