"""Closing a listening socket without resetting what it has accepted.

The kernel completes TCP handshakes on its own and queues the connections
until the process calls accept(). Closing a listening socket resets every
connection still in that queue: clients that connected fine see
"connection reset" with nothing sent back. A graceful stop must therefore
first make the socket stop taking new connections, then let the queue be
accepted and served, and only then close it. Linux has no call that stops
a listening socket from completing handshakes while keeping its queue, so
``refuse_new`` attaches a socket filter (classic BPF, ``SO_ATTACH_FILTER``)
that drops every new connection's first packet (SYN without ACK): a client
connecting from then on sees its SYN unanswered, retries it (after 1 s,
then 3 s, ...) and is refused once the socket is closed, or is taken by
another socket on the port (a second `gateway serve` with SO_REUSEPORT).
Handshakes already under way still complete (their ACKs pass the filter).
``wait_drained`` then waits until the accept queue (TCP_INFO's
``tcpi_unacked`` on a listening socket) has stayed empty for a moment.

Hand-written because neither asyncio, uvloop nor aiohttp offers it: their
servers close the listening socket as the first step of a shutdown.
Elsewhere than Linux both calls do nothing (the socket is closed at once,
as before).
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import time
from collections.abc import Sequence

log = logging.getLogger("gateway")

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>
# Keep the new connection's packet unless its TCP flags, masked with SYN|ACK,
# are exactly SYN. A socket filter sees a TCP packet from its TCP header on.
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]        TCP flags
    (0x54, 0, 0, 0x12),  # and #0x12     SYN|ACK
    (0x15, 0, 1, 0x02),  # jeq #0x02     a SYN alone? next, else skip one
    (0x06, 0, 0, 0),  # ret #0           drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1 keep
)
_FILTER = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in _DROP_SYN))
_PROGRAM = struct.pack("HL", len(_DROP_SYN), ctypes.addressof(_FILTER))
# How long the accept queue must stay empty: a handshake under way when the
# filter went on completes within a round trip.
SETTLE_S = 0.3
DRAIN_TIMEOUT_S = 5.0


def refuse_new(sock: socket.socket) -> bool:
    """Make ``sock`` (a listening TCP socket, shared by every process that
    holds it) complete no new handshakes; True if it could."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _PROGRAM)
    except OSError as e:
        log.warning("cannot stop new connections before the listening socket closes: %s", e)
        return False
    return True


def queued(sock: socket.socket) -> int:
    """Connections waiting in the accept queue of listening ``sock``."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return 0
    return int(struct.unpack_from("I", info, 24)[0])  # tcpi_unacked: sk_ack_backlog when listening


def wait_drained(socks: Sequence[socket.socket], timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Block until the accept queues have stayed empty for SETTLE_S (the
    supervisor, whose workers accept meanwhile). False on timeout."""
    deadline = time.monotonic() + timeout
    empty_since = time.monotonic()
    while time.monotonic() < deadline:
        if any(queued(s) for s in socks):
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since >= SETTLE_S:
            return True
        time.sleep(0.01)
    return False


def close_door(socks: Sequence[socket.socket]) -> None:
    """Have listening ``socks`` take no new connection, then wait until
    the ones already queued have been accepted by whoever accepts on them
    (the caller's workers, or its event loop while this runs in a thread)."""
    if socks and all(refuse_new(s) for s in socks) and not wait_drained(socks):
        log.warning("connections still queued on the listening socket after %.0f s", DRAIN_TIMEOUT_S)
