"""The event store: the port (`port.py`), an in-memory fake and the Postgres adapter."""
