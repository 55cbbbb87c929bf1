"""Models: the 3D ViT (optionally with deformable layers and a DeiT token)."""

from cspine_jax.models.vit3d import build_model
from cspine_jax.models.vit3d import MODELS
from cspine_jax.models.vit3d import ViT3D

__all__ = ['build_model', 'MODELS', 'ViT3D']
