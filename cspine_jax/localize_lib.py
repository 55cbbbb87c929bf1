"""Running a trained localizer on one volume: low-res labels -> full-grid mask -> vertebra boxes.

Shared by `python -m data_tools.localize` (a converted dataset) and `python -m cspine_jax.predict`
(one DICOM folder in memory), so both produce the same masks and boxes. Every crop goes through
the pipeline's own code (`transforms.volume_crop_map`, `geometry.resample`): the model sees at
inference exactly the grid it was trained on.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.ndimage as ndi

from cspine_jax import constants
from cspine_jax.data import config as data_config
from cspine_jax.data import geometry
from cspine_jax.data import manifest as manifest_lib
from cspine_jax.data import sources
from cspine_jax.data import transforms


class ArrayReader:
  """A ``VolumeReader`` stand-in over arrays in memory: {kind: {uid: (z, y, x) array}}."""

  def __init__(self, arrays: dict):
    self._arrays = arrays

  def reader_for(self, kind: str, uid: str):
    a = self._arrays[kind][uid]
    return lambda lo, hi: a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def study_from_geometry(uid: str, shape, spacing_mm, direction, origin=(0.0, 0.0, 0.0),
                        predicted_boxes=None) -> manifest_lib.Study:
  """A manifest ``Study`` for a volume that is not in any manifest (e.g. a DICOM folder)."""
  return manifest_lib.Study(
      uid=uid, split='test', shape=tuple(int(v) for v in shape),
      spacing_mm=tuple(float(v) for v in spacing_mm),
      origin=tuple(float(v) for v in origin),
      direction=tuple(tuple(float(v) for v in r) for r in direction),
      has_segmentation=False, labels=None, vertebra_boxes={},
      predicted_vertebra_boxes=dict(predicted_boxes or {}))


def largest_components(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Keeps, for each label 1..num_classes-1, only its largest 26-connected component.

  A vertebra is one piece of bone; stray voxels of its label elsewhere (a look-alike level
  further down) would stretch its box. Run at the localizer's resolution, where it is cheap.
  """
  out = np.zeros_like(labels)
  structure = np.ones((3, 3, 3), bool)
  for c in range(1, num_classes):
    comp, n = ndi.label(labels == c, structure=structure)
    if n == 0:
      continue
    sizes = np.bincount(comp.ravel())[1:]
    out[comp == 1 + int(np.argmax(sizes))] = c
  return out


def upsample_labels(labels: np.ndarray, cmap: geometry.CropMap, volume_shape) -> np.ndarray:
  """Nearest-neighbour labels on the volume's full grid from labels on the crop grid.

  The crop samples the volume at i = M o + c; each volume voxel takes the label of the crop
  voxel nearest to o = M^-1 (i - c). For a diagonal M (every axial scan in the canonical
  orientation) that is a separable gather (one index vector per axis, ~0.3 s for 512^2 x 300);
  otherwise a general nearest-neighbour affine resampling.
  """
  m = np.asarray(cmap.matrix, float)
  off = np.asarray(cmap.offset, float)
  n = np.asarray(labels.shape)
  if np.count_nonzero(m - np.diag(np.diagonal(m))) == 0:
    idx = []
    for axis in range(3):
      i = np.arange(volume_shape[axis], dtype=float)
      o = np.rint((i - off[axis]) / m[axis, axis]).astype(np.int64)
      idx.append(np.clip(o, 0, n[axis] - 1))
    return labels[np.ix_(*idx)]
  inv = np.linalg.inv(m)
  return ndi.affine_transform(labels, inv, offset=-inv @ off, output_shape=tuple(volume_shape),
                              order=0, mode='nearest', prefilter=False)


def vertebra_boxes(mask: np.ndarray) -> dict[str, list[int]]:
  """{"C1": [z0, y0, x0, z1, y1, x1], ...} end-exclusive, for the labels present (as convert)."""
  boxes = {}
  for i, sl in enumerate(ndi.find_objects(mask, max_label=len(constants.VERTEBRAE))):
    if sl is not None:
      boxes[constants.VERTEBRAE[i]] = [int(s.start) for s in sl] + [int(s.stop) for s in sl]
  return boxes


@dataclasses.dataclass
class Localization:
  mask: np.ndarray  # (z, y, x) uint8 on the volume's grid, 0 and 1..7 = C1..C7
  boxes: dict[str, list[int]]  # end-exclusive voxel boxes of the labels present
  lowres: np.ndarray  # the localizer's labels on its own grid
  timings: dict[str, float]


class Localizer:
  """A trained localizer (``model.mode='segment'``) restored from its workdir."""

  def __init__(self, workdir: str, checkpoint: str = 'latest', mesh=None):
    import jax  # pylint: disable=g-import-not-at-top
    from cspine_jax import parallel  # pylint: disable=g-import-not-at-top
    from cspine_jax import train_lib  # pylint: disable=g-import-not-at-top
    from cspine_jax import train_loop  # pylint: disable=g-import-not-at-top
    self.mesh = mesh or parallel.make_mesh()
    config, graphdef, self.state, self.step = train_loop.load_frozen_model(
        workdir, checkpoint, self.mesh)
    if not train_lib.is_segmentation(config):
      raise ValueError(f'{workdir}: model.mode={config.model.get("mode")!r}, not a localizer '
                       '(train one with configs/localizer.py)')
    self.config = config
    self.cfg = data_config.resolve(config)
    self.windows = tuple(tuple(float(v) for v in w) for w in self.cfg.windows)
    self.num_classes = 1 + len(constants.VERTEBRAE)
    self._segment = jax.jit(train_lib.make_segment_fn(graphdef,
                                                      use_ema=bool(config.get('ema_decay'))))

  def input_for(self, reader, study) -> tuple[np.ndarray, geometry.CropMap]:
    """(1, z, y, x, C) model input of the whole volume, and the map it was sampled through."""
    cmap = transforms.volume_crop_map(study.shape, study.spacing_mm, study.direction, self.cfg)
    hu = geometry.resample(reader.reader_for(sources.VOLUMES, study.uid), study.shape, cmap,
                           self.cfg.pad_hu)
    return transforms.apply_windows(hu, self.windows)[None], cmap

  def segment_lowres(self, images: np.ndarray) -> np.ndarray:
    """(B, z, y, x, C) -> (B, z, y, x) uint8 labels on the localizer's grid."""
    import jax  # pylint: disable=g-import-not-at-top
    return np.asarray(jax.device_get(self._segment(self.state, images)))

  def localize(self, reader, study, keep_largest: bool = True) -> Localization:
    """The localizer on one study: its full-grid mask and vertebra boxes."""
    t = {}
    t0 = time.perf_counter()
    image, cmap = self.input_for(reader, study)
    t['resample_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    low = self.segment_lowres(image)[0]
    t['model_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if keep_largest:
      low = largest_components(low, self.num_classes)
    mask = upsample_labels(low, cmap, study.shape)
    boxes = vertebra_boxes(mask)
    t['upsample_s'] = time.perf_counter() - t0
    return Localization(mask=mask, boxes=boxes, lowres=low, timings=t)
