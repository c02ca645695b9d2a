"""Serve a built dashboard on 127.0.0.1 (a thread running ``http.server``).

    with serve("data/dashboard") as srv:
        print(srv.url)                  # http://127.0.0.1:PORT/
        ...
    # or: srv = serve(site); ...; srv.stop()

Only the loopback interface is bound: nothing on the network can reach it. Files are served with
``Cache-Control: no-cache`` (a rebuilt site shows at the next reload), correct UTF-8 types, and
without directory listings or request logs.
"""

from __future__ import annotations

import functools
import html
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

HOST = "127.0.0.1"


class _Handler(SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".html": "text/html; charset=utf-8",
        ".json": "application/json",
        ".svg": "image/svg+xml",
        ".png": "image/png",
    }

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def list_directory(self, path: Any) -> None:  # no directory listings
        self.send_error(404, "Not found")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class DashboardServer:
    """A running server; ``url`` is its root, ``stop()`` (or leaving a ``with`` block) ends it."""

    def __init__(self, site_dir: str | Path, port: int = 0):
        self.site_dir = Path(site_dir).resolve()
        if not (self.site_dir / "index.html").is_file():
            raise FileNotFoundError(
                f"{self.site_dir / 'index.html'} not found: build the site first (build_site)"
            )
        handler = functools.partial(_Handler, directory=str(self.site_dir))
        self._httpd = _Server((HOST, int(port)), handler)
        self.host, self.port = HOST, int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name=f"saepipe-dashboard-{self.port}",
        )
        self._thread.start()
        self._stopped = False

    @property
    def url(self) -> str:
        """The index page's URL, ``http://127.0.0.1:PORT/``."""
        return f"http://{self.host}:{self.port}/"

    def feature_url(self, feature: int) -> str:
        return f"{self.url}feature.html#{int(feature)}"

    @property
    def running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"DashboardServer({self.url!r}, {state}, site={str(self.site_dir)!r})"

    def _repr_html_(self) -> str:
        if not self.running:
            return f"<code>{html.escape(repr(self))}</code>"
        u = html.escape(self.url, quote=True)
        return f'Feature dashboard at <a href="{u}" target="_blank" rel="noopener">{u}</a>'


def serve(site_dir: str | Path, port: int = 0) -> DashboardServer:
    """Serve ``site_dir`` (a folder written by ``build_site``) on 127.0.0.1:``port`` (0: any free port)
    in a background thread; returns the :class:`DashboardServer` handle."""
    return DashboardServer(site_dir, port)
