"""Logging: JSON lines (orjson), a request id on every line, secrets redacted."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from typing import Any

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SECRET = re.compile(r"(?i)(authorization|bearer|basic|password|token|secret)([\"'=:\s]+)([^\s\"',&]+)")


def redact(text: str) -> str:
    """Hide anything that looks like a credential."""
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            "pid": record.process,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            doc.update(access)
        else:
            doc["message"] = redact(record.getMessage())
        if record.exc_info:
            doc["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(doc).decode()


def setup(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


access_log = logging.getLogger("edgecache.access")
