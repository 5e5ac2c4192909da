"""Test fixtures shared by every tier. Integration and e2e fixtures start throwaway servers."""

pytest_plugins = ["tests.plugins.postgres", "tests.plugins.nats", "tests.plugins.trainer", "tests.plugins.ssh"]
