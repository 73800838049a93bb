"""How a run can end other than by completing: a user's mistake, or training that cannot (or may not) go on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable


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
    resumable = False  # a checkpoint to continue from was the point of stopping

    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results or {}


class Diverged(RunEnded):
    """Training cannot go on (NaN loss, collapsed loss scale): status ``diverged``."""

    status = "diverged"


class DiskFull(RunEnded):
    """No space left on the device while writing a run's file: status ``failed``, resumable from the last whole
    checkpoint (every write is atomic, so nothing that was whole is lost)."""

    status = "failed"
    resumable = True


def is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC (or EDQUOT) anywhere in an exception's chain: torch.save reports a full disk as a RuntimeError
    ("unexpected pos") raised while handling the OSError."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_as(error: Callable[[], Exception]):
    """A full disk met inside the block raises `error()` instead (one line saying which file and what to do);
    any other exception passes as it is."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise error() from None


class Interrupted(RunEnded):
    """SIGTERM or SIGINT: the run saved a checkpoint and stops with status ``interrupted``."""

    status = "interrupted"
    resumable = True
