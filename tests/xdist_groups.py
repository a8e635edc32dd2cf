"""A pytest plugin (loaded by conftest.py): ``--dist loadgroup`` groups the tests marked ``xdist_group`` again.

pytest-xdist's worker marks a test of group G by appending ``@G`` to its node id, and its scheduler sends every
test whose id ends in ``@G`` to one worker. It does so by assigning ``item._nodeid``, which pytest 9's structured
node ids no longer read (pytest-xdist issue #1386, fix proposed in PR #1388): the suffix is lost, the tests of a
group are dealt out one by one, and a module fixture they share (two processes spawned, a reference training run)
is made once on each worker -- twice the work for nothing. Here the suffix is set through the structured id.
Once pytest-xdist sets it itself the ids already end in ``@G`` and this does nothing.

It imports no torch, so a test can load it in a bare pytest process (tests/test_suite_groups.py).
"""

from __future__ import annotations

import pytest


def group_suffix(item: pytest.Item) -> str:
    """``@G`` for a test marked ``xdist_group(G)`` (several groups joined as pytest-xdist joins them), else ``""``."""
    names = {str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
             for mark in item.iter_markers("xdist_group")}
    return "@" + "_".join(sorted(names)) if names else ""


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, so that a working one is seen and left alone
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set on the workers of --dist loadgroup only
        return
    for item in items:
        suffix = group_suffix(item)
        if suffix and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = type(item._id).parse(item.nodeid + suffix)
