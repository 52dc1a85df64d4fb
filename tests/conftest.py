"""Shared pytest set-up. Fixture modules live in tests/fixtures/ and are listed here."""
pytest_plugins: list[str] = [
    "tests.fixtures.rootfs",
    "tests.fixtures.seaweed",
    "tests.fixtures.mount",
    "tests.fixtures.registry",
]
