"""JSON logs, one object per line on stderr. Call sites pass only ids,
names, counts and statuses: never template, probe, share or key bytes."""
from __future__ import annotations

import json
import logging
import sys
import time


# What json.dumps(entry, separators=(",", ":"), default=str) builds on every
# call; it keeps no state between calls.
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: a traceback's locals could hold secrets.
            entry["error_type"] = record.exc_info[0].__name__
        return _JSON.encode(entry)


def setup(service: str, level: str = "INFO") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    return logging.getLogger(service)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log ``msg`` with structured fields."""
    # What logger.log(level, msg, extra={"fields": fields}) does, less the
    # stack walk for the caller's file and line: for a record made here that
    # is always this function (so it is filled in as such), and it ran on
    # every RPC (vaultrpc.server logs one line per call).
    if logger.isEnabledFor(level):
        logger.handle(logger.makeRecord(logger.name, level, _EVENT_FILE, _EVENT_LINE, msg, (), None, "event",
                                        {"fields": fields}))


_EVENT_FILE = event.__code__.co_filename
_EVENT_LINE = event.__code__.co_firstlineno
