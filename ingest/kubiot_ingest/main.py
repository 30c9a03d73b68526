"""`kubiot-ingest`: run one tenant's ingest service, configured from the environment."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from datetime import UTC, datetime

from kubiot_ingest.config import ConfigError, IngestSettings, load_settings
from kubiot_ingest.service import IngestService

EXIT_CONFIG = 2


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
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
