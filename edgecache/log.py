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


class QuietParseErrors(logging.Filter):
    """aiohttp logs every unparseable request head as an ERROR with a traceback: anyone could flood
    the log that way. Keep one INFO line without the traceback instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if type(exc).__module__.startswith("aiohttp.http_exceptions") or isinstance(exc, (ConnectionError,)):
                record.msg = f"bad request from client: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                record.args = None
                record.exc_info = None
                record.exc_text = None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_parse_errors() -> None:
    """Install :class:`QuietParseErrors` on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietParseErrors) for f in logger.filters):
        logger.addFilter(QuietParseErrors())


def setup(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    quiet_parse_errors()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


access_log = logging.getLogger("edgecache.access")
