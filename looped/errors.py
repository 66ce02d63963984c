"""User-facing errors: each carries one line that tells the user what to fix.

Entry points wrap their `main` in `cli_main`, which turns these into `error: <message>` on stderr
and exit code 2, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class LoopedError(Exception):
    """Bad input from the user: a config, a path, a checkpoint or a shape."""


class ConfigError(LoopedError):
    pass


class KernelUnavailableError(LoopedError):
    pass


class ShapeError(LoopedError, ValueError):
    pass


class NonFiniteError(LoopedError):
    """Training produced a NaN or Inf; the run stops, keeping its last good checkpoint."""

    exit_code = 3


EXIT_BAD_INPUT = 2


def cli_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv)
    except LoopedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`... --help | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(code or 0)
