"""gateway: a self-hosted, low-overhead LLM API gateway."""

__version__ = "0.1.0"
