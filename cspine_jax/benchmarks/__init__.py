"""Benchmarks, apart from the product code; the command is ``python -m cspine_jax.bench``.

  step.py      the jitted train step against vit-pytorch (samples/s, FLOPs, MFU)
  pipeline.py  training crops/s and memory of cspine_jax.data against a MONAI/PyTorch loader
  flops.py     FLOPs of a train step (XLA's count and a closed form), matmul peak, MFU
"""
