"""A training workdir -> a frozen model with jitted inference heads (eval, predict, localize, demo).

Reads `W/config.json` and the `model` item of one checkpoint against `nnx.eval_shape` of the
model: no optimizer, learning-rate schedule or training loop is built or imported (big_vision's
`eval_only.py` restores through the model module the same way). One class serves every task:
the fracture classifiers (`predict`: 8 probabilities) and the localizer (`segment`,
`segment_probs`: per-voxel labels or class probabilities). The pure inference functions
(`make_apply`, `make_teacher_fn`) are shared with training, which jits them once per run.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cspine_jax import checkpoint
from cspine_jax import parallel
from cspine_jax.data import config as data_config
from cspine_jax.models import factory

# Output heads on the model's logits: name -> logits -> what the caller gets.
HEADS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'probs': jax.nn.sigmoid,  # (B, 8) fracture probabilities (classifiers)
    'labels': lambda z: jnp.argmax(z, axis=-1).astype(jnp.uint8),  # (B, z, y, x) (localizer)
    'class_probs': lambda z: jax.nn.softmax(z.astype(jnp.float32), axis=-1),  # (B, z, y, x, K)
}


def make_apply(graphdef: nnx.GraphDef, head: str) -> Callable[[dict, jax.Array], jax.Array]:
  """Pure (weights {"params", "rest"}, images) -> HEADS[head](logits), deterministic."""
  fn = HEADS[head]

  def apply(weights: dict, images: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, weights['params'], weights['rest'])
    return fn(model(images, deterministic=True))

  return apply


def make_teacher_fn(graphdef: nnx.GraphDef) -> Callable[[dict, jax.Array], dict]:
  """Pure (weights, images) -> {'logits', ['feature_map']}: a frozen distillation teacher."""

  def fn(weights: dict, images: jax.Array) -> dict:
    out = nnx.merge(graphdef, weights['params'], weights['rest']).outputs(images,
                                                                          deterministic=True)
    return {k: out[k] for k in ('logits', 'feature_map') if k in out}

  return fn


def inference_weights(config, model_state) -> dict:
  """{"params", "rest"} to run: the EMA weights where the run kept them, else the parameters.
  ``model_state``: anything with params / rest / ema (a TrainState or the restored dict)."""
  get = model_state.get if isinstance(model_state, dict) else functools.partial(getattr,
                                                                                model_state)
  ema = get('ema')
  use_ema = bool(config.get('ema_decay', 0.0)) and bool(jax.tree.leaves(ema))
  return {'params': ema if use_ema else get('params'), 'rest': get('rest')}


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its workdir."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: not a training workdir (no config.json)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def coarse_localizer_workdir(config, owner: str = '') -> str:
  """The coarse pass a fine localizer names (``config.localizer.coarse_workdir``), absolute.

  factory.ConfigError naming the key (of ``owner``'s config, when given) if it is empty, not a
  training workdir, or not a whole-scan localizer: checked when training starts and when the
  localizer is loaded, with the same words.
  """
  key = 'config.localizer.coarse_workdir' + (f' of {owner}' if owner else '')
  path = str(config.get('localizer', {}).get('coarse_workdir', '') or '')
  if not path:
    raise factory.ConfigError(
        f"{key} is empty: a localizer with data.crop_mode='region' crops around the spine where "
        'its coarse pass puts it; train configs/localizer_coarse.py first and pass its workdir '
        'as --config.localizer.coarse_workdir')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise factory.ConfigError(f'{key}={path!r}: not a training workdir (no config.json); train '
                              'configs/localizer_coarse.py there first')
  mode = load_config(path).get('data', {}).get('crop_mode')
  if mode != 'volume':
    raise factory.ConfigError(
        f'{key}={path!r}: data.crop_mode={mode!r}, not a coarse localizer over the whole scan '
        "('volume'; configs/localizer_coarse.py)")
  return os.path.abspath(path)


class InferenceModel:
  """A trained model of any workdir, frozen and replicated on the mesh.

  Attributes: ``config`` (the run's), ``task`` (factory.Task), ``data`` (the resolved data
  block, augmentation off: what inference crops with), ``step``, ``graphdef``, ``weights``.
  ``expect``: 'classifier' or 'localizer' to refuse the other kind with a clear error.
  """

  def __init__(self, workdir: str, which: str = 'latest', mesh=None,
               expect: str | None = None):
    self.workdir = workdir
    self.config = load_config(workdir)
    self.task = factory.task_of(self.config)
    kind = 'localizer' if self.task.segmentation else 'classifier'
    if expect and expect != kind:
      raise ValueError(f'{workdir}: model.mode={self.task.mode!r} is a {kind}, not a {expect}'
                       + (' (train one with configs/localizer.py)' if expect == 'localizer'
                          else ''))
    self.mesh = mesh or parallel.make_mesh()
    self.data = data_config.resolve(self.config)
    self.data.augment.enabled = False
    self.windows = tuple(tuple(float(v) for v in w) for w in self.data.windows)
    # Shapes only: no random initialisation of weights the checkpoint replaces (seconds per
    # model on CPU, which predict pays for both of its models).
    self.graphdef, params, rest = nnx.split(factory.abstract_model(self.config), nnx.Param, ...)
    ema = params if self.config.get('ema_decay', 0.0) else {}
    replicated = parallel.replicated(self.mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          {'params': params, 'rest': rest, 'ema': ema})
    mngr = checkpoint.manager(workdir, self.config, read_only=True)
    try:
      self.step = checkpoint.resolve_step(mngr, which)
      restored = checkpoint.restore_model(mngr, self.step, target)
    finally:
      mngr.close()
    self.weights = inference_weights(self.config, restored)
    self._jitted = {}

  def jitted(self, head: str) -> Callable[[dict, jax.Array], jax.Array]:
    """The jitted pure function of one head, built once per model (no retrace per call)."""
    if head not in self._jitted:
      self._jitted[head] = jax.jit(make_apply(self.graphdef, head))
    return self._jitted[head]

  def __call__(self, head: str, images) -> jax.Array:
    """HEADS[head] of the model on a batch (device array; see the numpy helpers below)."""
    return self.jitted(head)(self.weights, images)

  def predict(self, images) -> np.ndarray:
    """(B, [7,] z, y, x, C) -> (B, 8) fracture probabilities in TARGETS order."""
    return np.asarray(jax.device_get(self('probs', images)))

  def segment(self, images) -> np.ndarray:
    """(B, z, y, x, C) -> (B, z, y, x) uint8 labels (argmax over the classes)."""
    return np.asarray(jax.device_get(self('labels', images)))

  def segment_probs(self, images) -> np.ndarray:
    """(B, z, y, x, C) -> (B, z, y, x, K) float32 class probabilities."""
    return np.asarray(jax.device_get(self('class_probs', images)))

  def teacher(self) -> tuple[Callable[[Any, jax.Array], dict], dict]:
    """(pure fn, weights) for distillation: the fn runs inside the student's jitted step."""
    return make_teacher_fn(self.graphdef), self.weights
