"""Rule matching: compiled rules, their evaluation, and the trail that explains a decision.

The loader hands validated rule specs to `compile_rule`, which turns each
condition into a small tree of matchers with every regex compiled and every
needle case-folded, so evaluation does no parsing. `RuleSet.evaluate` walks the
rules in order (Mailman's chain model) and records every rule it evaluated, hit
or miss, with the reason, so "why did this go there" always has an answer.

Semantics: a matching rule that drops ends evaluation with drop (B4); the first
matching rule with a group decides the group and ends evaluation unless it says
`continue`; rules without a group add their tags, priority and type and go on;
`stop` ends evaluation. Priority and type keep the first value set; tags
accumulate without duplicates, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.message import Channel, ParsedMail
from gateway.routing.schema import (
    Action,
    AddressTest,
    ChannelTest,
    Condition,
    HeaderTest,
    RuleSpec,
    TextTest,
    compile_regex,
)


@dataclass(frozen=True, slots=True)
class RoutingFacts:
    """What rules can see about a new message.

    Addresses are bare (`user@example.org`); `subject` is the whole decoded
    subject (B3); `inbound` is the inbound address the message was delivered to.
    """

    subject: str
    sender: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    body: str
    headers: tuple[tuple[str, str], ...]
    channel: str
    inbound: str | None

    @classmethod
    def from_mail(
        cls, mail: ParsedMail, *, inbound: str | None, channel: str = Channel.EMAIL
    ) -> RoutingFacts:
        """The facts of a parsed email delivered to `inbound`."""
        return cls(
            subject=mail.subject,
            sender=mail.sender.address if mail.sender is not None else "",
            to=tuple(a.address for a in mail.to),
            cc=tuple(a.address for a in mail.cc),
            body=mail.text,
            headers=mail.headers,
            channel=str(channel),
            inbound=inbound,
        )


@dataclass(frozen=True, slots=True)
class TrailEntry:
    """One rule evaluated for a message: where it is, whether it matched, and why.

    `detail` is the part of the condition that decided: for a hit, what held
    (`subject contains 'Catalogue'`); for a miss, what did not. `effect` says
    what a hit did (`group=Orders, priority=high`), empty for a miss.
    """

    rule: str
    source: str
    matched: bool
    detail: str
    effect: str = ""

    def __str__(self) -> str:
        verdict = "hit" if self.matched else "miss"
        effect = f" -> {self.effect}" if self.effect else ""
        return f"{self.source} {self.rule}: {verdict} ({self.detail}){effect}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the rules decided for one message. None means "no rule said" (use defaults)."""

    group: str | None
    priority: str | None
    type: str | None
    tags: tuple[str, ...]
    drop: bool
    drop_rule: str | None
    trail: tuple[TrailEntry, ...]

    @property
    def matched_rules(self) -> tuple[str, ...]:
        """Names of the rules that matched, in evaluation order."""
        return tuple(entry.rule for entry in self.trail if entry.matched)

    def explain(self) -> str:
        """The trail as text, one rule per line (for audit events and the CLI)."""
        return "\n".join(str(entry) for entry in self.trail) or "no rules"


class _View:
    """One message as matchers see it; each field is folded or encoded at most once."""

    __slots__ = ("_cache", "_facts", "_headers")

    def __init__(self, facts: RoutingFacts) -> None:
        self._facts = facts
        self._cache: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._headers: dict[str, tuple[str, ...]] | None = None

    def raw(self, key: str) -> tuple[str, ...]:
        facts = self._facts
        if key == "subject":
            return (facts.subject,)
        if key == "body":
            return (facts.body,)
        if key == "from":
            return (facts.sender,)
        if key == "to":
            return facts.to
        if key == "cc":
            return facts.cc
        if key == "channel":
            return (facts.channel,)
        if key == "inbound":
            return () if facts.inbound is None else (facts.inbound,)
        # "header:<lower-case name>"
        if self._headers is None:
            index: dict[str, list[str]] = {}
            for name, value in facts.headers:
                index.setdefault(name.lower(), []).append(value)
            self._headers = {name: tuple(values) for name, values in index.items()}
        return self._headers.get(key[7:], ())

    def folded(self, key: str) -> tuple[str, ...]:
        cached = self._cache.get((key, 0))
        if cached is None:
            cached = self._cache[key, 0] = tuple(v.casefold() for v in self.raw(key))
        return cached

    def encoded(self, key: str) -> tuple[bytes, ...]:
        # RE2 works on UTF-8; handing it bytes spares its per-call str offset bookkeeping.
        # "replace": a lone surrogate from a broken charset must not break routing.
        cached = self._cache.get((key, 1))
        if cached is None:
            cached = self._cache[key, 1] = tuple(
                v.encode("utf-8", "replace") for v in self.raw(key)
            )
        return cached


class Matcher:
    """A compiled condition: `test` says whether it holds and which part decided."""

    __slots__ = ()

    def test(self, view: _View) -> tuple[bool, str]:
        raise NotImplementedError


def _quote(value: str) -> str:
    return "'" + value.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + "'"


class _Leaf(Matcher):
    """One operator on one field; `values` hit if any value of the field satisfies any of them."""

    __slots__ = ("_hits", "_key", "_miss", "_predicates")

    def __init__(
        self,
        key: str,
        label: str,
        verb: str,
        values: list[str],
        predicates: list[Callable[[_View, str], bool]],
        suffix: str = "",
    ) -> None:
        self._key = key
        self._predicates = tuple(predicates)
        self._hits = tuple(f"{label} {verb} {_quote(v)}{suffix}" for v in values)
        wanted = (
            _quote(values[0])
            if len(values) == 1
            else "any of (" + ", ".join(_quote(v) for v in values) + ")"
        )
        self._miss = f"{label} {verb} {wanted}{suffix}"

    def test(self, view: _View) -> tuple[bool, str]:
        for predicate, hit in zip(self._predicates, self._hits, strict=True):
            if predicate(view, self._key):
                return True, hit
        return False, self._miss


def _contains(needle: str, case_sensitive: bool) -> Callable[[_View, str], bool]:
    if case_sensitive:
        return lambda view, key: any(needle in v for v in view.raw(key))
    folded = needle.casefold()
    return lambda view, key: any(folded in v for v in view.folded(key))


def _equals(wanted: str, case_sensitive: bool) -> Callable[[_View, str], bool]:
    if case_sensitive:
        return lambda view, key: wanted in view.raw(key)
    folded = wanted.casefold()
    return lambda view, key: folded in view.folded(key)


def _regex(pattern: str, case_sensitive: bool) -> Callable[[_View, str], bool]:
    search = compile_regex(pattern, case_sensitive=case_sensitive).search
    return lambda view, key: any(search(v) is not None for v in view.encoded(key))


def _address(address: str) -> Callable[[_View, str], bool]:
    folded = address.casefold()
    return lambda view, key: folded in view.folded(key)


def _domain(domain: str) -> Callable[[_View, str], bool]:
    suffix = "@" + domain.casefold()
    # Exact domain (B3): "x@sub.example.org" is not in "example.org".
    return lambda view, key: any(v.endswith(suffix) for v in view.folded(key))


def _leaf(key: str, label: str, spec: TextTest) -> Matcher:
    op, values = spec.operator()
    cs = spec.case_sensitive
    suffix = " (case-sensitive)" if cs and op in ("contains", "equals", "regex") else ""
    predicates: list[Callable[[_View, str], bool]]
    if op == "contains":
        predicates = [_contains(v, cs) for v in values]
    elif op == "equals":
        predicates = [_equals(v, cs) for v in values]
    elif op == "regex":
        predicates = [_regex(v, cs) for v in values]
    elif op == "address":
        predicates = [_address(v) for v in values]
    else:
        predicates = [_domain(v) for v in values]
    verb = {"regex": "matches"}.get(op, op)
    return _Leaf(key, label, verb, values, predicates, suffix)


class _All(Matcher):
    __slots__ = ("_parts",)

    def __init__(self, parts: Iterable[Matcher]) -> None:
        self._parts = tuple(parts)

    def test(self, view: _View) -> tuple[bool, str]:
        held: list[str] = []
        for part in self._parts:
            ok, detail = part.test(view)
            if not ok:
                return False, detail
            held.append(detail)
        return True, " and ".join(held)


class _Any(Matcher):
    __slots__ = ("_parts",)

    def __init__(self, parts: Iterable[Matcher]) -> None:
        self._parts = tuple(parts)

    def test(self, view: _View) -> tuple[bool, str]:
        failed: list[str] = []
        for part in self._parts:
            ok, detail = part.test(view)
            if ok:
                return True, detail
            failed.append(detail)
        return False, " or ".join(failed)


class _Not(Matcher):
    __slots__ = ("_part",)

    def __init__(self, part: Matcher) -> None:
        self._part = part

    def test(self, view: _View) -> tuple[bool, str]:
        ok, detail = self._part.test(view)
        return not ok, f"not ({detail})"


def compile_condition(spec: Condition) -> Matcher:
    """A condition spec as a matcher; the keys of one mapping are all required."""
    parts: list[Matcher] = []
    # Cheap tests first: an implicit "all" fails fast on channel or sender
    # before scanning a body. Explicit all/any lists keep the admin's order.
    if spec.channel is not None:
        parts.append(_channel(spec.channel))
    address_fields: tuple[tuple[str, AddressTest | None], ...] = (
        ("inbound", spec.inbound),
        ("from", spec.from_),
        ("to", spec.to),
        ("cc", spec.cc),
    )
    for key, address_test in address_fields:
        if address_test is not None:
            parts.append(_leaf(key, key, address_test))
    if spec.subject is not None:
        parts.append(_leaf("subject", "subject", spec.subject))
    if spec.header is not None:
        parts.append(_header(spec.header))
    if spec.body is not None:
        parts.append(_leaf("body", "body", spec.body))
    if spec.not_ is not None:
        parts.append(_Not(compile_condition(spec.not_)))
    if spec.any_ is not None:
        parts.append(_Any(compile_condition(c) for c in spec.any_))
    if spec.all_ is not None:
        parts.append(_All(compile_condition(c) for c in spec.all_))
    return parts[0] if len(parts) == 1 else _All(parts)


def _channel(spec: ChannelTest) -> Matcher:
    return _Leaf(
        "channel", "channel", "equals", spec.equals, [_equals(v, False) for v in spec.equals]
    )


def _header(spec: HeaderTest) -> Matcher:
    return _leaf("header:" + spec.name.lower(), f"header {spec.name}", spec)


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: its name, where it was written, its condition and action."""

    name: str
    source: str
    condition: Matcher = field(repr=False)
    group: str | None = None
    priority: str | None = None
    type: str | None = None
    tags: tuple[str, ...] = ()
    drop: bool = False
    continue_: bool = False
    stop: bool = False


def compile_rule(spec: RuleSpec, source: str) -> Rule:
    """A validated rule spec as a ready-to-run rule; `source` is "file:line"."""
    action: Action = spec.then
    return Rule(
        name=spec.name,
        source=source,
        condition=compile_condition(spec.when),
        group=action.group,
        priority=action.priority,
        type=action.type,
        tags=tuple(dict.fromkeys(action.tags)),
        drop=action.drop,
        continue_=action.continue_,
        stop=action.stop,
    )


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules in evaluation order (file-name order, then order within the file)."""

    rules: tuple[Rule, ...] = ()
    files: tuple[Path, ...] = ()

    @classmethod
    def empty(cls) -> RuleSet:
        """No rules: every message gets the defaults of its inbound address (B2)."""
        return cls()

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, facts: RoutingFacts) -> Decision:
        """Run the rules over one message and say what they decided, and why."""
        view = _View(facts)
        group: str | None = None
        priority: str | None = None
        type_: str | None = None
        tags: dict[str, None] = {}
        trail: list[TrailEntry] = []
        for rule in self.rules:
            matched, detail = rule.condition.test(view)
            if not matched:
                trail.append(TrailEntry(rule.name, rule.source, False, detail))
                continue
            if rule.drop:
                trail.append(TrailEntry(rule.name, rule.source, True, detail, "drop"))
                return Decision(group, priority, type_, tuple(tags), True, rule.name, tuple(trail))
            effects: list[str] = []
            if rule.priority is not None:
                if priority is None:
                    priority = rule.priority
                    effects.append(f"priority={priority}")
                else:
                    effects.append(f"priority={rule.priority} ignored (already {priority})")
            if rule.type is not None:
                if type_ is None:
                    type_ = rule.type
                    effects.append(f"type={type_}")
                else:
                    effects.append(f"type={rule.type} ignored (already {type_})")
            if rule.tags:
                tags.update(dict.fromkeys(rule.tags))
                effects.append("tags=" + ",".join(rule.tags))
            done = rule.stop
            if rule.group is not None:
                if group is None:
                    group = rule.group
                    effects.insert(0, f"group={group}")
                else:
                    effects.insert(0, f"group={rule.group} ignored (already {group})")
                done = done or not rule.continue_
            if done:
                effects.append("stop")
            trail.append(TrailEntry(rule.name, rule.source, True, detail, ", ".join(effects)))
            if done:
                break
        return Decision(group, priority, type_, tuple(tags), False, None, tuple(trail))
