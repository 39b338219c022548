"""The suite runs on the plugin it ships: one server per session, a fresh database per test."""

pytest_plugins = ["asyncassets.testing"]
