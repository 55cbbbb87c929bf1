"""Every model name, and one table of what each task (``config.model.mode``) needs.

A config names a backbone (``model.name``: a key of ``MODELS``) and a task (``model.mode``: a key
of ``TASKS``). The task decides how the data is cropped, which data key is the crop shape (and
so the model's input shape), which losses fit its outputs, and how it is wrapped around the
backbone; every part of the system (pipeline checks, train step, config validation, benchmarks,
FLOP counts, eval, predict, the localizer) asks this table instead of comparing mode strings.

  region    one crop of the cervical spine per study (the seed's design) -> (B, 8) logits
  vertebra  seven crops per study, one per vertebra, through a shared backbone -> (B, 8) logits
  segment   the whole volume on a coarse grid -> per-voxel C1-C7 logits (the localizer)
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from cspine_jax import cli
from cspine_jax import constants
from cspine_jax.models import cnn25d
from cspine_jax.models import cnn3d
from cspine_jax.models import layers
from cspine_jax.models import segmenter
from cspine_jax.models import vertebra
from cspine_jax.models import vit3d


class ConfigError(cli.UsageError):
  """A config value that cannot work; the message names the key (a usage error: exit 2)."""


# config.model.name -> backbone class. Every key of config.model other than those the task
# consumes (see Task.wrapper_keys) is a constructor argument.
MODELS = {
    'vit3d': vit3d.ViT3D,
    'cnn3d': cnn3d.CNN3D,  # 3D ResNet (GroupNorm or BatchNorm)
    'cnn25d_lstm': cnn25d.CNN25D,  # 2.5D CNN over slices + bidirectional GRU
}


@dataclasses.dataclass(frozen=True)
class Task:
  """What a ``model.mode`` needs from the rest of the system."""
  mode: str
  crop_mode: str  # config.data.crop_mode the pipeline must produce (the usual one)
  shape_key: str  # config.data.<shape_key> is the crop shape (z, y, x) = model.input_shape
  losses: tuple[str, ...]  # allowed config.loss values (the first is the usual one)
  crops: int  # crops per example: the image is (B, [crops,] z, y, x, C)
  segmentation: bool  # per-voxel labels (softmax over classes) instead of 8 sigmoid targets
  backbones: tuple[str, ...]  # model.name values this task can wrap
  wrapper_keys: tuple[str, ...] = ()  # model.* keys read by the task's wrapper, not the backbone
  other_crop_modes: tuple[str, ...] = ()  # other config.data.crop_mode values it can read

  @property
  def crop_modes(self) -> tuple[str, ...]:
    return (self.crop_mode,) + self.other_crop_modes

  @property
  def image_axes(self) -> int:
    """Rank of one example's image: (crops,) z, y, x, C."""
    return 4 + (self.crops > 1)


TASKS = {
    'region': Task('region', crop_mode='region', shape_key='input_shape',
                   losses=('bce', 'rsna_weighted'), crops=1, segmentation=False,
                   backbones=tuple(MODELS)),
    'vertebra': Task('vertebra', crop_mode='vertebrae', shape_key='vertebra_shape',
                     losses=('bce', 'rsna_weighted'), crops=len(constants.VERTEBRAE),
                     segmentation=False, backbones=tuple(MODELS)),
    # 'volume': the whole scan (the coarse localizer, or a one-pass one); 'region' with
    # data.with_segmentation: a fixed-spacing crop around the spine (the fine localizer pass).
    'segment': Task('segment', crop_mode='volume', shape_key='input_shape', losses=('ce_dice',),
                    crops=1, segmentation=True, backbones=('vit3d',),
                    wrapper_keys=('decoder_features', 'decoder_hidden', 'context'),
                    other_crop_modes=('region',)),
}


def _model_dict(model_config) -> dict:
  return dict(model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config)


def task_of(config) -> Task:
  """The task of a full experiment config (``config.model.mode``, default 'region')."""
  mode = _model_dict(config.model).get('mode', 'region')
  if mode not in TASKS:
    raise ConfigError(f'config.model.mode={mode!r}: expected one of {sorted(TASKS)}')
  return TASKS[mode]


def crop_shape(config) -> tuple[int, ...]:
  """The crop (and model input) shape (z, y, x): ``config.data.<task.shape_key>``."""
  task = task_of(config)
  shape = config.data.get(task.shape_key) if 'data' in config else None
  if shape is None:  # a config without the data key (e.g. a bare model config in a test)
    shape = _model_dict(config.model)['input_shape']
  return tuple(int(v) for v in shape)


def _check_attention_impl(model: dict) -> None:
  """``model.attention_impl`` (ViT backbones; layers.ATTENTION_IMPLS), named when it is bad."""
  impl = model.get('attention_impl', 'xla')
  if impl not in layers.ATTENTION_IMPLS:
    raise ConfigError(f'config.model.attention_impl={impl!r}: expected one of '
                      f'{layers.ATTENTION_IMPLS} (xla: jax.nn.dot_product_attention\'s XLA path; '
                      'cudnn: its cuDNN flash attention on GPUs, bf16/fp16; einsum: the plain '
                      'two-einsum attention)')


def check(config) -> Task:
  """The task of ``config``, after checking that the model, data and loss keys agree."""
  task = task_of(config)
  model = _model_dict(config.model)
  name = model.get('name', 'vit3d')
  if name not in MODELS:
    raise ConfigError(f'config.model.name={name!r}: expected one of {sorted(MODELS)}')
  if name not in task.backbones:
    raise ConfigError(f'config.model.mode={task.mode!r} needs config.model.name in '
                      f'{task.backbones}, not {name!r}')
  _check_attention_impl(model)
  crop_mode = config.data.get('crop_mode', 'region')
  if crop_mode not in task.crop_modes:
    raise ConfigError(f'config.model.mode={task.mode!r} reads '
                      f'{" or ".join(map(repr, task.crop_modes))} crops, but '
                      f'config.data.crop_mode={crop_mode!r}')
  if task.segmentation and crop_mode == 'region' and not config.data.get('with_segmentation'):
    raise ConfigError(f'config.model.mode={task.mode!r} with config.data.crop_mode="region" '
                      'needs config.data.with_segmentation=True (its labels)')
  if config.data.get('pseudo_labels') and not (task.segmentation and crop_mode == 'region'):
    raise ConfigError('config.data.pseudo_labels=True: only a localizer that crops around the '
                      "spine (model.mode='segment', data.crop_mode='region') reads predicted "
                      'masks as labels')
  shape = tuple(int(v) for v in config.data.get(task.shape_key) or ())
  model_shape = tuple(int(v) for v in model.get('input_shape') or ())
  if shape != model_shape:
    raise ConfigError(f'config.model.input_shape={model_shape} differs from '
                      f'config.data.{task.shape_key}={shape}, the crop it is fed (model.mode='
                      f'{task.mode!r}); set config.data.{task.shape_key} (the configs make '
                      'model.input_shape a reference to it)')
  loss = config.get('loss', task.losses[0])
  if loss not in task.losses:
    raise ConfigError(f'config.loss={loss!r}: model.mode={task.mode!r} trains with one of '
                      f'{task.losses}')
  return task


def build_backbone(model_config, rngs: nnx.Rngs | int) -> nnx.Module:
  """The backbone named by ``model_config['name']``; every other key is a constructor argument,
  so a misspelt key fails loudly instead of silently using a default."""
  cfg = _model_dict(model_config)
  cfg.pop('mode', None)
  name = cfg.pop('name', 'vit3d')
  if name not in MODELS:
    raise ConfigError(f'config.model.name={name!r}: expected one of {sorted(MODELS)}')
  _check_attention_impl(cfg)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs)
  for k in ('input_shape', 'patch_size', 'deformable_layers', 'widths', 'blocks', 'conv_stem'):
    if isinstance(cfg.get(k), list):
      cfg[k] = tuple(cfg[k])
  return MODELS[name](**cfg, rngs=rngs)


def build_model(config, seed: int) -> nnx.Module:
  """The model of a full experiment config: its backbone wrapped for its task."""
  task = task_of(config)
  cfg = _model_dict(config.model)
  cfg.pop('mode', None)
  wrapper = {k: cfg.pop(k) for k in task.wrapper_keys if k in cfg}
  rngs = nnx.Rngs(params=seed)
  if task.mode == 'vertebra':
    patient_head = cfg.get('patient_head', 'noisy_or')
    cfg['patient_head'] = 'logit'  # the backbone's own head is unused in this mode
    return vertebra.VertebraClassifier(build_backbone(cfg, rngs), patient_head=patient_head,
                                       rngs=rngs)
  if task.mode == 'segment':
    if cfg.get('name', 'vit3d') not in task.backbones:
      raise ConfigError(f'config.model.mode="segment" needs config.model.name in '
                        f'{task.backbones}')
    return segmenter.Segmenter(build_backbone(cfg, rngs), in_channels=int(
        cfg.get('in_channels', 1)), **wrapper, rngs=rngs)
  return build_backbone(cfg, rngs)


def abstract_model(config) -> nnx.Module:
  """The model of ``config`` with shapes only (no random initialisation): a restore target."""
  return nnx.eval_shape(lambda: build_model(config, int(config.get('seed', 0))))
