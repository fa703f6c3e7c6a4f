"""Listening sockets for `serve` and `webui`: bound before the model loads, so a taken port fails at once."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from glmtune.errors import GlmtuneError

log = logging.getLogger(__name__)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one, see `sock.getsockname()`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        # An unresolvable host is a gaierror with a negative errno that os.strerror cannot name.
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
        raise GlmtuneError(f"cannot listen on {host}:{port}: {reason}"
                           + (" (another server is using it; pick another --port)" if port else "")) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
