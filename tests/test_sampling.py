"""Trilinear sampler against map_coordinates, torch grid_sample and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage
from jax import test_util

from cspine_jax.models import sampling

# Different size per axis and content that is not symmetric in any axis, so
# that any swap or flip of axes changes the result.
SHAPE = (4, 5, 7)


def _volume(channels=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=SHAPE + (channels,)).astype(np.float32)


def _points(n=300, seed=1, margin=1.5):
  """Points inside, near and outside the volume (each axis its own range)."""
  rng = np.random.default_rng(seed)
  hi = np.asarray(SHAPE, np.float32) - 1 + margin
  return rng.uniform(-margin, hi, size=(n, 3)).astype(np.float32)


def test_integer_points_return_voxels_and_zero_outside():
  vol = _volume()
  pts = np.array([[0, 0, 0], [3, 4, 6], [1, 2, 5], [2, 0, 3],
                  [-1, 0, 0], [0, 5, 0], [0, 0, 7]], np.float32)
  got = np.asarray(sampling.trilinear_sample(jnp.asarray(vol), pts))
  np.testing.assert_array_equal(got[0], vol[0, 0, 0])
  np.testing.assert_array_equal(got[1], vol[3, 4, 6])
  np.testing.assert_array_equal(got[2], vol[1, 2, 5])
  np.testing.assert_array_equal(got[3], vol[2, 0, 3])
  np.testing.assert_array_equal(got[4:], 0.0)


def test_hand_computed_point():
  vol = _volume(channels=1)
  z, y, x = 1.25, 2.5, 5.75
  want = 0.0
  for dz, wz in ((0, 0.75), (1, 0.25)):
    for dy, wy in ((0, 0.5), (1, 0.5)):
      for dx, wx in ((0, 0.25), (1, 0.75)):
        want += wz * wy * wx * vol[1 + dz, 2 + dy, 5 + dx, 0]
  got = sampling.trilinear_sample(jnp.asarray(vol),
                                  jnp.array([[z, y, x]], jnp.float32))
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)


def test_matches_map_coordinates():
  vol = _volume(channels=3)
  pts = _points()
  got = sampling.trilinear_sample(jnp.asarray(vol), pts)
  for c in range(vol.shape[-1]):
    want = ndimage.map_coordinates(jnp.asarray(vol[..., c]), list(pts.T),
                                   order=1, mode='constant', cval=0.0)
    np.testing.assert_allclose(got[:, c], want, atol=1e-5)


def test_batched_and_arbitrary_point_shapes():
  vols = np.stack([_volume(seed=0), _volume(seed=5)])
  pts = _points(24).reshape(2, 3, 4, 3)
  got = sampling.batched_trilinear_sample(jnp.asarray(vols), pts)
  assert got.shape == (2, 3, 4, 2)
  for b in range(2):
    want = sampling.trilinear_sample(jnp.asarray(vols[b]),
                                     pts[b].reshape(-1, 3))
    np.testing.assert_allclose(got[b].reshape(-1, 2), want, atol=1e-6)


def _torch_grid_sample(vol, pts, align_corners):
  torch = pytest.importorskip('torch')
  # (Z, Y, X, C) -> (N=1, C, D, H, W); grid (1, 1, 1, P, 3) ordered (x, y, z).
  inp = torch.from_numpy(np.ascontiguousarray(vol.transpose(3, 0, 1, 2)))[None]
  grid = torch.from_numpy(np.array(pts, np.float32))[None, None, None]
  out = torch.nn.functional.grid_sample(
      inp, grid, mode='bilinear', padding_mode='zeros',
      align_corners=align_corners)
  return out[0, :, 0, 0].numpy().T  # (P, C)


@pytest.mark.parametrize('align_corners', [True, False])
def test_matches_torch_grid_sample(align_corners):
  vol = _volume()
  pts = _points()
  got = sampling.trilinear_sample(jnp.asarray(vol), pts)
  grid = sampling.to_grid_sample(jnp.asarray(pts), SHAPE,
                                 align_corners=align_corners)
  want = _torch_grid_sample(vol, grid, align_corners)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_torch_oracle_catches_axis_order():
  """Feeding grid_sample (z, y, x) instead of (x, y, z) must not pass."""
  vol = _volume()
  pts = _points()
  got = sampling.trilinear_sample(jnp.asarray(vol), pts)
  grid = sampling.to_grid_sample(jnp.asarray(pts), SHAPE, align_corners=True)
  wrong = _torch_grid_sample(vol, np.asarray(grid)[:, ::-1].copy(), True)
  assert np.abs(np.asarray(got) - wrong).max() > 0.1


def test_gradients_numerically():
  with jax.enable_x64(True):
    vol = jnp.asarray(_volume(), jnp.float64)
    pts = _points(40, margin=0.8).astype(np.float64)
    # Keep away from the kinks at integer coordinates (non-differentiable).
    frac = pts - np.floor(pts)
    pts = np.floor(pts) + np.clip(frac, 0.1, 0.9)
    pts = jnp.asarray(pts)
    f = lambda v, p: jnp.sum(jnp.sin(sampling.trilinear_sample(v, p)))  # noqa: E731
    test_util.check_grads(f, (vol, pts), order=1, modes=('rev', 'fwd'),
                          eps=1e-4, atol=1e-6, rtol=1e-6)


def test_coordinate_gradient_of_linear_ramp_is_its_slope():
  z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE],
                        indexing='ij')
  ramp = (0.5 * z - 2.0 * y + 3.0 * x)[..., None]
  pts = jnp.array([[1.3, 2.6, 4.2], [0.5, 3.1, 0.7], [2.9, 0.2, 5.5]])
  f = lambda p: sampling.trilinear_sample(jnp.asarray(ramp), p).sum()  # noqa: E731
  np.testing.assert_allclose(jax.grad(f)(pts), [[0.5, -2.0, 3.0]] * 3,
                             rtol=1e-5)
  np.testing.assert_allclose(
      sampling.trilinear_sample(jnp.asarray(ramp), pts)[:, 0],
      0.5 * pts[:, 0] - 2.0 * pts[:, 1] + 3.0 * pts[:, 2], rtol=1e-5)
