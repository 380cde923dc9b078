"""One error type for everything a user can get wrong, and the CLI wrapper that
turns it into a single line on stderr and a non-zero exit instead of a traceback."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable


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
# the console command each package's main() is installed as
_COMMANDS = {"tracing": "trace", "estimators": "train", "runtime": "infer"}
EXIT_INTERRUPTED = 130


def cli_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run a command's main(); report SpecmoeError as `<prog>: error: ...` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        package = main.__module__.split(".")[0]
        prog = _COMMANDS.get(package, package)
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
            hint = " (rerun with --resume)" if prog == "trace" else ""
            print(f"{prog}: interrupted; completed work is kept{hint}", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapper
