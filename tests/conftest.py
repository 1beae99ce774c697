"""Session-wide: the persistent gloo ranks of tests/dist.py's pool end with the session."""

from __future__ import annotations


def pytest_sessionfinish(session, exitstatus):
    from tests.dist import close_pools

    close_pools()
