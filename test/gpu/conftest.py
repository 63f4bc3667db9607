"""GPU-test fixtures: the session-scoped tiny bundle (see test/fixtures_bundle.py)."""

from fixtures_bundle import tiny_bundle  # noqa: F401 - re-exported as a fixture
