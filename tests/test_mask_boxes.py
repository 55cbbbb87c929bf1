"""The mask helpers that work only inside a mask's non-zero box (store.nonzero_box,
store.vertebra_boxes, nifti.cervical_labels) against the whole-array references: SciPy's
find_objects and a plain table lookup."""
import numpy as np
import pytest
from scipy import ndimage

from cspine_jax import constants
from cspine_jax.data import store
from data_tools import nifti


def _find_objects_boxes(mask):
  boxes = {}
  for i, sl in enumerate(ndimage.find_objects(mask, max_label=len(constants.VERTEBRAE))):
    if sl is not None:
      boxes[constants.VERTEBRAE[i]] = [int(s.start) for s in sl] + [int(s.stop) for s in sl]
  return boxes


def _random_masks(dtype, n=60):
  rng = np.random.default_rng(3)
  for _ in range(n):
    mask = np.zeros((30, 40, 50), dtype)
    for _ in range(rng.integers(0, 6)):  # 0 blocks: an empty mask
      label = rng.integers(-2 if np.dtype(dtype).kind == 'i' else 0, 12)  # thoracic, unknown too
      z, y, x = rng.integers(0, 30), rng.integers(0, 40), rng.integers(0, 50)
      mask[z:z + rng.integers(1, 9), y:y + rng.integers(1, 9), x:x + rng.integers(1, 9)] = label
    yield mask


@pytest.mark.parametrize('dtype', [np.uint8, np.int16, np.int32])
def test_vertebra_boxes_equal_find_objects(dtype):
  seen = set()
  for mask in _random_masks(dtype):
    boxes = store.vertebra_boxes(mask)
    assert boxes == _find_objects_boxes(mask)
    seen.update(boxes)
  assert len(seen) == 7  # every label was exercised


@pytest.mark.parametrize('dtype', [np.uint8, np.int16])
def test_cervical_labels_and_nonzero_box(dtype):
  lut = np.zeros(256, np.uint8)
  lut[1:8] = np.arange(1, 8)
  for mask in _random_masks(dtype):
    expected = np.where((mask >= 1) & (mask <= 7), mask, 0).astype(np.uint8)
    out = nifti.cervical_labels(mask)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    box = store.nonzero_box(mask)
    if box is None:
      assert not mask.any()
      continue
    assert np.count_nonzero(mask[box]) == np.count_nonzero(mask)
    for axis, sl in enumerate(box):  # tight: the first and last index along each axis hold one
      planes = np.moveaxis(mask, axis, 0)
      assert planes[sl.start].any() and planes[sl.stop - 1].any()
