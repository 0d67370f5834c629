"""Routing: YAML rules that decide a new ticket's group, priority, type and tags, or drop it.

`load_rules` reads `rules/*.yaml` into a `RuleSet`; `RuleSet.evaluate` turns the
`RoutingFacts` of a message into a `Decision` with a trail of every rule it
evaluated; `RuleReloader` holds the rules in force and reloads them safely.
"""

from gateway.routing.engine import Decision, RoutingFacts, Rule, RuleSet, TrailEntry
from gateway.routing.loader import RuleError, load_rules, rule_files
from gateway.routing.reloader import RuleReloader
from gateway.routing.schema import RuleFile

__all__ = [
    "Decision",
    "RoutingFacts",
    "Rule",
    "RuleError",
    "RuleFile",
    "RuleReloader",
    "RuleSet",
    "TrailEntry",
    "load_rules",
    "rule_files",
]
