"""`kubiot-ingest`: run one tenant's ingest service, configured from the environment."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from datetime import UTC, datetime

from kubiot_ingest.config import ConfigError, IngestSettings, load_settings
from kubiot_ingest.service import IngestService

EXIT_CONFIG = 2
#: Collector thresholds for a process that allocates a few tracked objects per message and
#: keeps up to QUEUE_MAX messages alive: with Python's defaults (700, 10, 10) full collections
#: over that live set took a quarter of the event loop's time per message in the benchmark.
GC_THRESHOLDS = (10_000, 20, 100)


def tune_garbage_collection() -> None:
    """Leave what start-up loaded out of every later collection, and collect less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the tenant on every line."""

    def __init__(self, tenant: str) -> None:
        super().__init__()
        self.tenant = tenant

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "tenant": self.tenant,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: IngestSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(settings.tenant))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s [tenant={settings.tenant}] %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


async def serve(settings: IngestSettings) -> int:
    service = IngestService(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.request_stop)
    return await service.run()


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"kubiot-ingest: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    tune_garbage_collection()
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
