"""The compose stack's tests (tests/deploy/stack.py) run at the end of the session, and whatever they
started is torn down when the session ends, however it ends.

The stack is built when its fixture first runs, not in the background from collection: that was tried
(2026-12-06, 2-core host) and the whole suite took longer (892 and 911 s of pytest against 781 s serial): the
build's CPU, even at nice 19, slowed the e2e tiers' OpenMP-bound servers more than it saved (one test went
from 18 s to 89 s). `stack.begin()` still starts it in a thread, for a machine with cores to spare.
"""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("stack")

import stack  # noqa: E402  (tests/deploy is on sys.path: the test module imports this same module)

STACK_TESTS = "test_deploy_stack.py"


def is_stack_test(item: pytest.Item) -> bool:
    return item.path.name == STACK_TESTS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The stack tests run last (pytest runs items in this order; tests/deploy sorts first): the slowest
    tests and the only ones that need Docker, so every other tier has reported before they start."""
    items[:] = [i for i in items if not is_stack_test(i)] + [i for i in items if is_stack_test(i)]


def pytest_sessionfinish(session: pytest.Session) -> None:
    # The stack fixture tears down at the module's end; this covers a session that stopped before
    # (-x, Ctrl-C, a failure elsewhere): no dockerd, tmpfs or containers left behind. down() is idempotent.
    started = stack.current()
    if started is not None:
        started.down()
