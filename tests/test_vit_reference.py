"""ViT3D against vit_pytorch's vit_3d.ViT with the same weights, and param counts.

vit_pytorch's package __init__ imports torchvision, which is broken beside
this torch build, so vit_3d.py (torch + einops only) is loaded by file path.
"""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cspine_jax.benchmarks import flops
from cspine_jax.models.factory import build_backbone as build_model
from tests import vit_pytorch_convert

torch = pytest.importorskip('torch', reason='torch is the reference (test extra)')
pytest.importorskip('einops', reason='vit_pytorch needs einops')


def _vit_3d_module():
  spec = importlib.util.find_spec('vit_pytorch')
  if spec is None:
    pytest.skip('vit-pytorch not installed (test extra)')
  path = spec.submodule_search_locations[0] + '/vit_3d.py'
  mod_spec = importlib.util.spec_from_file_location('_vit_pytorch_vit_3d', path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module


# Asymmetric on purpose: every axis has its own size and patch size, and
# dim_head * heads != dim, so a transposed axis or weight cannot match.
KWARGS = dict(image_size=(12, 16), image_patch_size=(3, 4), frames=8,
              frame_patch_size=2, num_classes=8, dim=32, depth=2, heads=4,
              dim_head=12, mlp_dim=40, channels=2)


def _pair(pool):
  vit_3d = _vit_3d_module()
  torch.manual_seed(0)
  ref = vit_3d.ViT(pool=pool, **KWARGS).eval()
  with torch.no_grad():  # perturb everything, LayerNorms included
    for p in ref.parameters():
      p.add_(0.2 * torch.randn_like(p))
  cfg = vit_pytorch_convert.mirror_config(pool=pool, **KWARGS)
  model = build_model(cfg, nnx.Rngs(params=1))
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  vit_pytorch_convert.load_vit_pytorch(model, sd)
  return ref, model, cfg


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_matches_vit_pytorch_float32(pool):
  ref, model, _ = _pair(pool)
  rng = np.random.default_rng(0)
  video = rng.normal(size=(3, 2, 8, 12, 16)).astype(np.float32)  # b c f h w
  with torch.no_grad():
    want = ref(torch.from_numpy(video)).numpy()
  x = jnp.asarray(video.transpose(0, 2, 3, 4, 1))  # b z y x c
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
  assert got.dtype == np.float32 and got.shape == (3, 8)
  assert np.abs(want).max() > 0.5  # non-trivial logits
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The three examples differ, so a broadcast bug cannot pass either.
  assert np.abs(want[0] - want[1]).max() > 1e-2


def test_scanned_mirror_matches_too():
  ref, model, cfg = _pair('cls')
  scanned = build_model(dict(cfg, scan_layers=True), nnx.Rngs(params=7))
  nnx.update(scanned, nnx.state(model))
  video = np.random.default_rng(1).normal(size=(2, 2, 8, 12, 16))
  video = video.astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(video)).numpy()
  got = scanned(jnp.asarray(video.transpose(0, 2, 3, 4, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_converter_rejects_wrong_shapes():
  vit_3d = _vit_3d_module()
  ref = vit_3d.ViT(**dict(KWARGS, mlp_dim=48))
  model = build_model(vit_pytorch_convert.mirror_config(**KWARGS), 0)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  with pytest.raises(ValueError, match='fc1'):
    vit_pytorch_convert.load_vit_pytorch(model, sd)


def _closed_form(c):
  """Parameters of the mirrored ViT counted by hand (vit_pytorch layout)."""
  d, m, i = c['width'], c['mlp_dim'], c['num_heads'] * c['head_dim']
  patch_dim = int(np.prod(c['patch_size'])) * c['in_channels']
  n = int(np.prod(np.asarray(c['input_shape']) // np.asarray(c['patch_size'])))
  embed = 2 * patch_dim + patch_dim * d + d + 2 * d  # LN, Linear, LN
  layer = (2 * d + 3 * d * i + i * d + d) + (2 * d + d * m + m + m * d + d)
  head = 2 * d + d * 8 + 8
  return embed + n * d + d + c['depth'] * layer + head  # + pos + cls


def test_parameter_counts_match_closed_form():
  vit_3d = _vit_3d_module()
  cfg = vit_pytorch_convert.mirror_config(**KWARGS)
  want = _closed_form(cfg)
  # By hand: patch_dim = 2*3*4 * 2 channels = 48, 4*4*4 = 64 tokens.
  # embed 2*48 + 48*32+32 + 2*32 = 1728; pos 64*32 = 2048; cls 32;
  # layer: attention 2*32 + 32*3*48 + 48*32+32 = 6240, MLP
  # 2*32 + 32*40+40 + 40*32+32 = 2696, two layers 17872; head 2*32 + 32*8+8.
  assert want == 1728 + 2048 + 32 + 17872 + 328 == 22008
  model = nnx.eval_shape(lambda: build_model(cfg, 0))
  assert flops.param_count(model) == want
  assert flops.analytic_param_count(cfg) == want
  ref = vit_3d.ViT(**KWARGS)
  # vit_pytorch also stores a position code for the CLS slot (dim more).
  assert sum(p.numel() for p in ref.parameters()) == want + cfg['width']
