"""verlyard_shared: the wire contracts and plumbing every verlyard service shares."""

__version__ = "0.1.0"
