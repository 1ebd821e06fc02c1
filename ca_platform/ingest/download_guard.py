"""The guard around img2dataset's fetches: what img2dataset itself does not do.

img2dataset hands the raw URL to `urllib.request.urlopen` (so file://, data: and ftp:// work, redirects
are followed, no address is checked), reads the body without a limit, and decodes with OpenCV, so
Pillow's bomb guard never applies. `guarded_urlopen` installs, for the duration of a download, a urllib
opener that:

- speaks http/https only (no file, ftp, data handlers; no proxy, whose address would be checked instead);
- resolves each host itself and connects only to addresses that are public, unless the host is allowed
  explicitly, at connect time (so DNS rebinding cannot slip past) and again for every redirect;
- tries each resolved address in turn, as `socket.create_connection` does, so one dead route (a broken IPv6
  address, say) does not fail a host that answers on the next;
- reads at most `max_bytes` of a body and refuses an image whose header declares over `max_pixels`;
- holds each URL to a total `deadline_s` (connect, every redirect, headers and every body read): img2dataset's
  `timeout` bounds each socket operation only, so a server dripping a byte at a time could hold a row for
  ever; every socket operation gets min(timeout, time left).

Refusals surface as img2dataset error messages starting with `REFUSED_PREFIX`, `TOO_LARGE_PREFIX` or
`DEADLINE_PREFIX`, which `download.classify` turns into statuses.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from PIL import Image

REFUSED_PREFIX = "refused:"
TOO_LARGE_PREFIX = "too large:"
DEADLINE_PREFIX = "deadline exceeded:"
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_DEADLINE_S = 30.0

# getaddrinfo's shape: (host, port, family=0, type=0, proto=0, flags=0) -> [(family, type, proto, name, sockaddr)]
Resolver = Callable[..., list[tuple[Any, ...]]]

# OpenCV reads this once per process; lower it before img2dataset imports cv2, as a second line behind
# the header check below.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))


class GuardError(urllib.error.URLError):
    """A fetch the guard will not make; `str()` carries the status prefix img2dataset records."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class GuardPolicy:
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    allowed_schemes: frozenset[str] = frozenset({"http", "https"})
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    deadline_s: float = DEFAULT_DEADLINE_S  # connect + all reads of one URL, redirects included
    resolver: Resolver = field(default=socket.getaddrinfo, repr=False, compare=False)  # a seam for tests

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")

    def check_url(self, url: str) -> None:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in self.allowed_schemes:
            raise GuardError(f"{REFUSED_PREFIX} scheme {scheme or '(none)'!r} is not allowed in {url[:120]!r}")

    def check_address(self, host: str, address: str) -> None:
        if host.lower() in self.allow_hosts or address in self.allow_hosts:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        if not ip.is_global or ip.is_multicast:
            kind = (
                "loopback"
                if ip.is_loopback
                else "link-local"
                if ip.is_link_local
                else "private"
                if ip.is_private
                else "non-public"
            )
            raise GuardError(f"{REFUSED_PREFIX} {host} resolves to {kind} address {address}")


class _Deadline:
    """The time left to one URL: started when its first connection opens, carried across its redirects."""

    def __init__(self, limit_s: float, socket_timeout: float | None) -> None:
        self.limit_s = limit_s
        self.socket_timeout = socket_timeout  # img2dataset's per-operation timeout (None: blocking)
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expired(self) -> bool:
        return self.elapsed() >= self.limit_s

    def exceeded(self) -> GuardError:
        return GuardError(f"{DEADLINE_PREFIX} {self.limit_s:.1f} s total for this URL ({self.elapsed():.1f} s elapsed)")

    def next_timeout(self) -> float:
        """The timeout for the next socket operation: min(per-operation timeout, time left); raises once none is."""
        left = self.limit_s - self.elapsed()
        if left <= 0:
            raise self.exceeded()
        return left if self.socket_timeout is None else min(self.socket_timeout, left)


_DEADLINE_ATTR = "_guard_deadline"


def _deadline_of(req: urllib.request.Request, policy: GuardPolicy) -> _Deadline:
    """The request's deadline, started now if this is the URL's first hop."""
    deadline = getattr(req, _DEADLINE_ATTR, None)
    if deadline is None:
        timeout = getattr(req, "timeout", None)
        if timeout is socket._GLOBAL_DEFAULT_TIMEOUT:
            timeout = socket.getdefaulttimeout()
        deadline = _Deadline(policy.deadline_s, timeout)
        setattr(req, _DEADLINE_ATTR, deadline)
    return deadline


def _guarded_create_connection(policy: GuardPolicy, deadline: _Deadline):
    def create_connection(
        address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT, source_address: Any = None
    ) -> socket.socket:
        # http.client's signature; `timeout` is the request's own, which `deadline` already holds
        host, port = address
        infos = policy.resolver(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            policy.check_address(host, sockaddr[0])  # every address, so no answer order can sneak one in
        if not infos:
            raise OSError(f"{host} resolves to no address")
        last_error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:  # in order, as socket.create_connection does
            operation_timeout = deadline.next_timeout()
            sock = socket.socket(family, socktype, proto)
            try:
                sock.settimeout(operation_timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as err:
                sock.close()
                if deadline.expired():
                    raise deadline.exceeded() from err
                last_error = err
                continue
            except BaseException:
                sock.close()
                raise
            sock.settimeout(deadline.next_timeout())  # the TLS handshake and the request get what is left
            return sock
        assert last_error is not None
        raise last_error

    return create_connection


class _DeadlineReader(io.RawIOBase):
    """A response's byte stream whose every read waits at most min(per-operation timeout, time left)."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        # socket.makefile's stream counts as a reference: urllib closes the connection's socket right after
        # the headers, and the body stays readable through it.
        self._stream = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._deadline.next_timeout())
        try:
            return self._stream.readinto(buffer)
        except TimeoutError as err:
            if self._deadline.expired():
                raise self._deadline.exceeded() from err
            raise

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class _DeadlineSocket:
    """What http.client.HTTPResponse sees as its socket: it only asks for a file to read."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response whose status line, headers and body are all read against the URL's deadline."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(_DeadlineSocket(sock, deadline), *args, **kwargs)  # type: ignore[arg-type]


class _CappedResponse:
    """A response whose body stops at the byte cap and whose image header is checked against the pixel cap."""

    def __init__(self, response: http.client.HTTPResponse, policy: GuardPolicy, url: str) -> None:
        self._response = response
        self._policy = policy
        self._url = url

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            raise NotImplementedError("the guarded response is read whole")
        declared = self._response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self._policy.max_bytes:
            raise GuardError(f"{TOO_LARGE_PREFIX} body of {declared} bytes exceeds cap {self._policy.max_bytes}")
        body = self._response.read(self._policy.max_bytes + 1)
        if len(body) > self._policy.max_bytes:
            raise GuardError(f"{TOO_LARGE_PREFIX} body exceeds cap {self._policy.max_bytes} bytes")
        self._check_pixels(body)
        return body

    def _check_pixels(self, body: bytes) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(body)) as image:  # parses the header only
                    width, height = image.size
        except Image.DecompressionBombError as err:
            raise GuardError(f"{TOO_LARGE_PREFIX} {err}") from err
        except Exception:
            return  # not an image Pillow knows: OpenCV will say whether it decodes
        if width * height > self._policy.max_pixels:
            raise GuardError(
                f"{TOO_LARGE_PREFIX} image of {width}x{height} pixels exceeds cap {self._policy.max_pixels}"
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    def __enter__(self) -> _CappedResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self._response.close()


class _GuardedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    def __init__(self, policy: GuardPolicy) -> None:
        urllib.request.HTTPHandler.__init__(self)
        urllib.request.HTTPSHandler.__init__(self)
        self.policy = policy

    def _open(
        self, connection_class: type[http.client.HTTPConnection], req: urllib.request.Request, **conn_kwargs: Any
    ):
        self.policy.check_url(req.full_url)
        deadline = _deadline_of(req, self.policy)
        create_connection = _guarded_create_connection(self.policy, deadline)

        def build(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            conn = connection_class(host, **kwargs)
            conn._create_connection = create_connection  # type: ignore[attr-defined]
            conn.response_class = functools.partial(_DeadlineResponse, deadline=deadline)  # type: ignore[assignment]
            return conn

        try:
            return self.do_open(build, req, **conn_kwargs)  # type: ignore[arg-type]
        except OSError as err:
            # a timeout of the TLS handshake or the request send, once the URL's time is up, is the deadline's
            if isinstance(err, GuardError) or isinstance(getattr(err, "reason", None), GuardError):
                raise
            if deadline.expired():
                raise deadline.exceeded() from err
            raise

    def http_open(self, req: urllib.request.Request):
        return self._open(http.client.HTTPConnection, req)

    def https_open(self, req: urllib.request.Request):
        return self._open(http.client.HTTPSConnection, req, context=self._context)

    def unknown_open(self, req: urllib.request.Request):
        self.policy.check_url(req.full_url)
        raise GuardError(f"{REFUSED_PREFIX} no handler for {req.full_url[:120]!r}")


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001 - urllib's signature
        target = headers.get("location") or headers.get("uri")
        if target:  # urllib's own scheme check would fail it too, but as a plain HTTP error
            self.policy.check_url(urljoin(req.full_url, target))
        return super().http_error_302(req, fp, code, msg, headers)

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:  # the next hop spends the same URL's time
            setattr(new, _DEADLINE_ATTR, getattr(req, _DEADLINE_ATTR, None))
        return new

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _CapBodies(urllib.request.BaseHandler):
    handler_order = 1100  # after HTTPErrorProcessor: only final 2xx responses get here

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy

    def http_response(self, req: urllib.request.Request, response: http.client.HTTPResponse):
        if isinstance(response, _CappedResponse):  # the final response of a redirect chain, wrapped already
            return response
        return _CappedResponse(response, self.policy, req.full_url)

    https_response = http_response


def build_opener(policy: GuardPolicy) -> urllib.request.OpenerDirector:
    """An opener with only the guarded handlers: no file/ftp/data/proxy handler is ever added."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHandler(policy),
        _GuardedRedirects(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _CapBodies(policy),
    ):
        opener.add_handler(handler)
    return opener


_INSTALL_LOCK = threading.Lock()


@contextlib.contextmanager
def guarded_urlopen(policy: GuardPolicy) -> Iterator[urllib.request.OpenerDirector]:
    """Route this process's `urllib.request.urlopen` (which img2dataset calls) through the guard.

    urllib offers only a process-wide opener, so guarded downloads in one process run one at a time, and
    the opener that was installed before is put back afterwards.
    """
    with _INSTALL_LOCK:
        previous = urllib.request._opener  # urllib's own slot; there is no public getter
        opener = build_opener(policy)
        urllib.request.install_opener(opener)
        try:
            yield opener
        finally:
            urllib.request.install_opener(previous)
