"""Defaults and documentation of every ``config.data`` key read by ``cspine_jax.data``.

Experiment configs embed this block and override what they need::

  from cspine_jax.data import config as data_config
  config.data = data_config.get_config()
  config.data.root = '/data/rsna_converted'

Shapes are (z, y, x) everywhere; z index 0 is the most superior slice (DESIGN.md section 1).

The pipeline reads ``resolve(config)``: these defaults overlaid with whatever the experiment
config sets, so a config only names what it changes (and older skeletons keep working: see
``resolve`` for the aliases).
"""
from absl import logging
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default data config (small enough to train on CPU).

  ``arg='experiment'`` (``--config=cspine_jax/data/config.py:experiment``) wraps it as
  ``{"data": ...}``, a stand-in experiment config for tools such as the benchmark.
  """
  if arg == 'experiment':
    return ml_collections.ConfigDict({'data': get_config()})
  c = ml_collections.ConfigDict()

  # --- Dataset and splits -------------------------------------------------------------------
  c.root = ''  # Output directory of `python -m data_tools.convert` (manifest.jsonl, volumes/).
  c.num_folds = 5  # K of the stratified K-fold split of the labelled studies.
  c.fold = 0  # Held-out fold for evaluation, in [0, num_folds); -1 trains on every labelled study.
  c.fold_seed = 0  # Seeds the tie-breaking of the fold assignment (folds depend on uids only).
  # Keep only studies with a true segmentation (the seed paper's 86-study setting).
  c.require_segmentation = False
  # With require_segmentation: also train on the labelled studies whose only mask is a
  # localizer's prediction (`data_tools.localize` run on this dataset; self-training, as the top
  # RSNA 2022 teams did with their 87 masks). Region crops read those labels from
  # predicted_segmentations/; the held-out fold keeps the true masks only.
  c.pseudo_labels = False
  # Keep only studies with true or predicted vertebra boxes (per-vertebra training after
  # `python -m data_tools.localize`: every located study, segmented or not).
  c.require_boxes = False

  # --- Crop geometry ------------------------------------------------------------------------
  # 'region': one crop of the cervical spine (union of the C1..C7 boxes) per study.
  # 'vertebrae': seven crops per study, one per vertebra (see vertebra_* below).
  # 'volume': the whole scanned volume on input_shape, with the true mask as "segmentation"
  #   (the coarse localizer's input; configs/localizer_coarse.py).
  c.crop_mode = 'region'
  c.input_shape = (64, 96, 96)  # Model input, voxels (z, y, x).
  # Output voxel size (mm). Field of view = input_shape * spacing_mm, centred on the box centre.
  c.spacing_mm = (2.0, 1.25, 1.25)
  # If True, ignore spacing_mm and stretch the box (plus margin_mm each side) onto input_shape,
  # so the whole region is always in view at a per-study spacing.
  c.fit_to_box = False
  c.margin_mm = 10.0  # Context added on each side of the box when fit_to_box.
  # Studies with no true or predicted boxes: 'center' (the only one) crops around the volume
  # centre, field of view input_shape * spacing_mm, or fallback_extent_mm when fit_to_box.
  # Cervical-spine CTs are framed on the neck, so this mostly catches it; the localizer's
  # predicted_vertebra_boxes are the real answer.
  c.fallback = 'center'
  c.fallback_extent_mm = (140.0, 90.0, 90.0)
  # crop_mode='volume': () stretches the whole scanned volume onto input_shape (per-axis
  # spacing = extent / shape: the scale of the anatomy then depends on the field of view);
  # (dz, dy, dx) mm samples a grid of that fixed spacing centred on the volume's centre (the
  # coarse localizer: one physical scale whatever the field of view; input_shape * spacing
  # must cover the scans).
  c.volume_spacing_mm = ()
  c.canonical_orientation = True  # Resample into (inferior, posterior, left) axes via `direction`.
  c.antialias = True  # Box-filter by the integer part of the downsampling factor before interp.
  c.pad_hu = -1024.0  # Value outside the scanned volume (air).
  # Read crops from the converter's derived levels (isotropic 1 and 2 mm copies of each volume,
  # cspine_jax/data/levels.py) when one is fine enough for the crop: ~10x fewer voxels to read
  # and filter than the full-resolution volume, which False always reads (the reference path).
  c.levels = True
  # Where region crops are resampled and augmented: 'host' (numpy/scipy in the input threads,
  # the float32 crop is shipped) or 'device' (the host ships a fixed-shape int16 block of the
  # 1 mm level plus the crop's affine and intensity draws; the jitted step samples, augments and
  # windows it: cspine_jax/device_crop.py). 'device' is for accelerators, where the host's cores
  # cannot feed the step otherwise; crop_mode='region' without with_segmentation only.
  c.crop_on = 'host'
  # Region mode: also crop the label mask (true, else predicted; nearest neighbour) through the
  # same map as "segmentation" (z, y, x) uint8, for localizer / segmentation training.
  c.with_segmentation = False
  # Per-vertebra crops (crop_mode='vertebrae' and make_vertebra_crops):
  c.vertebra_shape = (32, 64, 64)
  c.vertebra_spacing_mm = (1.0, 1.0, 1.0)
  c.vertebra_fit_to_box = False
  c.vertebra_margin_mm = 8.0
  # Training only: the chance, per vertebra and crop, of cropping a study that has a true mask
  # at the localizer's predicted box instead (where it has one). Evaluation and prediction crop
  # at predicted boxes, whose errors (several mm, fractured vertebrae the worst) a model trained
  # on true boxes alone never sees. 0 = always the true box (every run before this key).
  c.vertebra_predicted_box_prob = 0.0
  # Training only: each face of each vertebra's box (true or predicted) moves by U[-j, j] mm
  # along its axis, independently: the localizer's errors move faces, not whole boxes, and a
  # box fitted onto the crop (vertebra_fit_to_box) changes scale with them. 0 = off.
  c.vertebra_box_jitter_mm = 0.0

  # --- Intensities --------------------------------------------------------------------------
  # HU windows (center, width), one output channel each, mapped linearly to [0, 1] and clipped.
  c.windows = ((500.0, 1800.0), (50.0, 400.0))  # bone, soft tissue

  # --- Augmentation (training only) ---------------------------------------------------------
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.jitter_mm = (6.0, 6.0, 6.0)  # Uniform shift of the crop centre, +- per axis.
  c.augment.rotate_deg = 10.0  # Uniform rotation about each axis, +- degrees.
  c.augment.scale = 0.1  # Isotropic zoom factor in [1 - s, 1 + s].
  # And a zoom along z alone in [1 - s, 1 + s] (taller or shorter vertebrae and discs, other
  # slice spacings); 0 = off. Host crops only.
  c.augment.scale_z = 0.0
  # A shorter scan: with probability p per end, the slices within U[0, mm] of the scan's top
  # (superior) and bottom become padding (pad_hu, label 0), and a 'volume' crop stretches what
  # is left. Real scans start anywhere from the skull to C1 and stop anywhere from C7 to the
  # thorax; without it a localizer trained on one coverage learns to count from the scan's
  # ends. 0 = off (no extra draws). Host region and volume crops only.
  c.augment.fov_cut_prob = 0.0
  c.augment.fov_cut_mm = (25.0, 60.0)  # (top, bottom) largest cut
  c.augment.flip_x_prob = 0.5  # Left-right mirror (labels are per level, not per side).
  c.augment.intensity_scale = 0.05  # HU * U[1 - a, 1 + a] ...
  c.augment.intensity_shift_hu = 20.0  # ... + U[-b, b] ...
  c.augment.noise_hu = 10.0  # ... + N(0, U[0, c]) per voxel.

  # --- Batching, order, parallelism, memory -------------------------------------------------
  c.batch_size = 8  # GLOBAL batch; each of P processes reads batch_size / P rows.
  c.eval_batch_size = 8  # GLOBAL eval batch (last one padded, `mask` marks real rows).
  c.seed = 0  # Order and augmentation: element k of epoch e is a function of (seed, e, k) only.
  c.shuffle = True
  c.num_threads = 4  # Reader threads per process (TensorStore and scipy release the GIL).
  c.num_workers = 0  # >0: Grain `mp_prefetch` spawn workers, each with num_threads threads.
  c.prefetch = 2  # Local batches buffered ahead (per worker with num_workers > 0).
  # Global batches copied to the devices ahead of the step (pipeline.DevicePrefetch): 2 = the
  # transfer of the next batch overlaps the current step.
  c.device_prefetch = 2
  # TensorStore decoded-chunk cache per process (all threads). It pays off where crops overlap
  # (the seven vertebra crops of a study); random training over thousands of studies rarely
  # hits it, so it need not be large. Peak RSS ~ imports (~200 MB) + cache + num_threads x one
  # crop's working set (int16 block + pooled copy) + prefetch x local batch: no term grows with
  # the number of studies.
  c.cache_mb = 256
  return c


def resolve(config) -> ml_collections.ConfigDict:
  """The complete data block of ``config`` (a full experiment config or a data block).

  Defaults from ``get_config()``, overridden by the keys ``config.data`` sets (``augment``
  merged key by key). Aliases, used only when the data block does not set the key itself:
  ``data.channels`` = [(low, high), ...] HU windows -> ``windows`` (center, width);
  top-level ``batch_size`` and ``seed`` -> ``data.batch_size`` and ``data.seed``;
  ``eval_batch_size`` defaults to the (resolved) batch size.
  """
  full = 'data' in config
  given = config.data if full else config
  given = given.to_dict() if hasattr(given, 'to_dict') else dict(given)
  out = get_config()
  defaults = set(out.keys())
  for key, value in given.items():
    if key == 'augment':
      out.augment.update(value)
    elif key == 'channels':
      continue
    else:
      if key not in defaults:
        logging.warning('config.data.%s is not a pipeline key (see cspine_jax/data/config.py)',
                        key)
      out[key] = value
  if 'windows' not in given and given.get('channels'):
    out.windows = tuple(((lo + hi) / 2.0, hi - lo) for lo, hi in given['channels'])
  if full:
    for key in ('batch_size', 'seed'):
      if key not in given and key in config:
        out[key] = config[key]
  if 'eval_batch_size' not in given:
    out.eval_batch_size = out.batch_size
  return out
