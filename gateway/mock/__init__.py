"""Bundled mock upstreams: ``app`` (faithful wire formats, records requests)
and ``fast`` (a raw asyncio server with fixed answers, for the bench)."""
