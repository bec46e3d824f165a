"""Errors that the CLI turns into exit codes (2 = bad input, 1 = runtime failure)."""


class BadInput(Exception):
    """A spec, config or argument is wrong. The message is one line naming what and where.

    Raised before anything is written; the CLI prints it without a traceback and exits with 2.
    """


class JobFailed(RuntimeError):
    """A job failed after its retries; the store records the reason and a rerun resumes."""
