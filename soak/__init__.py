"""Soak: fault injection against the real services and a Jepsen-style checker (`make soak`, docs/reliability.md)."""
