r"""Alias of `python -m cspine_jax.localize` (same flags, same outputs).

  python -m data_tools.localize --workdir=LOCALIZER_WORKDIR --data=CONVERTED [--checkpoint=latest]

The localizer runs a neural network, so its command lives beside the models' other users
(`cspine_jax/localize.py`, over `cspine_jax.localize_lib.run`). This name is kept for the scripts
that call it, as a command-line alias: the process is replaced by the real command, so the
offline tools import nothing of the models or of JAX.
"""
import os
import sys

if __name__ == '__main__':
  os.execv(sys.executable, [sys.executable, '-m', 'cspine_jax.localize', *sys.argv[1:]])
