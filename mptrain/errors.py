"""Errors a user can fix: reported as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config value, path, data, checkpoint).

    The message is one line that says what is wrong and how to fix it; the CLI
    prints it as ``mptrain: error: <message>`` and exits non-zero.
    """


class Diverged(Exception):
    """Training cannot go on (NaN loss, collapsed loss scale): status ``diverged``."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: the run saved a checkpoint and stops with status ``interrupted``."""
