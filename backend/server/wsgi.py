"""gunicorn entry point: `gunicorn backend.server.wsgi:app` (or `blip-backend serve`).

Each worker imports this module and loads the model itself. Do not run gunicorn with --preload:
OpenVINO's thread pools do not survive fork.
"""

from __future__ import annotations

import logging
import os

from backend.server.app import create_app

_level = logging.getLevelName(os.environ.get("LOG_LEVEL", "INFO").upper())
logging.basicConfig(
    level=_level if isinstance(_level, int) else logging.INFO,
    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
)

app = create_app()
