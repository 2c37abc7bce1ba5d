"""Logging setup: JSON lines in pods, readable text on a terminal, secrets redacted.

Pod logs are read by machines (Loki, Cloud Logging), so each record is one JSON object with
``ts``, ``level``, ``logger``, ``msg`` and any ``extra`` fields. On a terminal the same records
print as text. Either way a redaction filter masks anything that looks like a credential.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

_REDACT_RES = (
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)(aws_secret_access_key|secret|password|token)(\s*[=:]\s*)([^\s,'\"]+)"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"(://[^/\s:@]+:)([^/\s@]+)(@)"),
)
_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def redact(text: str) -> str:
    """Mask credential-looking substrings in a log message."""
    text = _REDACT_RES[0].sub("[REDACTED]", text)
    text = _REDACT_RES[1].sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
    text = _REDACT_RES[2].sub("[REDACTED]", text)
    return _REDACT_RES[3].sub(lambda m: f"{m.group(1)}[REDACTED]{m.group(3)}", text)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = redact(v) if isinstance(v, str) else v
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {
            k: v for k, v in vars(record).items() if k not in _STD_ATTRS and not k.startswith("_")
        }
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        msg = redact(record.getMessage())
        return f"{record.levelname.lower():7s} {msg}" + (f"  {redact(tail)}" if tail else "")


def setup_logging(verbosity: int = 0, fmt: str | None = None) -> None:
    """Configure the root logger once, at CLI start (never at import time).

    Args:
        verbosity: -1 quiet (warnings), 0 info, 1+ debug.
        fmt: 'json' or 'text'; default from ``QLORA_LOG_FORMAT``, else text on a TTY and
            JSON otherwise (pods).
    """
    fmt = fmt or os.environ.get("QLORA_LOG_FORMAT") or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root.setLevel(level)
    # Third-party libraries are chatty at INFO; keep them at WARNING unless asked.
    for name in ("urllib3", "botocore", "boto3", "s3transfer", "kubernetes", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)
