"""No test reaches a non-loopback address: connects, UDP sends and name lookups outside
127.0.0.0/8, ::1 and localhost raise `LoopbackOnlyError` (not an OSError, so no client retries
it or takes it for a network hiccup) and are recorded, so a test fails even where the error
was swallowed. Installed in the test process by tests/conftest.py and in child processes by
tests/netguard/sitecustomize.py (on their PYTHONPATH through servers.loopback_env)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from typing import Any

violations: list[str] = []
_lock = threading.Lock()
_installed = False


class LoopbackOnlyError(RuntimeError):
    """A test tried to reach a non-loopback address."""


def is_loopback(host: Any) -> bool:
    if host in (None, "", "localhost", "localhost.", "ip6-localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _refuse(what: str) -> None:
    message = f"blocked {what}: tests may only reach loopback addresses (127.0.0.1, ::1, localhost)"
    with _lock:
        violations.append(message)
    log = os.environ.get("TRAINCTL_TEST_NETGUARD_LOG")
    if log:
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}: {message}\n")
        except OSError:
            pass
    raise LoopbackOnlyError(message)


def _check_address(sock: socket.socket, address: Any, what: str) -> None:
    if (sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple)
            and not is_loopback(address[0])):
        _refuse(f"{what} to {address[0]}:{address[1] if len(address) > 1 else '?'}")


def install() -> None:
    """Patch socket's connect / connect_ex / sendto and getaddrinfo (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_sendto = socket.socket.sendto
    original_getaddrinfo = socket.getaddrinfo
    own_names = {socket.gethostname()}

    def connect(self: socket.socket, address: Any) -> Any:
        _check_address(self, address, "connect")
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        _check_address(self, address, "connect")
        return original_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> Any:
        _check_address(self, args[-1] if args else None, "sendto")
        return original_sendto(self, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if not (is_loopback(name) or name in own_names):
            _refuse(f"name lookup of {name!r}")
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
