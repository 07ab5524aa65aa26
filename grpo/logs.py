"""Structured logs: one JSON object a line, with the request id, the caller and the job id on every line.

The ids live in context variables: the HTTP middleware sets the request id (and the principal once
known) for the duration of a request, the run sets the job id (`RAYGRPO_JOB_ID` in a run's
environment). `configure("json")` puts a stderr handler with the JSON formatter on the `app` and `grpo` loggers;
`configure("text")` writes plain lines with the same ids.
Secrets never reach a log line: settings hold them with `repr=False`, and handlers log ids, not params.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from datetime import UTC, datetime

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("raygrpo_request_id", default=None)
principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("raygrpo_principal", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("raygrpo_job_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    """Adds request_id, principal and job_id to each record (None where not known)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.principal = principal.get()
        record.job_id = getattr(record, "job_id", None) or job_id.get() or os.environ.get("RAYGRPO_JOB_ID")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
            "principal": getattr(record, "principal", None),
        }
        for key, value in record.__dict__.items():  # `extra=` fields
            if key not in _STANDARD and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_TEXT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s job=%(job_id)s user=%(principal)s] %(message)s"


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Idempotent: configure the `app` and `grpo` loggers once per process."""
    for name in ("app", "grpo"):
        logger = logging.getLogger(name)
        if any(getattr(h, "_raygrpo", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler._raygrpo = True  # type: ignore[attr-defined]
        handler.addFilter(ContextFilter())
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = True  # pytest and Ray capture through the root logger; root has no handler of ours
