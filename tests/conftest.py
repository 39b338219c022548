"""The suite runs on the plugin it ships: one server per session, a fresh database per
test, and the Document classes a test declares forgotten when it ends (the sweep and
the check work on every Document class alive in the process; see asyncassets.testing).
"""

pytest_plugins = ["asyncassets.testing"]


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Two large byte strings that differ: say where, not how. pytest's own diff of
    them (difflib, quadratic) ran for hours on two 2 MiB files in CI."""
    large = 64 * 1024
    if (
        op == "=="
        and isinstance(left, (bytes, bytearray))
        and isinstance(right, (bytes, bytearray))
        and max(len(left), len(right)) > large
    ):
        first = next(
            (i for i, (a, b) in enumerate(zip(left, right, strict=False)) if a != b),
            min(len(left), len(right)),
        )
        return [
            f"{len(left)} bytes == {len(right)} bytes: they differ from byte {first}",
            f"left[{first}:{first + 16}] = {bytes(left[first:first + 16])!r}",
            f"right[{first}:{first + 16}] = {bytes(right[first:first + 16])!r}",
        ]
    return None
