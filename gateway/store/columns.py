"""The usage row: its columns, in the order of a row tuple (shared by the
usage writer, the rollups and the metrics)."""

COLUMNS = (
    "ts",
    "request_id",
    "workspace_id",
    "key_id",
    "endpoint",
    "model",
    "upstream",
    "status",
    "stream",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "images",
    "video_tokens",
    "cost",
    "latency_ms",
    "ttfb_ms",
    "upstream_ms",
    "overhead_ms",
    "bytes_in",
    "bytes_out",
    "error_type",
)
