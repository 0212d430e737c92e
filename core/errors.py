"""The one exception type whose message is shown to the user as is, and how entry points show it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad params, missing package, unreachable server).

    Its message is one sentence that says what is wrong and what to do; stage entry points
    print it as ``error: <message>`` and exit with status 2, without a traceback.
    """


class StoppedEarly(Exception):
    """A stage that stopped on purpose before its work was done (a study's sitting ran out of
    time). Its message says what is done and how to go on; the stage is recorded ``incomplete``
    and exits with status 3, without a traceback, so ``dvc repro`` does not take it as done."""


def exit_status(action: Callable[[], object]) -> int:
    """Run a command-line action: 0 when it succeeds; a :class:`UserError` is printed as one
    ``error:`` line on stderr and gives 2 (the exit status every entry point uses for it)."""
    try:
        action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
