"""Listening sockets for `serve` and `webui`: bound before the model loads, so a taken port fails at once;
and which `Host` headers a server bound to an address answers (against DNS rebinding)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

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


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The host of a `Host` header, without port, brackets or a final dot, in lower case."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":")[0]
    return header.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class AllowedHosts:
    """The `Host` values a server answers. A web page can make a browser send requests to a server on this
    machine under a name the page's owner controls (DNS rebinding); checking the name stops that."""

    names: frozenset[str]
    any_address: bool = False  # every address of this machine (bound to all of them); no IP can be rebound
    anything: bool = False  # --allowed-host '*'

    def allows(self, header: str | None) -> bool:
        if self.anything or header is None:  # no Host at all: HTTP/1.0, never a browser
            return True
        name = host_name(header)
        return name in self.names or (self.any_address and _is_address(name))


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> AllowedHosts:
    """What a server bound to `bind` answers: the bound name or address; for a loopback address also
    localhost, 127.0.0.1 and ::1; for all interfaces (0.0.0.0, ::) any IP address, localhost and this
    machine's name; plus the `extra` names (`*`: any)."""
    extra = [e.strip() for e in extra if e.strip()]
    names = {host_name(bind)} | {host_name(e) for e in extra if e != "*"}
    wildcard = bind in ("", "0.0.0.0", "::")
    if wildcard or is_loopback(bind):
        names.update(LOOPBACK_NAMES)
    if wildcard:
        names.add(host_name(socket.gethostname()))  # (no getfqdn: a DNS lookup that may hang offline)
    return AllowedHosts(frozenset(names), any_address=wildcard, anything="*" in extra)
