"""How a run can end other than by completing: a user's mistake, or training that cannot (or may not) go on."""


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
