"""A search service over an index: a JSON API and a web page (`create_app`), run by uvicorn (`serve`)."""

from __future__ import annotations

import ipaddress
import logging
import os

from siamese.errors import SiameseError
from siamese.serve.app import create_app

__all__ = ["create_app", "serve"]


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          token: str | None = None, **settings) -> None:
    """Serve the index in `index_dir` on `host`:`port` (default 127.0.0.1:8000) until interrupted; `token` (default
    $SIAMESE_TOKEN) is required beyond loopback. `settings` go to `create_app`."""
    import uvicorn

    token = token or os.environ.get("SIAMESE_TOKEN") or None
    if not is_loopback(host) and not token:
        raise SiameseError(f"Expected a `token` to serve beyond this machine. Received: host {host} and no token. "
                           "Fix: pass a token (or set SIAMESE_TOKEN), or serve on 127.0.0.1.")
    if not 0 <= port <= 65535:
        raise SiameseError(f"Expected 0 <= `port` <= 65535. Received: {port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(index_dir, token=token, **settings)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
