"""Models: Flax NNX modules that know no file format and no training loop.

`factory.py` is the entry: `MODELS` (every backbone name), `TASKS` (what each `model.mode`
needs), `build_model(config, seed)`. Backbones: `vit3d.ViT3D` (optionally with `deformable`
layers and a DeiT token), `cnn3d.CNN3D`, `cnn25d.CNN25D`; task wrappers: `vertebra`
(seven crops, one per vertebra), `segmenter` (the localizer's per-voxel decoder).
"""
