"""The suite runs on the plugin it ships: one server per session, a fresh database per
test, and the Document classes a test declares forgotten when it ends (the sweep and
the check work on every Document class alive in the process; see asyncassets.testing).
"""

pytest_plugins = ["asyncassets.testing"]
