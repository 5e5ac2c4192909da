"""verlyard_agent: the GPU agent."""

__version__ = "0.1.0"
