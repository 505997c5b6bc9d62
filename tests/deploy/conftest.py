"""Starts the compose stack (tests/deploy/stack.py) in the background as soon as the session has collected
a test of test_deploy_stack.py, and moves those tests to the end of the session.

Why: the stack takes ~140 s to come up (packages, dockerd, base image, image build, two replicas healthy),
mostly waiting on downloads, unpacking and model loads, while the serial suite uses only about half of
the CI machine's two cores (the e2e tiers mostly wait on their servers). Started at collection and waited
for last, it builds while the other tiers run. A session that selects no stack test (`pytest tests/router`,
`-k something_else`, `-m "not stack"`, `--collect-only`, `--setup-plan`) never touches Docker.
"""
from __future__ import annotations

import pytest

pytest.register_assert_rewrite("stack")

import stack  # noqa: E402  (tests/deploy is on sys.path: the test module imports this same module)

STACK_TESTS = "test_deploy_stack.py"


def is_stack_test(item: pytest.Item) -> bool:
    return item.path.name == STACK_TESTS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The stack tests run last (pytest runs items in this order; tests/deploy sorts first), so the rest
    of the suite runs while the stack builds, and the `stack` fixture rarely waits."""
    items[:] = [i for i in items if not is_stack_test(i)] + [i for i in items if is_stack_test(i)]


def pytest_collection_finish(session: pytest.Session) -> None:
    # After deselection (-k, -m): session.items is what will run.
    option = session.config.option
    if not (option.collectonly or option.setupplan) and any(is_stack_test(i) for i in session.items):
        stack.begin()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # The stack fixture tears down at the module's end; this covers a session that stopped before
    # (-x, Ctrl-C, a failure elsewhere): no dockerd, tmpfs or containers left behind. down() is idempotent.
    started = stack.current()
    if started is not None:
        started.down()
