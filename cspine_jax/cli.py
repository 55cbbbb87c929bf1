"""How every command ends: one line naming what is wrong, never a traceback, and the exit code.

  cli.run(main)     in place of absl's app.run(main)

Exit codes: 0 done; 2 a usage error (a bad flag, a config key that does not exist or a value that
cannot work, a path given that is not there: nothing was done); 1 a failure while working (a
corrupt study, a damaged checkpoint, a diverged run). The message goes to stderr as
`error: <what and where>`; CSPINE_TRACEBACK=1 in the environment shows the traceback instead.

The console shows the project's own log lines and everything at WARNING or above; the libraries'
INFO chatter (Orbax prints lines at every save and exit) stays out unless asked for with absl's
own `--verbosity=0` (or `-v 0`) on the command line.

Light on purpose (absl only): the offline tools (`data_tools`) use it without loading JAX.
"""
from __future__ import annotations

import logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

USAGE = 2
FAILURE = 1
_PACKAGES = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p)
                  + os.sep for p in ('cspine_jax', 'data_tools', 'configs'))


class UsageError(ValueError):
  """The command cannot run as given (exit 2); the message names the flag, key or path."""


class Failure(Exception):
  """An expected failure while working (exit 1); the message names the file or step."""


def traceback_wanted() -> bool:
  """Whether CSPINE_TRACEBACK asks for tracebacks (also for a command relaying a child's)."""
  return os.environ.get('CSPINE_TRACEBACK', '') not in ('', '0')


def _die(code: int, message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _message(e: BaseException) -> str:
  """The text of an exception, unwrapped: ml_collections nests KeyError reprs in AttributeErrors
  ("\"'ema_decai'\\nDid you mean ...\""), which would print as escaped quotes."""
  while isinstance(e, BaseException) and e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  # A KeyError's str() is the repr of its argument; any other exception's str() is its message
  # (an OSError's args[0] is only the errno).
  if isinstance(e, KeyError) and e.args:
    text = str(e.args[0])
    for _ in range(3):
      text = text.strip().strip('"').replace("\\'", "'").replace('\\n', ' ')
    text = re.sub(r"^'([^'\s]*)'", r'\1', text.strip())
  else:
    text = str(e)
  return ' '.join(text.split()) or type(e).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with every error as one line and exit 2 (a misspelled --config.key too)."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:
      if type(flags.FLAGS[name]).__name__ == '_ConfigFlag':
        # ml_collections loads a config file lazily, at first use: load it here, so that a
        # missing or broken file is a usage error too.
        value = getattr(flags.FLAGS, name)
        if type(value).__name__ == '_ErrorConfig':  # raises its load error on any use
          value.get('')
    return rest
  except flags.Error as e:
    _die(USAGE, f'{e} (--helpshort lists the flags)')
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    if traceback_wanted():
      raise
    # ml_collections' config_flags raise these for an override of a key the config lacks or a
    # value of the wrong type; the flag named is the one on the command line.
    text = _message(e)
    first = text.split(' ', 1)[0]
    names = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    named = [n for n in names if n.rsplit('.', 1)[-1] == first] or names
    if isinstance(e, (AttributeError, KeyError)):
      text = re.sub(r'^([\w.]+)\s*', r'the config has no key \1. ', text).strip()
    where = f' {", ".join(named)}' if named else ''
    if isinstance(e, OSError):
      _die(USAGE, f'--config: {text}')
    _die(USAGE, f'bad config override{where}: {text} (the keys are those of the config file '
         'and configs/common.py)')
  return []  # not reached


def warn(message: str) -> None:
  """A warning the user should read (a skipped step, a dropped line): one line on stderr."""
  print(f'warning: {message}', file=sys.stderr, flush=True)


class _ProjectOnly(logging.Filter):
  """Lets through the project's own records, and anyone's at WARNING or above."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGES)


def quiet_libraries() -> None:
  """Library INFO lines off the console, unless --verbosity was given on the command line."""
  try:
    asked = flags.FLAGS['verbosity'].present
  except KeyError:
    asked = False
  if asked:
    return
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _ProjectOnly) for f in handler.filters):
    handler.addFilter(_ProjectOnly())


def run(main, argv: list[str] | None = None) -> None:
  """absl's app.run(main) with the project's error and logging conventions."""

  def wrapped(args):
    quiet_libraries()
    if traceback_wanted():
      return main(args)
    try:
      return main(args)
    except app.UsageError as e:
      _die(USAGE, f'{e} (--helpshort lists the flags)')
    except UsageError as e:
      _die(USAGE, str(e))
    except (Failure, FloatingPointError) as e:  # expected: the message says all there is
      _die(FAILURE, _message(e))
    except (OSError, ValueError) as e:
      # OSError: a path that is not there or cannot be read (the message names it).
      _die(FAILURE, f'{_message(e)} (CSPINE_TRACEBACK=1 shows where)')

  app.run(wrapped, argv=argv, flags_parser=_parse_flags)
