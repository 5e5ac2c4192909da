"""verlyard_api: the HTTP API service, projections and the outbox relay."""
