"""A free TCP port on 127.0.0.1, for the commands that start local child processes (the demo,
the benchmark) and for the tests.

Only picks a number: the caller binds it. Never touches anything but the loopback address.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (the OS may hand it out again once released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
