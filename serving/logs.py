"""Structured logs (LAB_LOG_FORMAT=json): every log line of a worker as one JSON object.

    {"ts": "2026-11-29T10:40:01.123Z", "level": "INFO", "logger": "lab.access", "msg": "...",
     "x_request_id": "9f2c...", "client": "127.0.0.1", "method": "POST", "path": "/classify",
     "status": 200, "ms": 6.1}

Fields given as `extra=` to a log call (the access log's x_request_id, status, ...) become keys
(BentoML adds its own trace fields, request_id among them, to every record). The
formatter goes onto the handlers BentoML's logging set-up installed (and the root logger's), so
BentoML's own lines come out as JSON too.
"""
from __future__ import annotations

import json
import logging
import time

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def use_json_logs() -> int:
    """Put the JSON formatter on every handler of the root, bentoml and lab loggers; returns how many."""
    formatter = JsonFormatter()
    seen = set()
    for name in ("", "bentoml", "lab", "uvicorn", "uvicorn.error"):
        for h in logging.getLogger(name).handlers:
            if id(h) not in seen:
                seen.add(id(h))
                h.setFormatter(formatter)
    if not seen:  # nobody configured logging: give the root logger a JSON handler on stderr
        h = logging.StreamHandler()
        h.setFormatter(formatter)
        logging.getLogger().addHandler(h)
        seen.add(id(h))
    return len(seen)
