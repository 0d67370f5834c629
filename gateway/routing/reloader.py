"""Hot reload of routing rules: hold the current RuleSet, swap it only for a good one.

Start-up loads once and fails loudly (a daemon with broken rules must not start).
After that, an edit that breaks a file is logged and the last good rule set stays
in force, so a typo never reroutes mail; the fixed file is picked up by the next
reload. `watch()` polls file names, sizes and mtimes, which works on every file
system and needs no inotify.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from gateway.routing.engine import RuleSet
from gateway.routing.loader import RuleError, load_rules, rule_files

log = logging.getLogger(__name__)

# name -> (mtime_ns, size) of every rule file.
Snapshot = dict[str, tuple[int, int]]


def _snapshot(directory: Path) -> Snapshot:
    snapshot: Snapshot = {}
    try:
        paths = rule_files(directory)
    except RuleError:
        # Not a directory (any more): let the next load say so.
        return {"": (-1, -1)}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue  # removed between listing and stat: absent is the truth now
        snapshot[path.name] = (stat.st_mtime_ns, stat.st_size)
    return snapshot


class RuleReloader:
    """Holds the routing rules in force and reloads them when their files change."""

    def __init__(self, directory: Path, group_names: frozenset[str]) -> None:
        self._directory = directory
        self._group_names = group_names
        # Taken before reading, so an edit made during the load is seen as a change.
        self._snapshot = _snapshot(directory)
        self._current = load_rules(directory, group_names)
        log.info(
            "loaded %d routing rules from %d files in %s",
            len(self._current.rules),
            len(self._current.files),
            directory,
        )

    @property
    def current(self) -> RuleSet:
        """The rule set in force (a frozen object: safe to keep for one message)."""
        return self._current

    @property
    def directory(self) -> Path:
        return self._directory

    def changed(self) -> bool:
        """Whether a rule file was added, removed or modified since the last load attempt."""
        return _snapshot(self._directory) != self._snapshot

    def reload(self) -> RuleError | None:
        """Load the rules again; on error log it, keep the current set and return the error."""
        # A failed attempt also counts as "seen": watch() must not re-log the same
        # broken file every interval; the next edit triggers the next attempt.
        self._snapshot = _snapshot(self._directory)
        try:
            rules = load_rules(self._directory, self._group_names)
        except RuleError as exc:
            log.error(
                "routing rules not reloaded, keeping the %d rules in force: %s",
                len(self._current.rules),
                exc,
            )
            return exc
        self._current = rules
        log.info(
            "reloaded %d routing rules from %d files in %s",
            len(rules.rules),
            len(rules.files),
            self._directory,
        )
        return None

    async def watch(self, interval: float = 2.0) -> None:
        """Reload whenever the rule files change; runs until cancelled."""
        while True:
            try:
                # stat() and YAML parsing are blocking file work: off the event loop.
                if await asyncio.to_thread(self.changed):
                    await asyncio.to_thread(self.reload)
            except Exception:
                # A bug here must not silently end hot reload for the daemon's lifetime.
                log.exception("routing rule watcher failed; retrying in %ss", interval)
            await asyncio.sleep(interval)
