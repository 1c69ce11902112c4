"""The Store protocol on PostgreSQL (asyncpg): schema, COPY usage writer, partitions, tasks."""
