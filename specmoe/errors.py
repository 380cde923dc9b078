"""One error type for everything a user can get wrong, and the CLI wrapper that
turns it into a single line on stderr and a non-zero exit instead of a traceback."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Callable


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes from a library's longer one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class SpecmoeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UnsupportedModelError(SpecmoeError):
    """The model is dense, or of an MoE family specmoe does not describe."""


class CorruptFileError(SpecmoeError):
    """A file on disk does not match what its manifest promises."""


class MismatchError(SpecmoeError):
    """Two artefacts (model, trace, estimator) do not belong together."""


class SpecmoeWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. a slower path taken)."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def cli_errors(prog: str, interrupted_hint: str = "") -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a command's main(): SpecmoeError becomes `<prog>: error: ...` on stderr and
    exit 2; Ctrl-C becomes one line (plus `interrupted_hint`) and exit 130."""
    return functools.partial(_run_reporting_errors, prog, interrupted_hint)


def _run_reporting_errors(prog: str, interrupted_hint: str, main: Callable[..., int | None]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, SpecmoeWarning):
                from tqdm import tqdm  # writes above a progress bar instead of into it

                tqdm.write(f"{prog}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        try:
            with warnings.catch_warnings():
                warnings.showwarning = one_line
                return main(*args, **kwargs) or 0
        except SpecmoeError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; completed work is kept{interrupted_hint}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, as command-line tools do.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            return 0

    return wrapper
