"""Logging for a server whose logs a cluster collects: LOG_LEVEL, text or JSON lines (--log_format), and quiet
neighbours (no per-request lines from KServe's timing middleware or uvicorn, no tracebacks for client errors,
no progress bars, no KServe notices about routes it leaves to us)."""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import os
import warnings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# KServe logs "Exception:" with a traceback for errors that are the client's; the response says it all.
CLIENT_ERRORS = ("InvalidInput", "ModelNotFound", "ModelNotReady")
# KServe registers no OpenAI or time-series routes of its own (their extras are not installed) and says so at
# start-up; the OpenAI routes are ours (predictor/api/app.py logs them), so its line would only mislead.
KSERVE_NOTICES = ("OpenAI endpoints not registered", "Time series endpoints not registered")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class DropClientErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return type(error).__name__ not in CLIENT_ERRORS


class DropKServeNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in KSERVE_NOTICES


def configure(log_format: str = "text", level: str | None = None) -> None:
    level = (level or os.environ.get("LOG_LEVEL", "INFO")).upper()
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"client_errors": {"()": DropClientErrorTracebacks},
                    "kserve_notices": {"()": DropKServeNotices}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "filters": ["client_errors"]}},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # KServe configures its own handlers unless "kserve" has one: give it ours.
            "kserve": {"handlers": ["default"], "level": level, "propagate": False, "filters": ["kserve_notices"]},
            "kserve.trace": {"level": "WARNING"},  # two timing lines per request
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.access": {"level": "WARNING"},  # predictor.access logs one line per request instead
            "httpx": {"level": "WARNING"},
        },
    })
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bar in the middle of the log
    # FastAPI deprecates the ORJSONResponse KServe's app is built with; nothing here can act on it.
    warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated")
