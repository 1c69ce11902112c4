"""Console passwords: argon2id hashes (argon2-cffi), checked in constant cost.

Apart from gateway.access so that the CLI (``gateway users create``) hashes
a password without importing the server. Each hash takes 64 MiB and about
0.1 s of CPU: the server runs them in worker threads, a few at a time
(gateway.access).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# RFC 9106's second recommended option (argon2id, t=3, 64 MiB, p=4), set here
# rather than taken from the library's defaults so that DUMMY_HASH below
# always costs what a real hash costs.
HASHER = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4, hash_len=32, salt_len=16)
DUMMY_HASH = ("$argon2id$v=19$m=65536,t=3,p=4$R5dnwN+3T2LA8G5Pa8SY5g$"
              "PNWR/7yzCk4Lc2GosiPTzKmldBk4rpTXyO6HIArnS+Y")


def matches(hashed: str | None, password: str) -> bool:
    """Whether ``password`` is the one ``hashed`` was made from. With None
    (no such account, or no password set) it checks against DUMMY_HASH, at
    the same cost, and answers False whatever that says: neither the answer
    nor its timing tells whether the account exists."""
    try:
        ok = HASHER.verify(hashed or DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False
    return ok and hashed is not None
