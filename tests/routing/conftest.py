"""Fixtures for routing tests: a rules directory under a temporary working directory,
a writer for rule files, and a factory for routing facts.

The working directory is the temporary directory, so rule files are named
`rules/<file>` in error messages exactly as they are in a deployment.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.routing import RoutingFacts, RuleSet, load_rules

GROUPS = frozenset({"First Line", "Catalogue Support", "Orders"})

WriteRules = Callable[[str, str], Path]
LoadText = Callable[[str], RuleSet]
MakeFacts = Callable[..., RoutingFacts]


@pytest.fixture
def rules_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    directory = Path("rules")
    directory.mkdir()
    return directory


@pytest.fixture
def write_rules(rules_dir: Path) -> WriteRules:
    def write(name: str, text: str) -> Path:
        path = rules_dir / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def ruleset(rules_dir: Path, write_rules: WriteRules) -> LoadText:
    """Load one rule file's text as the whole rule set."""

    def load(text: str) -> RuleSet:
        write_rules("10-test.yaml", text)
        return load_rules(rules_dir, GROUPS)

    return load


@pytest.fixture
def facts() -> MakeFacts:
    def make(**overrides: Any) -> RoutingFacts:
        values: dict[str, Any] = {
            "subject": "Hello",
            "sender": "user@example.org",
            "to": ("help@helpdesk.localhost",),
            "cc": (),
            "body": "Some text.",
            "headers": (),
            "channel": "email",
            "inbound": "help@helpdesk.localhost",
        }
        values.update(overrides)
        return RoutingFacts(**values)

    return make
