"""Rule matching and decisions: every field and operator, nesting, order, and the trail."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.message import Address, ParsedMail
from gateway.routing import RoutingFacts, RuleSet, TrailEntry, load_rules

LoadText = Callable[[str], RuleSet]
MakeFacts = Callable[..., RoutingFacts]
WriteRules = Callable[[str, str], Path]

GROUPS = frozenset({"First Line", "Catalogue Support", "Orders"})


def one_rule(condition: str) -> str:
    return f"""
    rules:
      - name: probe
        when: {condition}
        then: {{tags: [hit]}}
    """


# (condition, facts overrides, expected match)
CASES: list[tuple[str, dict[str, Any], bool]] = [
    # subject
    ('{subject: {contains: "Catalogue"}}', {"subject": "Re: the CATALOGUE entry"}, True),
    ('{subject: {contains: "Catalogue"}}', {"subject": "Katalog"}, False),
    ('{subject: {contains: "STRASSE"}}', {"subject": "Hauptstraße 1"}, True),
    ('{subject: {contains: "Catalogue", case_sensitive: true}}', {"subject": "catalogue"}, False),
    ('{subject: {contains: "Catalogue", case_sensitive: true}}', {"subject": "a Catalogue"}, True),
    ('{subject: {equals: "hello"}}', {"subject": "HELLO"}, True),
    ('{subject: {equals: "hello"}}', {"subject": "hello there"}, False),
    ('{subject: {equals: "hello", case_sensitive: true}}', {"subject": "Hello"}, False),
    ("{subject: {regex: '\\border\\b'}}", {"subject": "My ORDER 42"}, True),
    ("{subject: {regex: '\\border\\b'}}", {"subject": "ordered twice"}, False),
    ("{subject: {regex: '\\border\\b'}}", {"subject": "the border"}, False),
    ("{subject: {regex: '\\border\\b'}}", {"subject": "order"}, True),
    ("{subject: {regex: 'order', case_sensitive: true}}", {"subject": "ORDER"}, False),
    ("{subject: {regex: '^re:'}}", {"subject": "RE: x"}, True),
    ("{subject: {regex: '^x'}}", {"subject": "RE: x"}, False),
    ("{subject: {contains: [invoice, receipt]}}", {"subject": "your Receipt"}, True),
    ("{subject: {contains: [invoice, receipt]}}", {"subject": "your bill"}, False),
    # body
    ('{body: {contains: "licence"}}', {"body": "line one\nmy LICENCE expired\n"}, True),
    ('{body: {contains: "licence"}}', {"body": "license"}, False),
    ('{body: {equals: "ping"}}', {"body": "PING"}, True),
    ("{body: {regex: 'order (no\\.|#)\\s*\\d+'}}", {"body": "see Order #  123 please"}, True),
    ("{body: {regex: 'order (no\\.|#)\\s*\\d+'}}", {"body": "see order #x"}, False),
    ("{body: {regex: '(?m)^thanks$'}}", {"body": "hi\nThanks\nbye"}, True),
    # from
    ("{from: {address: User@Example.ORG}}", {"sender": "user@example.org"}, True),
    ("{from: {address: user@example.org}}", {"sender": "xuser@example.org"}, False),
    ("{from: {address: user@example.org}}", {"sender": "user@example.org.evil"}, False),
    ("{from: {domain: Example.org}}", {"sender": "someone@EXAMPLE.ORG"}, True),
    ("{from: {domain: example.org}}", {"sender": "someone@sub.example.org"}, False),
    ("{from: {domain: example.org}}", {"sender": "someone@badexample.org"}, False),
    ("{from: {domain: [a.example, b.example]}}", {"sender": "x@b.example"}, True),
    ('{from: {contains: "noreply"}}', {"sender": "NoReply@x.example"}, True),
    ('{from: {equals: "u@x.example"}}', {"sender": "u@x.example"}, True),
    ("{from: {regex: '^(no-?reply|mailer-daemon)@'}}", {"sender": "no-reply@x.example"}, True),
    ("{from: {domain: example.org}}", {"sender": ""}, False),
    # to / cc: any element
    ("{to: {address: orders@x.example}}", {"to": ("a@x.example", "Orders@X.example")}, True),
    (
        "{to: {address: orders@x.example}}",
        {"to": ("a@x.example",), "cc": ("orders@x.example",)},
        False,
    ),
    ("{to: {domain: x.example}}", {"to": ()}, False),
    ("{cc: {address: orders@x.example}}", {"cc": ("b@y.example", "orders@x.example")}, True),
    ("{cc: {domain: y.example}}", {"cc": ("b@y.example",)}, True),
    ("{cc: {contains: orders}}", {"cc": ()}, False),
    # inbound
    ("{inbound: {address: help@helpdesk.localhost}}", {"inbound": "HELP@helpdesk.localhost"}, True),
    (
        "{inbound: {address: help@helpdesk.localhost}}",
        {"inbound": "orders@helpdesk.localhost"},
        False,
    ),
    ("{inbound: {address: help@helpdesk.localhost}}", {"inbound": None}, False),
    ("{inbound: {domain: helpdesk.localhost}}", {"inbound": "orders@helpdesk.localhost"}, True),
    # header: name case-insensitive, any value
    (
        '{header: {name: X-Spam-Flag, equals: "YES"}}',
        {"headers": (("x-spam-flag", "yes"),)},
        True,
    ),
    ('{header: {name: X-Spam-Flag, equals: "YES"}}', {"headers": (("X-Spam-Flag", "NO"),)}, False),
    ('{header: {name: X-Spam-Flag, equals: "YES"}}', {"headers": ()}, False),
    (
        "{header: {name: Received, contains: relay.example}}",
        {"headers": (("Received", "from a"), ("Received", "from relay.example"))},
        True,
    ),
    (
        "{header: {name: List-Id, regex: '<.*\\.lists\\.example>$'}}",
        {"headers": (("List-Id", "Users <users.lists.example>"),)},
        True,
    ),
    ("{header: {name: X-A, equals: x, case_sensitive: true}}", {"headers": (("X-A", "X"),)}, False),
    # channel
    ("{channel: {equals: telegram}}", {"channel": "telegram"}, True),
    ("{channel: {equals: telegram}}", {"channel": "email"}, False),
    ("{channel: {equals: [web, telegram]}}", {"channel": "web"}, True),
    # YAML 1.2: NO is the string "NO", not false.
    ("{header: {name: X-Flag, equals: NO}}", {"headers": (("X-Flag", "no"),)}, True),
    ("{subject: {equals: no}}", {"subject": "No"}, True),
    ("{subject: {contains: on}}", {"subject": "Monday"}, True),
]


@pytest.mark.parametrize(("condition", "overrides", "expected"), CASES)
def test_field_and_operator(
    ruleset: LoadText,
    facts: MakeFacts,
    condition: str,
    overrides: dict[str, Any],
    expected: bool,
) -> None:
    decision = ruleset(one_rule(condition)).evaluate(facts(**overrides))
    assert decision.trail[0].matched is expected
    assert decision.tags == (("hit",) if expected else ())


def test_subject_is_never_truncated(ruleset: LoadText, facts: MakeFacts) -> None:
    subject = "Question about " + "very " * 200 + "long Catalogue"
    decision = ruleset(one_rule('{subject: {regex: "\\\\bcatalogue$"}}')).evaluate(
        facts(subject=subject)
    )
    assert decision.tags == ("hit",)


@pytest.mark.parametrize(
    ("condition", "overrides", "expected"),
    [
        # keys of one mapping must all hold
        (
            "{subject: {contains: a}, from: {domain: x.example}}",
            {"subject": "a", "sender": "u@x.example"},
            True,
        ),
        (
            "{subject: {contains: a}, from: {domain: x.example}}",
            {"subject": "a", "sender": "u@y.example"},
            False,
        ),
        ("{all: [{subject: {contains: a}}, {subject: {contains: b}}]}", {"subject": "ab"}, True),
        ("{all: [{subject: {contains: a}}, {subject: {contains: b}}]}", {"subject": "a"}, False),
        ("{any: [{subject: {contains: a}}, {subject: {contains: b}}]}", {"subject": "b"}, True),
        ("{any: [{subject: {contains: a}}, {subject: {contains: b}}]}", {"subject": "c"}, False),
        ("{not: {subject: {contains: a}}}", {"subject": "b"}, True),
        ("{not: {subject: {contains: a}}}", {"subject": "a"}, False),
        ("{not: {header: {name: X-Spam-Flag, equals: 'YES'}}}", {"headers": ()}, True),
        (
            "{any: [{all: [{subject: {contains: a}}, {not: {from: {domain: x.example}}}]},"
            " {channel: {equals: web}}]}",
            {"subject": "a", "sender": "u@y.example"},
            True,
        ),
        (
            "{any: [{all: [{subject: {contains: a}}, {not: {from: {domain: x.example}}}]},"
            " {channel: {equals: web}}]}",
            {"subject": "a", "sender": "u@x.example"},
            False,
        ),
        (
            "{any: [{all: [{subject: {contains: a}}, {not: {from: {domain: x.example}}}]},"
            " {channel: {equals: web}}]}",
            {"subject": "z", "sender": "u@x.example", "channel": "web"},
            True,
        ),
        ("{not: {not: {subject: {contains: a}}}}", {"subject": "a"}, True),
    ],
)
def test_nesting(
    ruleset: LoadText,
    facts: MakeFacts,
    condition: str,
    overrides: dict[str, Any],
    expected: bool,
) -> None:
    decision = ruleset(one_rule(condition)).evaluate(facts(**overrides))
    assert decision.trail[0].matched is expected


def test_trail_explains_hits_and_misses(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: spam
            when:
              any:
                - header: {name: X-Spam-Flag, equals: "YES"}
                - from: {domain: [spam.example, junk.example]}
            then: {drop: true}
          - name: not-web
            when: {not: {channel: {equals: web}}, subject: {regex: '\\border\\b'}}
            then: {tags: [order]}
          - name: catalogue
            when:
              subject: {contains: "Catalogue", case_sensitive: true}
            then: {group: "Catalogue Support", priority: high}
        """
    )
    decision = rules.evaluate(facts(subject="Catalogue order"))
    assert decision.trail == (
        TrailEntry(
            "spam",
            "rules/10-test.yaml:2",
            False,
            "header X-Spam-Flag equals 'YES'"
            " or from domain any of ('spam.example', 'junk.example')",
        ),
        TrailEntry(
            "not-web",
            "rules/10-test.yaml:8",
            True,
            "subject matches '\\border\\b' and not (channel equals 'web')",
            "tags=order",
        ),
        TrailEntry(
            "catalogue",
            "rules/10-test.yaml:11",
            True,
            "subject contains 'Catalogue' (case-sensitive)",
            "group=Catalogue Support, priority=high, stop",
        ),
    )
    assert decision.matched_rules == ("not-web", "catalogue")
    assert decision.explain().splitlines()[2] == (
        "rules/10-test.yaml:11 catalogue: hit (subject contains 'Catalogue' (case-sensitive))"
        " -> group=Catalogue Support, priority=high, stop"
    )
    miss = rules.evaluate(facts(subject="Catalogue order", channel="web"))
    assert miss.trail[1] == TrailEntry(
        "not-web", "rules/10-test.yaml:8", False, "not (channel equals 'web')"
    )


def test_first_group_wins_and_stops(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: catalogue
            when: {subject: {contains: catalogue}}
            then: {group: "Catalogue Support"}
          - name: orders
            when: {subject: {contains: order}}
            then: {group: Orders, tags: [order]}
        """
    )
    decision = rules.evaluate(facts(subject="Catalogue order"))
    assert decision.group == "Catalogue Support"
    assert decision.tags == ()
    # The second rule was never evaluated, so it is not in the trail.
    assert [e.rule for e in decision.trail] == ["catalogue"]

    assert rules.evaluate(facts(subject="an order")).group == "Orders"
    nothing = rules.evaluate(facts(subject="hello"))
    assert (nothing.group, nothing.priority, nothing.type, nothing.tags) == (None, None, None, ())
    assert not nothing.drop and nothing.drop_rule is None
    assert [e.matched for e in nothing.trail] == [False, False]


def test_continue_keeps_group_and_collects_the_rest(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: catalogue
            when: {subject: {contains: catalogue}}
            then: {group: "Catalogue Support", continue: true}
          - name: order-tag
            when: {subject: {contains: order}}
            then: {tags: [order], priority: low}
          - name: orders
            when: {subject: {contains: order}}
            then: {group: Orders, priority: high, tags: [orders-team]}
          - name: never
            when: {subject: {contains: order}}
            then: {tags: [never]}
        """
    )
    decision = rules.evaluate(facts(subject="Catalogue order"))
    assert decision.group == "Catalogue Support"
    assert decision.priority == "low"
    # The later group rule matched: its group and priority are ignored, its tags
    # added, and (without continue) it ends evaluation.
    assert decision.tags == ("order", "orders-team")
    assert [e.rule for e in decision.trail] == ["catalogue", "order-tag", "orders"]
    assert decision.trail[2].effect == (
        "group=Orders ignored (already Catalogue Support), "
        "priority=high ignored (already low), tags=orders-team, stop"
    )


def test_rules_without_group_accumulate(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: urgent
            when: {subject: {contains: urgent}}
            then: {priority: high, tags: [urgent, a]}
          - name: typed
            when: {subject: {contains: urgent}}
            then: {type: incident, priority: low, tags: [b, a]}
          - name: retyped
            when: {subject: {contains: urgent}}
            then: {type: request, tags: urgent}
          - name: group
            when: {subject: {contains: urgent}}
            then: {group: "First Line", tags: [c]}
        """
    )
    decision = rules.evaluate(facts(subject="URGENT"))
    assert decision.group == "First Line"
    assert decision.priority == "high"
    assert decision.type == "incident"
    assert decision.tags == ("urgent", "a", "b", "c")
    assert decision.matched_rules == ("urgent", "typed", "retyped", "group")


def test_drop_ends_evaluation(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: tag
            when: {subject: {contains: win}}
            then: {tags: [suspicious]}
          - name: spam
            when: {header: {name: X-Spam-Flag, equals: "YES"}}
            then: {drop: true}
          - name: after
            when: {subject: {contains: win}}
            then: {group: Orders}
        """
    )
    spam = rules.evaluate(facts(subject="you win", headers=(("X-Spam-Flag", "YES"),)))
    assert spam.drop is True
    assert spam.drop_rule == "spam"
    assert spam.group is None
    assert [(e.rule, e.matched, e.effect) for e in spam.trail] == [
        ("tag", True, "tags=suspicious"),
        ("spam", True, "drop"),
    ]
    ham = rules.evaluate(facts(subject="you win"))
    assert (ham.drop, ham.group) == (False, "Orders")


def test_drop_after_a_continued_group(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: catalogue
            when: {subject: {contains: catalogue}}
            then: {group: "Catalogue Support", continue: true}
          - name: spam
            when: {from: {domain: spam.example}}
            then: {drop: true}
        """
    )
    decision = rules.evaluate(facts(subject="catalogue", sender="x@spam.example"))
    assert decision.drop and decision.drop_rule == "spam"


def test_stop_ends_evaluation(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(
        """
        rules:
          - name: trusted
            when: {from: {domain: partner.example}}
            then: {tags: [partner], stop: true}
          - name: spam
            when: {subject: {contains: offer}}
            then: {drop: true}
        """
    )
    partner = rules.evaluate(facts(subject="an offer", sender="a@partner.example"))
    assert (partner.drop, partner.tags) == (False, ("partner",))
    assert partner.trail[0].effect == "tags=partner, stop"
    assert len(partner.trail) == 1
    assert rules.evaluate(facts(subject="an offer")).drop


def test_files_are_evaluated_in_file_name_order(
    rules_dir: Path, write_rules: WriteRules, facts: MakeFacts
) -> None:
    for name, group in (("20-b.yaml", "Orders"), ("100-c.yaml", "First Line")):
        write_rules(
            name,
            f"""
            rules:
              - name: {name[:-5]}
                when: {{subject: {{contains: x}}}}
                then: {{group: "{group}", continue: true, tags: [{name[:-5]}]}}
            """,
        )
    write_rules(
        "10-a.yaml",
        """
        rules:
          - name: a1
            when: {subject: {contains: x}}
            then: {tags: [a1]}
          - name: a2
            when: {subject: {contains: x}}
            then: {group: "Catalogue Support", continue: true}
        """,
    )
    rules = load_rules(rules_dir, GROUPS)
    assert [p.name for p in rules.files] == ["10-a.yaml", "100-c.yaml", "20-b.yaml"]
    assert [r.name for r in rules.rules] == ["a1", "a2", "100-c", "20-b"]
    decision = rules.evaluate(facts(subject="x"))
    assert decision.group == "Catalogue Support"
    assert decision.tags == ("a1", "100-c", "20-b")
    assert [e.source for e in decision.trail] == [
        "rules/10-a.yaml:2",
        "rules/10-a.yaml:5",
        "rules/100-c.yaml:2",
        "rules/20-b.yaml:2",
    ]


def test_catastrophic_backtracking_pattern_is_linear(ruleset: LoadText, facts: MakeFacts) -> None:
    # With a backtracking engine this is 2**50000 steps; RE2 answers at once.
    rules = ruleset(one_rule("{body: {regex: '(a+)+$'}}"))
    assert not rules.evaluate(facts(body="a" * 50_000 + "b")).trail[0].matched
    assert rules.evaluate(facts(body="b" + "a" * 50_000)).trail[0].matched


def test_unencodable_text_does_not_break_routing(ruleset: LoadText, facts: MakeFacts) -> None:
    # A lone surrogate (a broken charset decoded with surrogateescape) cannot be UTF-8.
    rules = ruleset(one_rule("{body: {regex: 'caf.'}}"))
    assert rules.evaluate(facts(body="caf\udce9 au lait")).trail[0].matched


def test_unicode_regex_is_case_insensitive(ruleset: LoadText, facts: MakeFacts) -> None:
    rules = ruleset(one_rule("{subject: {regex: 'élève'}}"))
    assert rules.evaluate(facts(subject="ÉLÈVE")).trail[0].matched


def test_empty_rule_set(facts: MakeFacts) -> None:
    decision = RuleSet.empty().evaluate(facts())
    assert decision.group is None and not decision.drop and decision.trail == ()
    assert decision.explain() == "no rules"
    assert len(RuleSet.empty()) == 0


def test_facts_from_mail() -> None:
    mail = ParsedMail(
        subject="Catalogue",
        sender=Address("user@example.org", "User"),
        to=(Address("help@helpdesk.localhost"),),
        cc=(Address("x@example.org"),),
        reply_to=(),
        date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        message_id="a@b",
        in_reply_to=(),
        references=(),
        text="body",
        html=None,
        attachments=(),
        headers=(("Subject", "Catalogue"),),
    )
    facts = RoutingFacts.from_mail(mail, inbound="help@helpdesk.localhost")
    assert facts == RoutingFacts(
        subject="Catalogue",
        sender="user@example.org",
        to=("help@helpdesk.localhost",),
        cc=("x@example.org",),
        body="body",
        headers=(("Subject", "Catalogue"),),
        channel="email",
        inbound="help@helpdesk.localhost",
    )
