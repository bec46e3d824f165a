"""No secret is written: the values of secret-looking environment variables are redacted from what pefteval writes.

A variable is secret when its name contains TOKEN, KEY, SECRET or PASSWORD, in any case (HF_TOKEN,
WANDB_API_KEY, AWS_SECRET_ACCESS_KEY). Its value is replaced by `REDACTED` in every text file of the store
(`Store.write_text`: statuses, results, reasons, job logs, reports) and in the run's printed logs. Values
shorter than `MIN_LENGTH` are left alone: they are flags such as TOKENIZERS_PARALLELISM=false, not secrets,
and replacing them everywhere would garble the text.
"""

from __future__ import annotations

import logging
import os
import re

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
MIN_LENGTH = 6
REDACTED = "[redacted]"


def secret_values() -> list[str]:
    """The values to redact, from this process's environment now; longest first (one may contain another)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats as `inner` does (message, traceback), then redacts."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def redact_handler(handler: logging.Handler) -> logging.Handler:
    if not isinstance(handler.formatter, RedactingFormatter):
        handler.setFormatter(RedactingFormatter(handler.formatter))
    return handler
