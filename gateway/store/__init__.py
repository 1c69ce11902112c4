"""Persistent state: SQLite schema and migrations, the usage writer, queries."""
