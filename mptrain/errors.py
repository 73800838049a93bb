"""How a run can end other than by completing: a user's mistake, or training that cannot (or may not) go on."""

from __future__ import annotations


def first_line(error: BaseException, limit: int | None = 200) -> str:
    """An exception's first line of text (at most `limit` characters), or its type's name when it has none: what a
    one-line refusal quotes of a library's error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class UserError(Exception):
    """A mistake in the user's input (config value, path, data, checkpoint).

    The message is one line that says what is wrong and how to fix it; the CLI
    prints it as ``mptrain: error: <message>`` and exits non-zero.
    """


class RunEnded(Exception):
    """Training stopped before its last step; `results` holds what the trainer had measured by then."""

    status = "ended"

    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results or {}


class Diverged(RunEnded):
    """Training cannot go on (NaN loss, collapsed loss scale): status ``diverged``."""

    status = "diverged"


class Interrupted(RunEnded):
    """SIGTERM or SIGINT: the run saved a checkpoint and stops with status ``interrupted``."""

    status = "interrupted"
