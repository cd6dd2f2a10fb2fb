"""Free loopback ports for the servers a user or a test starts on this machine (Ray heads, Serve)."""

from __future__ import annotations

import socket

# Ray hands ports in this range to its workers; a head or proxy placed there can collide with one.
RAY_WORKER_PORTS = range(10002, 20000)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, outside Ray's worker port range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port
