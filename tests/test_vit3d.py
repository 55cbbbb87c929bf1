"""ViT3D: shapes, dtypes, determinism, scan = unrolled, heads, distillation."""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cspine_jax import constants
from cspine_jax.benchmarks import flops
from cspine_jax.models.factory import build_backbone as build_model
from cspine_jax.models import heads
from cspine_jax.models import layers

# Tiny and anisotropic: grid (2, 3, 2) tokens of 2x2x4 voxels, 2 channels.
TINY = dict(input_shape=(4, 6, 8), in_channels=2, patch_size=(2, 2, 4),
            width=24, depth=3, num_heads=4, mlp_dim=32, head_zero_init=False)
DEFORM = dict(attention='deformable', deformable_layers=(1,),
              deformable=dict(offset_groups=2, downsample=(1, 2, 1),
                              offset_kernel=(1, 3, 1)))


def _x(batch=2, shape=(4, 6, 8), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch,) + shape + (2,)), jnp.float32)


@functools.partial(nnx.jit, static_argnames=('deterministic',))
def _outputs(model, x, rng=None, deterministic=True):
  return model.outputs(x, deterministic=deterministic, rng=rng)


@nnx.jit
def _all_views(model, x):
  """outputs(), encode() and __call__ in one compilation."""
  return model.outputs(x), model.encode(x), model(x)


def _loss_and_grads(model, x, rng):
  graphdef, params = nnx.split(model)

  def loss(p):
    out = nnx.merge(graphdef, p)(x, deterministic=rng is None, rng=rng)
    return jnp.sum(out ** 2)

  return jax.jit(jax.value_and_grad(loss))(params)


def _with_random_head(model, seed=5):
  """Zero-initialised heads would make several checks vacuous."""
  for name in ('head', 'head_dist'):
    if hasattr(model, name):
      k = getattr(model, name).dense.kernel
      k.set_value(jax.random.normal(jax.random.key(seed), k.shape))
  return model


@pytest.mark.parametrize('pool,pos', [('cls', 'sincos'), ('mean', 'learned')])
def test_output_shapes(pool, pos):
  model = build_model(dict(TINY, pool=pool, pos_embedding=pos), 0)
  out = _outputs(model, _x(3))
  assert set(out) == {'features', 'logits'}
  assert out['logits'].shape == (3, 8) and out['logits'].dtype == jnp.float32
  assert out['features'].shape == (3, 24)
  assert np.all(np.isfinite(out['logits']))
  assert np.abs(out['logits'][0] - out['logits'][1]).max() > 1e-3


def test_patch_embedding_is_a_strided_convolution():
  embed = layers.PatchEmbed((2, 2, 4), 2, 24, patch_norm=False,
                            norm_epsilon=1e-6, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = _x()
  got = embed(x)  # (B, 12, 24)
  kernel = embed.proj.kernel[...].reshape(2, 2, 4, 2, 24)  # DHWIO
  want = jax.lax.conv_general_dilated(
      x, kernel, window_strides=(2, 2, 4), padding='VALID',
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')) + embed.proj.bias[...]
  np.testing.assert_allclose(got, want.reshape(2, 12, 24), atol=1e-5)


def test_sincos_code_values():
  width = 26  # 4 frequencies per axis, 2 padding channels
  code = np.asarray(layers.posemb_sincos_3d((3, 4, 5), width))
  assert code.shape == (60, 26)
  omega = 1.0 / 10_000 ** (np.arange(4) / 4)
  z, y, x = 2, 1, 3
  row = code[(z * 4 + y) * 5 + x]
  np.testing.assert_allclose(row[0:4], np.sin(z * omega), atol=1e-6)
  np.testing.assert_allclose(row[4:8], np.cos(z * omega), atol=1e-6)
  np.testing.assert_allclose(row[8:12], np.sin(y * omega), atol=1e-6)
  np.testing.assert_allclose(row[16:20], np.sin(x * omega), atol=1e-6)
  np.testing.assert_array_equal(code[:, 24:], 0.0)
  dists = np.linalg.norm(code[:, None] - code[None], axis=-1)
  assert np.all(dists + np.eye(60) > 1e-3)  # every token distinct


def test_bf16_compute_keeps_float32_params():
  f32 = _with_random_head(build_model(TINY, 0))
  bf16 = build_model(dict(TINY, dtype='bfloat16'), 0)
  for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
    assert p.dtype == jnp.float32
  nnx.update(bf16, nnx.state(f32))
  x = _x()
  h = jax.eval_shape(lambda x: bf16.encode(x), x)
  assert h.dtype == jnp.bfloat16  # the residual stream is in bf16
  got, want = _outputs(bf16, x)['logits'], _outputs(f32, x)['logits']
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1)
  assert np.abs(np.asarray(got - want)).max() > 0  # really computed in bf16


def test_determinism_and_rng_handling():
  cfg = dict(TINY, dropout=0.2, drop_path=0.2, attention_dropout=0.1)
  a, b = build_model(cfg, 0), build_model(cfg, 0)
  c = build_model(cfg, 1)
  leaves = lambda m: jax.tree.leaves(nnx.state(m))  # noqa: E731
  for u, v in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(u, v)
  assert any(np.abs(np.asarray(u - v)).max() > 0
             for u, v in zip(leaves(a), leaves(c)))
  x = _x()
  k0, k1 = jax.random.key(0), jax.random.key(1)
  run = lambda m, k: _outputs(m, x, k, deterministic=False)['logits']  # noqa: E731
  np.testing.assert_array_equal(run(a, k0), run(b, k0))
  assert np.abs(np.asarray(run(a, k0) - run(a, k1))).max() > 1e-4
  evals = [_outputs(a, x, k, deterministic=True)['logits'] for k in (k0, k1)]
  np.testing.assert_array_equal(evals[0], evals[1])
  assert np.abs(np.asarray(evals[0] - run(a, k0))).max() > 1e-4
  with pytest.raises(ValueError, match='rng'):
    a(x, deterministic=False)


def _plain_and_scanned(cfg):
  plain = _with_random_head(build_model(cfg, 0))
  scanned = build_model(dict(cfg, scan_layers=True, remat=True), 3)
  nnx.update(scanned, nnx.state(plain))
  return plain, scanned


def test_scan_and_remat_match_unrolled_loss_and_gradients():
  cfg = dict(TINY, dropout=0.1, drop_path=0.3)
  plain, scanned = _plain_and_scanned(cfg)
  x, key = _x(), jax.random.key(4)
  # Training mode: the same per-layer keys give the same dropout masks.
  loss_plain, g_plain = _loss_and_grads(plain, x, key)
  loss_scan, g_scan = _loss_and_grads(scanned, x, key)
  np.testing.assert_allclose(loss_scan, loss_plain, rtol=1e-5)
  # float32 summation-order noise, relative to the gradients' scale (some
  # gradients are analytically zero, e.g. of the key bias, and pure noise).
  scale = max(np.abs(u).max() for u in jax.tree.leaves(g_plain))
  for u, v in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_scan)):
    np.testing.assert_allclose(v, u, rtol=1e-4, atol=2e-6 * scale)


def test_scan_matches_unrolled_with_deformable_segments():
  # Segments: full x1, deformable x2 (scanned over 2 layers).
  cfg = dict(TINY, dropout=0.1, drop_path=0.3, **DEFORM)
  cfg['deformable_layers'] = (1, 2)
  plain, scanned = _plain_and_scanned(cfg)
  assert [int(seg.norm1.scale.shape[0]) for seg in scanned.encoder.segments
          ] == [1, 2]
  x, key = _x(), jax.random.key(4)
  np.testing.assert_allclose(
      _outputs(scanned, x, key, deterministic=False)['logits'],
      _outputs(plain, x, key, deterministic=False)['logits'], atol=1e-5)


def test_learned_code_fixes_grid_but_sincos_does_not():
  x = _x(shape=(8, 6, 8))
  assert _outputs(build_model(TINY, 0), x)['logits'].shape == (2, 8)
  with pytest.raises(ValueError, match='learned'):
    build_model(dict(TINY, pos_embedding='learned'), 0)(x)


def test_initial_logits_are_the_priors():
  model = build_model(dict(TINY, head_zero_init=True), 0)
  logits = np.asarray(_outputs(model, _x())['logits'])
  rates = np.asarray(constants.POSITIVE_RATES)
  np.testing.assert_allclose(logits, np.log(rates / (1 - rates))[None].repeat(
      2, 0), rtol=1e-5)


@pytest.mark.parametrize('kind', ['noisy_or', 'max'])
def test_patient_head_derived_from_vertebrae(kind):
  model = _with_random_head(build_model(dict(TINY, patient_head=kind), 0))
  assert model.head.dense.kernel.shape == (24, 7)
  logits = np.asarray(_outputs(model, _x(4))['logits'], np.float64)
  p = 1 / (1 + np.exp(-logits[:, 1:]))
  want = 1 - np.prod(1 - p, axis=1) if kind == 'noisy_or' else p.max(1)
  np.testing.assert_allclose(1 / (1 + np.exp(-logits[:, 0])), want,
                             rtol=1e-5)


def test_noisy_or_logit_stable_everywhere():
  v = np.array([[0.3, -1.0, 2.0, -0.5, 0.0, 1.0, -2.0],
                [-30.0] * 7,
                [-100.0] * 7,
                [40.0] + [-100.0] * 6,
                [-5.0, -6.0, -7.0, -8.0, -9.0, -10.0, -4.0],
                [-7.5] * 7,
                [-9.0] * 7], np.float64)  # last: the series branch, t ~ 9e-4
  got = np.asarray(heads.noisy_or_logit(jnp.asarray(v, jnp.float32)))
  q = np.sum(np.log1p(np.exp(v)), axis=1)  # -log(1 - P) in float64
  want = np.log(-np.expm1(-q)) + q  # logit P = log P - log(1 - P)
  want[2] = np.log(7.0) - 100.0  # float64 underflows too: P ~ 7 e^-100
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  g = jax.grad(lambda a: heads.noisy_or_logit(a).sum())(
      jnp.asarray(v, jnp.float32))
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(
      heads.max_logit(jnp.asarray(v)), v.max(axis=1), rtol=1e-6)


def test_distillation_token_heads_and_averaging():
  model = _with_random_head(build_model(dict(TINY, distill_token=True), 0))
  model.head_dist.dense.kernel.set_value(
      jax.random.normal(jax.random.key(9), (24, 8)))
  out, h, called = _all_views(model, _x(3))
  assert h.shape == (3, 2 + 12, 24)
  want_cls = model.head(model.final_norm(h[:, 0]))
  want_dist = model.head_dist(model.final_norm(h[:, 1]))
  np.testing.assert_allclose(out['logits_cls'], want_cls, atol=1e-5)
  np.testing.assert_allclose(out['logits_dist'], want_dist, atol=1e-5)
  np.testing.assert_allclose(out['logits'],
                             0.5 * (want_cls + want_dist), atol=1e-5)
  assert np.abs(np.asarray(want_cls - want_dist)).max() > 1e-2
  np.testing.assert_array_equal(called, out['logits'])


def test_mean_pool_skips_distillation_token():
  model = build_model(dict(TINY, distill_token=True, pool='mean'), 0)
  out, h, _ = _all_views(model, _x())
  h = np.asarray(h)
  pooled = np.concatenate([h[:, :1], h[:, 2:]], axis=1).mean(1)
  np.testing.assert_allclose(out['features'],
                             model.final_norm(jnp.asarray(pooled)), atol=1e-5)
  with_dist = model.final_norm(jnp.asarray(h.mean(1)))
  assert np.abs(np.asarray(out['features'] - with_dist)).max() > 1e-3


def test_drop_path_drops_whole_examples():
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(layers.drop_path(x, 0.3, jax.random.key(0), False))
  kept = y[:, 0, 0] > 0
  assert abs(kept.mean() - 0.7) < 0.03
  np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(y[~kept], 0.0)
  np.testing.assert_array_equal(layers.drop_path(x, 0.3, None, True), x)


@pytest.mark.parametrize('name,params', [
    ('bench_cpu', 12_224_264), ('vit_b1', 87_400_968), ('vit_b2', 87_400_968),
    ('vit_b2_dat', 87_836_376), ('vit_b2_distill', 87_407_888)])
def test_configs_build(name, params):
  config = importlib.import_module(f'configs.{name}').get_config()
  model = nnx.eval_shape(lambda: build_model(config.model, 0))
  assert flops.param_count(model) == params
  assert flops.analytic_param_count(config.model) == params
  assert config.model.in_channels == len(config.data.windows)
  assert tuple(config.model.input_shape) == tuple(config.data.input_shape)


def _vit_closed_form(m) -> dict[str, int]:
  """Parameters of a plain ViT3D by part, counted from the architecture, not from the model or
  cspine_jax.benchmarks.flops (whose closed form test_configs_build compares with): the patch
  embedding (optional LayerNorms around a Linear), a learned position code per token, CLS (and
  DIST) tokens, per block two LayerNorms, qkv, the output projection and the 2-layer MLP, a
  final LayerNorm and the 8-way head (and its DIST twin). LayerNorm: scale + bias."""
  assert m.attention == 'full' and not m.conv_stem and not m.hint_dim
  assert m.patient_head == 'logit'  # 8 outputs: patient_overall, C1..C7
  ln = lambda n: 2 * n  # noqa: E731
  dense = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
  d, mlp = m.width, m.mlp_dim
  inner = m.num_heads * (m.head_dim or m.width // m.num_heads)
  patch = math.prod(m.patch_size) * m.in_channels
  tokens = math.prod(i // p for i, p in zip(m.input_shape, m.patch_size))
  block = (ln(d) + dense(d, 3 * inner, m.qkv_bias) + dense(inner, d)
           + ln(d) + dense(d, mlp) + dense(mlp, d))
  parts = {
      'patch_embed': dense(patch, d) + (ln(patch) + ln(d) if m.patch_embed_norm else 0),
      'cls': d,
      'encoder': m.depth * block,
      'final_norm': ln(d),
      'head': dense(d, len(constants.TARGETS)),
  }
  if m.pos_embedding == 'learned':
    parts['pos'] = tokens * d  # sincos: computed, not a parameter
  if m.distill_token:
    parts.update(dist=d, head_dist=dense(d, len(constants.TARGETS)))
  return parts


@pytest.mark.parametrize('name,total', [
    # ViT-B, 2048-voxel patches of 1 channel, 1024 tokens: patch embedding 2*2048 + 2048*768 +
    # 768 + 2*768 = 1,579,264; position 1024*768 = 786,432; CLS 768; a block 2*768 +
    # 768*2304 (no qkv bias) + 768*768 + 768 + 2*768 + 768*3072 + 3072 + 3072*768 + 768 =
    # 7,085,568, twelve 85,026,816; final norm 1,536; head 768*8 + 8 = 6,152.
    ('vit_b1', 87_400_968), ('vit_b2', 87_400_968),
    ('vit_b2_distill', 87_400_968 + 768 + 6_152),  # + DIST token and its head
    # ViT-S width, depth 6, 4096-voxel patches, sincos (no position parameters), qkv bias.
    ('bench_cpu', 4096 * 384 + 384 + 384 + 6 * (4 * 384 + 384 * 1152 + 1152 + 384 * 384 + 384
                                                 + 384 * 1536 + 1536 + 1536 * 384 + 384)
     + 768 + 384 * 8 + 8)])
def test_vit_parameter_counts_by_part_match_the_architecture(name, total):
  config = importlib.import_module(f'configs.{name}').get_config()
  want = _vit_closed_form(config.model)
  assert sum(want.values()) == total
  # Abstract: shapes only, no ViT-B initialised.
  state = jax.eval_shape(lambda: nnx.state(build_model(config.model, 0), nnx.Param))
  got = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    got[path[0].key] = got.get(path[0].key, 0) + math.prod(leaf.shape)
  assert got == want


def test_conv_stem_feeds_the_patch_embedding_and_trains():
  kw = dict(input_shape=(8, 8, 8), patch_size=(4, 4, 4), width=16, depth=1, num_heads=2,
            mlp_dim=32, head_zero_init=False)
  model = build_model(dict(kw, conv_stem=(4, 8)), 0)
  assert model.patch_embed.proj.kernel.shape == (4 ** 3 * 8, 16)  # embeds the stem's channels
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 1))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

  g = jax.jit(jax.grad(loss))(params)
  stem_grad = g['stem']['convs'][0]['kernel'][...]
  assert float(jnp.abs(stem_grad).sum()) > 0  # the stem is on the path to the logits
  plain = build_model(kw, 0)
  assert plain.stem is None and plain.patch_embed.proj.kernel.shape == (4 ** 3, 16)


@pytest.mark.parametrize('with_bias', [False, True])
def test_dot_product_attention_equals_the_einsum_path(with_bias):
  """layers.attend: 'xla' (jax.nn.dot_product_attention) and 'einsum' give the same output and
  the same gradients for q, k, v and the bias (the deformable layers' relative-position bias)."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (2, 9, 2, 8)) for kk in keys[:3])
  bias = jax.random.normal(keys[3], (1, 2, 9, 9)) if with_bias else None

  def f(impl):
    def loss(q, k, v, bias):
      out = layers.attend(q, k, v, bias=bias, impl=impl)
      return jnp.sum(out * jnp.cos(out)), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
    return out, grads

  out_x, grads_x = f('xla')
  out_e, grads_e = f('einsum')
  assert float(jnp.abs(out_e).max()) > 0.1  # not a vacuous comparison
  np.testing.assert_allclose(out_x, out_e, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads_x, grads_e)


def test_attention_impl_reaches_the_deformable_and_full_layers():
  """The key is wired through ViT3D: the same weights give the same logits either way."""
  x = _x()
  out = {impl: np.asarray(_outputs(_with_random_head(build_model(
      dict(TINY, **DEFORM, attention_impl=impl), 0)), x)['logits']) for impl in ('xla', 'einsum')}
  assert np.abs(out['einsum']).max() > 1e-2
  np.testing.assert_allclose(out['xla'], out['einsum'], rtol=1e-5, atol=1e-5)


def test_attention_impl_paths():
  path = layers.attention_path
  assert path('xla', jnp.float32, has_bias=False, dropout_active=True) == 'einsum'
  assert path('xla', jnp.bfloat16, has_bias=True, dropout_active=False) == 'xla'
  assert path('cudnn', jnp.float32, has_bias=False, dropout_active=False) == 'xla'
  assert path('einsum', jnp.bfloat16, has_bias=False, dropout_active=False) == 'einsum'
  # Attention dropout in training: the einsum path, whatever the key says (same draws).
  model = build_model(dict(TINY, attention_dropout=0.3, attention_impl='xla'), 0)
  ref = build_model(dict(TINY, attention_dropout=0.3, attention_impl='einsum'), 0)
  key = jax.random.key(4)
  np.testing.assert_array_equal(_outputs(model, _x(), key, deterministic=False)['logits'],
                                _outputs(ref, _x(), key, deterministic=False)['logits'])


def test_a_bad_attention_impl_names_the_key_and_the_values():
  from cspine_jax.models import factory
  with pytest.raises(factory.ConfigError,
                     match=r"config.model.attention_impl='flash'.*'xla', 'cudnn', 'einsum'"):
    build_model(dict(TINY, attention_impl='flash'), 0)
