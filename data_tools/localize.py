r"""Alias of `python -m cspine_jax.localize` (same flags, same outputs).

  python -m data_tools.localize --workdir=LOCALIZER_WORKDIR --data=CONVERTED [--checkpoint=latest]

The localizer runs a neural network, so its command lives beside the models' other users in
`cspine_jax/` (`cspine_jax/localize.py`, over `cspine_jax/localize_lib.run`); this name is kept
for the scripts that call it. The one arrow from the offline tools into the models' side, and
only when run as a program.
"""
from absl import app

if __name__ == '__main__':
  from cspine_jax import localize  # pylint: disable=g-import-not-at-top  (the alias's target)
  localize.define_flags()
  app.run(localize.main)
