"""store.write_shards (the converter's zarr3 writer, numpy and c-blosc) against TensorStore's: the
same files byte for byte, read back exactly, without a second copy of the array in memory."""
import os
import tracemalloc

import numpy as np
import pytest

from cspine_jax.data import store


def _files(root) -> dict[str, bytes]:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(folder, name), 'rb') as f:
        out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
  return out


def _cases():
  rng = np.random.default_rng(0)
  volume = rng.normal(0, 300, (70, 300, 260)).astype(np.int16)  # edge shards, partial chunks
  volume[:32, :64, :64] = 0  # an inner chunk of fill value: not stored
  volume[64:, 256:, :] = 0  # a whole shard of fill value: no file
  mask = np.zeros((130, 200, 140), np.uint8)  # one-byte values: no endianness in zarr.json
  mask[40:90, 50:120, 30:100] = rng.integers(0, 8, (50, 70, 70))
  return {'volume': volume, 'mask': mask, 'zeros': np.zeros((5, 7, 9), np.int16),
          'tiny': rng.integers(-3000, 3000, (3, 20, 33)).astype(np.int16)}


@pytest.mark.parametrize('case', sorted(_cases()))
def test_write_shards_writes_tensorstores_bytes(tmp_path, case):
  array = _cases()[case]
  attrs = {'spacing_mm': [0.488281, 0.5, 1e-05], 'origin': [-123.456789, 0.1, -0.0],
           'direction': [[1.0, 0.0, -0.0], [0, 1, 2e-08]], 'uid': '1.2.3',
           'labels': {'0': 'background', '1': 'C1'}, 'frame': 'LPS; z'}
  store.write_array(str(tmp_path / 'ts'), array, attrs)
  store.write_shards(str(tmp_path / 'ours'), array, attrs)
  ours, reference = _files(tmp_path / 'ours'), _files(tmp_path / 'ts')
  assert sorted(ours) == sorted(reference)
  assert all(ours[name] == reference[name] for name in reference)
  if case == 'volume':
    assert len(ours) == 1 + 6  # zarr.json and 2 x 2 x 2 shards, two of them all fill value
  np.testing.assert_array_equal(store.read_array(str(tmp_path / 'ours')), array)
  assert store.read_attributes(str(tmp_path / 'ours')) == attrs


def test_crc32c_known_value():
  assert store.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value
  assert store.crc32c(b'') == 0


def test_write_shards_holds_no_second_copy(tmp_path):
  """Besides the array, only the shards in flight: a bounded, small part of it."""
  array = np.random.default_rng(1).integers(-1000, 1000, (256, 256, 256)).astype(np.int16)
  tracemalloc.start()  # numpy's and Python's allocations
  try:
    store.write_shards(str(tmp_path / 'a'), array)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # 2 threads x one shard's buffer (64 x 256 x 256 int16 = 8 MiB) and small change.
  assert peak < 0.6 * array.nbytes, (peak, array.nbytes)
  np.testing.assert_array_equal(store.read_array(str(tmp_path / 'a')), array)


def test_write_shards_refuses_what_it_cannot_write_identically(tmp_path):
  with pytest.raises(TypeError, match='integer arrays only'):
    store.write_shards(str(tmp_path / 'f'), np.zeros((2, 2, 2), np.float32))
  with pytest.raises(ValueError):  # NaN is not JSON: nothing is written
    store.write_shards(str(tmp_path / 'n'), np.zeros((2, 2, 2), np.int16), {'x': float('nan')})
  assert not os.path.exists(tmp_path / 'n')
