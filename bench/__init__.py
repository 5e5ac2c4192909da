"""Bench: reproducible benchmarks of verlyard through the real services (`make bench`, docs/benchmarks.md)."""
