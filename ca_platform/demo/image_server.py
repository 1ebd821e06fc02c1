"""A tiny local HTTP file server, so the demo pool's image URLs resolve without internet.

The downloader (img2dataset) fetches every URL of the pool with many threads; this
server answers them from a directory on 127.0.0.1, returning 404 for files that do not
exist, which is exactly how the shapes world simulates dead links.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any


class _QuietFileHandler(SimpleHTTPRequestHandler):
    """Serves files under a directory, optionally slowly, without per-request log lines."""

    def __init__(self, *args: Any, directory: str, delay_s: float, **kwargs: Any) -> None:
        # Set before super().__init__, which handles the request immediately.
        self._delay_s = delay_s
        super().__init__(*args, directory=directory, **kwargs)

    def _pause(self) -> None:
        if self._delay_s > 0:
            time.sleep(self._delay_s)

    def do_GET(self) -> None:
        self._pause()
        super().do_GET()

    def do_HEAD(self) -> None:
        self._pause()
        super().do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: thousands of downloads would otherwise flood stderr."""


class _FileHTTPServer(ThreadingHTTPServer):
    """Threaded server with a deep accept backlog for many concurrent downloaders."""

    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up mid-response (interrupted downloads are expected)."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ImageServer:
    """Serve ``root`` over HTTP from a background daemon thread.

    Use as a context manager (``with ImageServer(root) as server: server.base_url``) or
    with ``start()`` / ``stop()``. ``port=0`` picks a free port. ``delay_s`` sleeps before
    every response, for tests that need a download still in flight.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, delay_s: float = 0.0) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port
        self.delay_s = delay_s
        self._server: _FileHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>`` with the bound port; only valid while running."""
        if self._server is None:
            raise RuntimeError("ImageServer is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> ImageServer:
        """Bind the socket and start serving; returns self so ``base_url`` is usable at once."""
        if self._server is not None:
            raise RuntimeError("ImageServer is already running")
        if not self.root.is_dir():
            raise NotADirectoryError(f"cannot serve {self.root}: not a directory")
        handler = functools.partial(_QuietFileHandler, directory=str(self.root), delay_s=self.delay_s)
        self._server = _FileHTTPServer((self.host, self.port), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"image-server-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests and close the socket; a no-op when not running."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def wait(self) -> None:
        """Block the calling thread until the server stops (Ctrl-C raises KeyboardInterrupt)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=0.5)

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(root: Path, host: str = "127.0.0.1", port: int = 8000, delay_s: float = 0.0) -> None:
    """Serve ``root`` in the foreground until Ctrl-C, for the command line."""
    with ImageServer(root, host=host, port=port, delay_s=delay_s) as server:
        print(f"Serving {server.root} at {server.base_url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
