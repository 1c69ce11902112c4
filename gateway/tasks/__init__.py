"""Video tasks and material assets: providers, store access, poller, handlers."""
