"""Entrypoint: the web dashboard, static files served by the API under /ui (docs/adr/0012-web-dashboard.md)."""
