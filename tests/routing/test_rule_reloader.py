"""Hot reload: start-up fails loudly, a broken edit keeps the last good rules, changes are seen.

No test sleeps: file changes are made visible by setting mtimes explicitly, and
watch() is driven by an event its reload sets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.routing import RoutingFacts, RuleError, RuleReloader

MakeFacts = Callable[..., RoutingFacts]
WriteRules = Callable[[str, str], Path]

GROUPS = frozenset({"First Line", "Catalogue Support", "Orders"})


def rule(name: str, group: str) -> str:
    return f"""
    rules:
      - name: {name}
        when: {{subject: {{contains: x}}}}
        then: {{group: "{group}"}}
    """


def touch(path: Path, bump: int = 1) -> None:
    """Move a file's mtime forward, as an edit would, without waiting for the clock."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))


@pytest.fixture
def reloader(rules_dir: Path, write_rules: WriteRules) -> RuleReloader:
    write_rules("10-a.yaml", rule("a", "Orders"))
    return RuleReloader(rules_dir, GROUPS)


def test_start_up_fails_loudly(rules_dir: Path, write_rules: WriteRules) -> None:
    write_rules("10-a.yaml", rule("a", "Nowhere"))
    with pytest.raises(RuleError, match=r"^rules/10-a.yaml:4: rules\[0\]\.then\.group: "):
        RuleReloader(rules_dir, GROUPS)


def test_missing_directory_fails_start_up(rules_dir: Path) -> None:
    with pytest.raises(RuleError, match=r"^rules/none: no such directory"):
        RuleReloader(rules_dir / "none", GROUPS)


def test_broken_edit_keeps_last_good_rules(
    reloader: RuleReloader,
    write_rules: WriteRules,
    facts: MakeFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = reloader.current
    assert good.evaluate(facts(subject="x")).group == "Orders"

    touch(write_rules("10-a.yaml", rule("a", "Catalog Support")))
    assert reloader.changed()
    with caplog.at_level(logging.ERROR, logger="gateway.routing.reloader"):
        error = reloader.reload()
    assert isinstance(error, RuleError)
    assert error.key == "rules[0].then.group"
    assert reloader.current is good
    assert any(
        "keeping the 1 rules in force" in m and "Catalog Support" in m for m in caplog.messages
    )
    # The failed attempt counts as seen: the watcher does not retry (and re-log) it.
    assert not reloader.changed()

    touch(write_rules("10-a.yaml", rule("a", "Catalogue Support")), bump=2)
    assert reloader.changed()
    assert reloader.reload() is None
    assert reloader.current is not good
    assert reloader.current.evaluate(facts(subject="x")).group == "Catalogue Support"
    assert not reloader.changed()


def test_truncated_file_keeps_last_good_rules(
    reloader: RuleReloader, rules_dir: Path, facts: MakeFacts
) -> None:
    (rules_dir / "10-a.yaml").write_text("")
    assert isinstance(reloader.reload(), RuleError)
    assert reloader.current.evaluate(facts(subject="x")).group == "Orders"


def test_changed_sees_added_modified_and_removed_files(
    reloader: RuleReloader, rules_dir: Path, write_rules: WriteRules
) -> None:
    assert not reloader.changed()

    added = write_rules("20-b.yaml", rule("b", "First Line"))
    assert reloader.changed()
    assert reloader.reload() is None
    assert [r.name for r in reloader.current.rules] == ["a", "b"]
    assert not reloader.changed()

    # Same size, new mtime: an edit that swapped one group name for another.
    touch(added)
    assert reloader.changed()
    reloader.reload()

    # Same mtime, new size.
    stat = added.stat()
    added.write_text(added.read_text() + "# more\n")
    os.utime(added, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert reloader.changed()
    reloader.reload()

    added.unlink()
    assert reloader.changed()
    assert reloader.reload() is None
    assert [r.name for r in reloader.current.rules] == ["a"]

    # Files that are not rule files do not count.
    (rules_dir / "README.md").write_text("notes")
    (rules_dir / ".#10-a.yaml").write_text("lock")
    assert not reloader.changed()


def test_directory_removed_keeps_last_good_rules_until_restored(
    reloader: RuleReloader, rules_dir: Path, write_rules: WriteRules
) -> None:
    (rules_dir / "10-a.yaml").unlink()
    rules_dir.rmdir()
    assert reloader.changed()
    assert isinstance(reloader.reload(), RuleError)
    assert [r.name for r in reloader.current.rules] == ["a"]
    rules_dir.mkdir()
    write_rules("10-b.yaml", rule("b", "Orders"))
    assert reloader.changed()
    assert reloader.reload() is None
    assert [r.name for r in reloader.current.rules] == ["b"]


async def test_watch_reloads_changed_rules(
    reloader: RuleReloader,
    write_rules: WriteRules,
    facts: MakeFacts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reloaded = asyncio.Event()
    original = reloader.reload

    def reload() -> RuleError | None:
        result = original()
        reloaded.set()
        return result

    monkeypatch.setattr(reloader, "reload", reload)
    task = asyncio.create_task(reloader.watch(interval=0.001), name="test:rules:watch")
    try:
        touch(write_rules("10-a.yaml", rule("a", "First Line")))
        async with asyncio.timeout(10):
            await reloaded.wait()
        assert reloader.current.evaluate(facts(subject="x")).group == "First Line"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_survives_an_unexpected_error(
    reloader: RuleReloader, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    second_call = asyncio.Event()

    def changed() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("stale NFS handle")
        second_call.set()
        return False

    monkeypatch.setattr(reloader, "changed", changed)
    task = asyncio.create_task(reloader.watch(interval=0.001), name="test:rules:watch")
    try:
        async with asyncio.timeout(10):
            await second_call.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "routing rule watcher failed; retrying in 0.001s" in caplog.messages
