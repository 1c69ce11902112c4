"""The Store protocol on SQLite (the default)."""
