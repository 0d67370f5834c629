"""The shipped example rules load against the demo configuration and route as documented."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.routing import RoutingFacts, RuleSet, load_rules

MakeFacts = Callable[..., RoutingFacts]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example() -> RuleSet:
    demo = tomllib.loads((ROOT / "gateway/defaults/helpdeskd.toml").read_text(encoding="utf-8"))
    groups = frozenset(group["name"] for group in demo["groups"])
    assert {"First Line", "Catalogue Support", "Orders"} <= groups
    return load_rules(ROOT / "rules", groups)


def test_example_file_is_loaded(example: RuleSet) -> None:
    assert [p.name for p in example.files] == ["00-example.yaml"]
    assert [r.name for r in example.rules] == ["spam", "urgent", "catalogue", "orders", "telegram"]


def test_catalogue(example: RuleSet, facts: MakeFacts) -> None:
    decision = example.evaluate(facts(subject="Question about the Catalogue"))
    assert (decision.group, decision.priority, decision.tags) == (
        "Catalogue Support",
        None,
        ("catalogue",),
    )


def test_spam_is_dropped(example: RuleSet, facts: MakeFacts) -> None:
    flagged = example.evaluate(facts(subject="Catalogue", headers=(("X-Spam-Flag", "YES"),)))
    assert (flagged.drop, flagged.drop_rule) == (True, "spam")
    assert example.evaluate(facts(sender="x@junk.example")).drop
    assert not example.evaluate(facts(headers=(("X-Spam-Flag", "NO"),))).drop


def test_urgent_order(example: RuleSet, facts: MakeFacts) -> None:
    decision = example.evaluate(facts(subject="URGENT: my order is stuck"))
    assert (decision.group, decision.priority, decision.type, decision.tags) == (
        "Orders",
        "high",
        "service-order",
        ("urgent", "order"),
    )
    automatic = example.evaluate(facts(subject="order 42", sender="noreply@orders.example"))
    assert automatic.group is None


def test_telegram_and_default(example: RuleSet, facts: MakeFacts) -> None:
    assert example.evaluate(facts(channel="telegram")).group == "First Line"
    # Nothing matches: the inbound address's default group applies (B2).
    unrouted = example.evaluate(facts(subject="Password reset"))
    assert unrouted.group is None and not unrouted.drop
    assert [e.matched for e in unrouted.trail] == [False] * 5
