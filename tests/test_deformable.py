"""Deformable attention: geometry, reduction to full attention, full oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy import ndimage

from cspine_jax.models import deformable
from cspine_jax.models import layers

GRID = (2, 3, 4)  # (z, y, x) tokens, different per axis
PREFIX = 2  # CLS + DIST
WIDTH, HEADS, HEAD_DIM = 12, 4, 4  # inner 16 != width on purpose


def _make(seed=0, **kw):
  kw.setdefault('offset_groups', 2)
  return deformable.DeformableAttention(
      WIDTH, HEADS, HEAD_DIM, grid=GRID, num_prefix=PREFIX,
      rngs=nnx.Rngs(seed), **kw)


def _tokens(batch=2, seed=1):
  rng = np.random.default_rng(seed)
  n = PREFIX + int(np.prod(GRID))
  return rng.normal(size=(batch, n, WIDTH)).astype(np.float32)


def _randomize_offsets(m, scale=1.0, seed=3):
  rng = np.random.default_rng(seed)
  k = m.offset_proj.kernel
  k.set_value(jnp.asarray(rng.normal(size=k.shape) * scale, jnp.float32))


@pytest.mark.parametrize('n,kernel,stride,want', [
    (8, 3, 2, (4, (0, 1), [1.0, 3.0, 5.0, 7.0])),
    (7, 3, 2, (4, (1, 1), [0.0, 2.0, 4.0, 6.0])),
    (5, 5, 1, (5, (2, 2), [0.0, 1.0, 2.0, 3.0, 4.0])),
    (8, 5, 4, (2, (0, 1), [2.0, 6.0])),
    (3, 1, 2, (2, (0, 0), [0.0, 2.0])),
])
def test_conv_geometry(n, kernel, stride, want):
  assert deformable.conv_geometry(n, kernel, stride) == want


def test_reference_points_are_conv_window_centres():
  m = _make(downsample=(1, 2, 2), offset_kernel=(1, 3, 3))
  assert m.key_grid == (2, 2, 2)
  ref = np.asarray(deformable.reference_points(GRID, (1, 3, 3), (1, 2, 2)))
  # y: n=3, k=3, s=2 -> pad (1, 1), centres 0, 2; x: n=4 -> pad (0, 1), 1, 3.
  want = [(z, y, x) for z in (0, 1) for y in (0, 2) for x in (1, 3)]
  np.testing.assert_array_equal(ref, want)
  # The conv really produces that key grid.
  q = jnp.zeros((2, int(np.prod(GRID)), HEADS * HEAD_DIM))
  assert m.sample_points(q).shape == (2, 2, 8, 3)


def _as_full_attention(m):
  ref = layers.Attention(WIDTH, HEADS, HEAD_DIM, qkv_bias=True,
                         attention_dropout=0.0, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(9))
  cat = lambda name: jnp.concatenate(  # noqa: E731
      [getattr(getattr(m, p), name)[...] for p in ('q', 'k', 'v')], axis=-1)
  ref.qkv.kernel.set_value(cat('kernel'))
  ref.qkv.bias.set_value(cat('bias'))
  ref.out.kernel.set_value(m.out.kernel[...])
  ref.out.bias.set_value(m.out.bias[...])
  return ref


def test_stride_one_zero_offsets_is_full_attention():
  m = _make(downsample=1, offset_kernel=3, use_rpe=False)
  x = _tokens()
  points = m.sample_points(m.q(jnp.asarray(x))[:, PREFIX:])
  np.testing.assert_array_equal(
      points, jnp.broadcast_to(deformable.grid_positions(GRID), points.shape))
  got = m(jnp.asarray(x), key=None, deterministic=True)
  want = _as_full_attention(m)(jnp.asarray(x), key=None, deterministic=True)
  np.testing.assert_allclose(got, want, atol=1e-5)


def _softmax(a):
  a = a - a.max(-1, keepdims=True)
  e = np.exp(a)
  return e / e.sum(-1, keepdims=True)


def _reference(m, x):
  """Deformable attention from its definition, numpy float64 + map_coordinates."""
  b, n, _ = x.shape
  g, hg = m.groups, HEADS // m.groups
  cg = WIDTH // g
  w = lambda lin: (np.asarray(lin.kernel[...], np.float64),  # noqa: E731
                   np.asarray(lin.bias[...], np.float64))
  wq, bq = w(m.q)
  q = x @ wq + bq
  points = np.asarray(m.sample_points(jnp.asarray(q[:, PREFIX:], jnp.float32)))
  nk = points.shape[2]
  grid_x = x[:, PREFIX:].reshape((b,) + GRID + (WIDTH,))
  samples = np.zeros((b, nk, WIDTH))
  for i in range(b):
    for gi in range(g):
      for c in range(gi * cg, (gi + 1) * cg):
        samples[i, :, c] = ndimage.map_coordinates(
            jnp.asarray(grid_x[i, ..., c], jnp.float32), list(points[i, gi].T),
            order=1, mode='constant', cval=0.0)
  kv = np.concatenate([x[:, :PREFIX], samples], axis=1)
  (wk, bk), (wv, bv), (wo, bo) = w(m.k), w(m.v), w(m.out)
  split = lambda t: t.reshape(b, t.shape[1], HEADS, HEAD_DIM)  # noqa: E731
  qh, kh, vh = split(q), split(kv @ wk + bk), split(kv @ wv + bv)
  logits = np.einsum('bqhd,bkhd->bhqk', qh, kh) / np.sqrt(HEAD_DIM)
  if m.use_rpe:
    table = np.asarray(m.rpe_table[...])
    qpos = np.stack(np.meshgrid(*[np.arange(s) for s in GRID], indexing='ij'),
                    -1).reshape(-1, 3)
    for i in range(b):
      for h in range(HEADS):
        disp = (qpos[:, None] - points[i, h // hg][None] +
                np.asarray(GRID) - 1)
        bias = ndimage.map_coordinates(
            jnp.asarray(table[..., h]), list(disp.reshape(-1, 3).T), order=1,
            mode='constant', cval=0.0)
        logits[i, h, PREFIX:, PREFIX:] += np.asarray(bias).reshape(-1, nk)
  out = np.einsum('bhqk,bkhd->bqhd', _softmax(logits), vh).reshape(b, n, -1)
  return out @ wo + bo, points


@pytest.mark.parametrize('use_rpe', [False, True])
def test_matches_definition_with_learned_offsets(use_rpe):
  m = _make(downsample=(1, 2, 2), offset_kernel=(1, 3, 3), use_rpe=use_rpe,
            offset_range_factor=3.0)
  _randomize_offsets(m)
  if use_rpe:  # larger than the init so that a wrong index shows
    m.rpe_table.set_value(jax.random.normal(jax.random.key(4),
                                            m.rpe_table.shape))
  x = _tokens()
  got = m(jnp.asarray(x), key=None, deterministic=True)
  want, points = _reference(m, x.astype(np.float64))
  # Offsets really are fractional and query-dependent, else this is weak.
  ref = np.asarray(deformable.reference_points(GRID, m.kernel, m.stride))
  assert np.abs(points - ref).max() > 0.3
  assert np.abs(points[0] - points[1]).max() > 0.05
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_integer_displacement_bias_is_table_lookup():
  """With r = 1 and zero offsets the bias is a plain table gather."""
  m = _make(downsample=1, offset_kernel=1, offset_groups=1)
  m.rpe_table.set_value(jax.random.normal(jax.random.key(0),
                                          m.rpe_table.shape))
  points = jnp.broadcast_to(deformable.grid_positions(GRID), (1, 1, 24, 3))
  bias = np.asarray(m.relative_bias(points))  # (1, heads, 24, 24)
  pos = np.asarray(deformable.grid_positions(GRID), int)
  table = np.asarray(m.rpe_table[...])
  for i in (0, 7, 23):
    for j in (0, 5, 18):
      d = pos[i] - pos[j] + np.asarray(GRID) - 1
      np.testing.assert_allclose(bias[0, :, i, j], table[d[0], d[1], d[2]],
                                 rtol=1e-6)


def test_offsets_bounded_by_range_factor():
  m = _make(downsample=(1, 2, 2), offset_kernel=(1, 3, 3),
            offset_range_factor=2.0)
  _randomize_offsets(m, scale=100.0)  # saturate the tanh
  q = m.q(jnp.asarray(_tokens()))[:, PREFIX:]
  off = np.asarray(m.sample_points(q)) - np.asarray(
      deformable.reference_points(GRID, m.kernel, m.stride))
  bound = np.asarray(m.stride, np.float32) * 2.0 / 2.0  # factor * r / 2
  assert np.all(np.abs(off) <= bound + 1e-6)
  assert np.all(np.abs(off).max(axis=(0, 1, 2)) > 0.9 * bound)


def test_gradients_reach_offset_network():
  m = _make(downsample=(1, 2, 2), offset_kernel=(1, 3, 3))
  _randomize_offsets(m, scale=0.3)
  x = jnp.asarray(_tokens())
  graphdef, params = nnx.split(m)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(x, key=None, deterministic=True) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for path in (('offset_conv', 'kernel'), ('offset_proj', 'kernel'),
               ('rpe_table',)):
    g = grads
    for k in path:
      g = g[k]
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, path


def test_attention_dropout_uses_key():
  m = _make(downsample=(1, 2, 2), offset_kernel=(1, 3, 3),
            attention_dropout=0.5)
  x = jnp.asarray(_tokens())
  a = m(x, key=jax.random.key(0), deterministic=False)
  b = m(x, key=jax.random.key(0), deterministic=False)
  c = m(x, key=jax.random.key(1), deterministic=False)
  d = m(x, key=None, deterministic=True)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 1e-3
  assert np.abs(np.asarray(a - d)).max() > 1e-3
