"""Loading rule files: what is accepted, and exact file:line: key: reason messages for the rest."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.routing import RuleError, RuleSet, load_rules, rule_files

LoadText = Callable[[str], RuleSet]
WriteRules = Callable[[str, str], Path]

GROUPS = frozenset({"First Line", "Catalogue Support", "Orders"})


def error_of(ruleset: LoadText, text: str) -> RuleError:
    with pytest.raises(RuleError) as info:
        ruleset(text)
    return info.value


VALID_HEAD = """
rules:
  - name: fine
    when: {subject: {contains: fine}}
    then: {tags: [fine]}
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            """
              - name: bad-regex
                when:
                  subject:
                    regex: "(a"
                then: {drop: true}
            """,
            "rules/10-test.yaml:8: rules[1].when.subject.regex: invalid regex: missing ): (a",
        ),
        (
            """
              - name: lookbehind
                when: {body: {regex: ['ok', '(?<=a)b']}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.body.regex[1]: "
            "invalid regex: invalid perl operator: (?<=",
        ),
        (
            """
              - name: unknown-field
                when:
                  sender: {contains: x}
                then: {drop: true}
            """,
            "rules/10-test.yaml:7: rules[1].when.sender: unknown key (expected one of: "
            "all, any, not, subject, from, to, cc, body, header, channel, inbound)",
        ),
        (
            """
              - name: unknown-operator
                when: {subject: {startswith: x}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.subject.startswith: unknown key "
            "(expected one of: contains, equals, regex, case_sensitive)",
        ),
        (
            """
              - name: domain-on-subject
                when: {subject: {domain: example.org}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.subject.domain: unknown key "
            "(expected one of: contains, equals, regex, case_sensitive)",
        ),
        (
            """
              - name: unknown-action
                when: {subject: {contains: x}}
                then: {queue: Orders}
            """,
            "rules/10-test.yaml:7: rules[1].then.queue: unknown key "
            "(expected one of: group, priority, type, tags, drop, continue, stop)",
        ),
        (
            """
              - name: unknown-rule-key
                when: {subject: {contains: x}}
                then: {drop: true}
                enabled: false
            """,
            "rules/10-test.yaml:8: rules[1].enabled: "
            "unknown key (expected one of: name, when, then)",
        ),
        (
            """
              - name: yes-is-not-true
                when: {subject: {contains: x}}
                then:
                  drop: yes
            """,
            "rules/10-test.yaml:8: rules[1].then.drop: expected true or false, got string 'yes'",
        ),
        (
            """
              - name: bad-priority
                when: {subject: {contains: x}}
                then: {priority: urgent}
            """,
            "rules/10-test.yaml:7: rules[1].then.priority: "
            "expected one of 'low', 'normal' or 'high', got string 'urgent'",
        ),
        (
            """
              - name: number-needle
                when: {subject: {contains: 42}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.subject.contains: "
            "expected a string or a list of strings, got integer 42",
        ),
        (
            """
              - name: 5
                when: {subject: {contains: x}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:5: rules[1].name: expected a string, got integer 5",
        ),
        (
            """
              - name: list-as-condition
                when: [{subject: {contains: x}}]
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when: expected a mapping, got a list",
        ),
        (
            """
              - {}
            """,
            "rules/10-test.yaml:5: rules[1].name: missing required key\n"
            "rules/10-test.yaml:5: rules[1].when: missing required key\n"
            "rules/10-test.yaml:5: rules[1].then: missing required key",
        ),
        (
            """
              - name: no-then
                when: {subject: {contains: x}}
            """,
            "rules/10-test.yaml:5: rules[1].then: missing required key",
        ),
        (
            """
              - name: "  "
                when: {subject: {contains: x}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:5: rules[1].name: must not be empty",
        ),
        (
            """
              - name: empty-condition
                when: {}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when: empty condition (expected at least one of: "
            "all, any, not, subject, from, to, cc, body, header, channel, inbound)",
        ),
        (
            """
              - name: empty-any
                when: {any: []}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.any: must not be empty",
        ),
        (
            """
              - name: empty-needle
                when: {subject: {contains: ""}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.subject.contains: must not be empty",
        ),
        (
            """
              - name: no-action
                when: {subject: {contains: x}}
                then: {continue: true}
            """,
            "rules/10-test.yaml:7: rules[1].then: "
            "no action (expected group, priority, type, tags, drop or stop)",
        ),
        (
            """
              - name: two-operators
                when: {subject: {contains: x, regex: y}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.subject: "
            "expected exactly one of contains, equals, regex, got contains, regex",
        ),
        (
            """
              - name: no-operator
                when: {subject: {case_sensitive: true}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.subject: "
            "expected exactly one of contains, equals, regex",
        ),
        (
            """
              - name: drop-and-group
                when: {subject: {contains: x}}
                then: {drop: true, group: Orders}
            """,
            "rules/10-test.yaml:7: rules[1].then: drop cannot be combined with group",
        ),
        (
            """
              - name: stop-and-continue
                when: {subject: {contains: x}}
                then: {group: Orders, stop: true, continue: true}
            """,
            "rules/10-test.yaml:7: rules[1].then: stop and continue contradict each other",
        ),
        (
            """
              - name: case-domain
                when: {from: {domain: x.example, case_sensitive: true}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.from: "
            "case_sensitive does not apply to address or domain",
        ),
        (
            """
              - name: bad-address
                when: {to: {address: [a@x.example, orders]}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.to.address[1]: "
            "expected a whole address such as 'help@example.org', got 'orders'",
        ),
        (
            """
              - name: bad-domain
                when: {from: {domain: "@spam.example"}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.from.domain: "
            "expected a domain such as 'example.org', got '@spam.example'",
        ),
        (
            """
              - name: bad-channel
                when: {channel: {equals: mail}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.channel.equals: "
            "unknown channel 'mail' (expected one of: email, telegram, web)",
        ),
        (
            """
              - name: header-without-name
                when: {header: {equals: x}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.header.name: missing required key",
        ),
        (
            """
              - name: bad-header-name
                when: {header: {name: "X-Spam Flag:", equals: x}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:6: rules[1].when.header.name: "
            "not a header field name: 'X-Spam Flag:'",
        ),
        (
            """
              - name: misspelt-group
                when: {subject: {contains: x}}
                then:
                  group: Catalog Support
            """,
            "rules/10-test.yaml:8: rules[1].then.group: "
            "unknown group 'Catalog Support' (did you mean 'Catalogue Support'?)",
        ),
        (
            """
              - name: unknown-group
                when: {subject: {contains: x}}
                then: {group: Finance}
            """,
            "rules/10-test.yaml:7: rules[1].then.group: unknown group 'Finance' "
            "(configured: 'Catalogue Support', 'First Line', 'Orders')",
        ),
        (
            """
              - name: fine
                when: {subject: {contains: x}}
                then: {drop: true}
            """,
            "rules/10-test.yaml:5: rules[1].name: "
            "duplicate rule name 'fine' (first defined at rules/10-test.yaml:2)",
        ),
        (
            """
              - name: nested
                when:
                  any:
                    - all:
                        - not:
                            from: {regex: "[z-a]"}
                then: {drop: true}
            """,
            "rules/10-test.yaml:10: rules[1].when.any[0].all[0].not.from.regex: "
            "invalid regex: invalid character class range: z-a",
        ),
    ],
)
def test_error_messages(ruleset: LoadText, body: str, message: str) -> None:
    rules = textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
    error = error_of(ruleset, VALID_HEAD.lstrip("\n") + rules + "\n")
    assert str(error) == message


def test_error_attributes(ruleset: LoadText) -> None:
    error = error_of(
        ruleset,
        """
        rules:
          - name: a
            when: {subject: {regex: "(a"}}
            then: {drop: true}
        """,
    )
    assert error.file == Path("rules/10-test.yaml")
    assert error.line == 3
    assert error.key == "rules[0].when.subject.regex"
    assert error.reason == "invalid regex: missing ): (a"
    assert error.more == ()


def test_several_problems_are_all_listed_in_line_order(ruleset: LoadText) -> None:
    error = error_of(
        ruleset,
        """
        rules:
          - name: a
            when: {subject: {regex: "(a"}}
            then: {drop: yes}
          - name: b
            when: {subject: {contains: x}}
            then: {group: Nowhere}
        """,
    )
    assert str(error).splitlines() == [
        "rules/10-test.yaml:3: rules[0].when.subject.regex: invalid regex: missing ): (a",
        "rules/10-test.yaml:4: rules[0].then.drop: expected true or false, got string 'yes'",
        "rules/10-test.yaml:7: rules[1].then.group: unknown group 'Nowhere' "
        "(configured: 'Catalogue Support', 'First Line', 'Orders')",
    ]
    assert error.line == 3


def test_duplicate_names_across_files(rules_dir: Path, write_rules: WriteRules) -> None:
    write_rules("10-a.yaml", VALID_HEAD)
    write_rules(
        "20-b.yaml",
        """
        # team b
        rules:
          - name: other
            when: {subject: {contains: x}}
            then: {drop: true}
          - when: {subject: {contains: x}}
            name: fine
            then: {drop: true}
        """,
    )
    with pytest.raises(RuleError) as info:
        load_rules(rules_dir, GROUPS)
    assert str(info.value) == (
        "rules/20-b.yaml:7: rules[1].name: duplicate rule name 'fine' "
        "(first defined at rules/10-a.yaml:2)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rules:\n  - name: a\n    when: [\n",
            "rules/10-test.yaml:4: invalid YAML: "
            "expected the node content, but found '<stream end>'",
        ),
        (
            "rules:\n\t- name: a\n",
            "rules/10-test.yaml:2: invalid YAML: found character '\\t' that cannot start any token",
        ),
        (
            "rules: []\nrules: []\n",
            "rules/10-test.yaml:2: invalid YAML: "
            'found duplicate key "rules" with value "[]" (original value: "[]")',
        ),
        ("", "rules/10-test.yaml: file is empty (expected a mapping with a 'rules' list)"),
        (
            "# nothing yet\n",
            "rules/10-test.yaml: file is empty (expected a mapping with a 'rules' list)",
        ),
        (
            "- name: a\n",
            "rules/10-test.yaml:1: expected a mapping with a 'rules' list, got a list",
        ),
        ("rules:\n", "rules/10-test.yaml:1: rules: expected a list, got null"),
        (
            "rule: []\n",
            "rules/10-test.yaml:1: rules: missing required key\n"
            "rules/10-test.yaml:1: rule: unknown key (expected one of: rules)",
        ),
        (
            "rules:\n  - name: a\n    when: {subject: {contains: x}}\n    then: {drop: true}\n"
            "    1: x\n",
            "rules/10-test.yaml:5: rules[0]: keys must be strings, got integer 1",
        ),
        (
            "---\nrules: []\n---\nrules: []\n",
            "rules/10-test.yaml:3: invalid YAML: "
            "expected a single document in the stream, but found another document",
        ),
    ],
)
def test_file_level_errors(ruleset: LoadText, text: str, message: str) -> None:
    assert str(error_of(ruleset, text)) == message


def test_alias_bomb_is_refused(ruleset: LoadText) -> None:
    layers = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    layers += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    text = "x:\n" + "\n".join("  " + layer for layer in layers) + "\nrules: []\n"
    error = error_of(ruleset, text)
    assert error.reason == "nested too deeply or too large"


def test_yaml_1_2_no_stays_a_string(ruleset: LoadText) -> None:
    rules = ruleset(
        """
        rules:
          - name: norway
            when: {header: {name: X-Country, equals: NO}}
            then: {tags: [NO, yes, off]}
        """
    )
    assert rules.rules[0].tags == ("NO", "yes", "off")


def test_anchors_and_aliases_may_share_conditions(ruleset: LoadText) -> None:
    rules = ruleset(
        """
        x-spam-senders: &spam {from: {domain: [spam.example, junk.example]}}
        rules:
          - name: spam
            when: *spam
            then: {drop: true}
        """
    )
    assert [r.name for r in rules.rules] == ["spam"]


def test_empty_list_is_a_valid_file(ruleset: LoadText) -> None:
    rules = ruleset("rules: []  # nothing yet\n")
    assert rules.rules == () and [p.name for p in rules.files] == ["10-test.yaml"]


def test_empty_directory_gives_empty_set(rules_dir: Path) -> None:
    assert load_rules(rules_dir, GROUPS) == RuleSet((), ())


def test_missing_directory_is_an_error(rules_dir: Path) -> None:
    # A typo in rules_dir must not quietly mean "no rules" (and so no spam drops).
    with pytest.raises(RuleError) as info:
        load_rules(Path("no-such-dir"), GROUPS)
    assert str(info.value) == "no-such-dir: no such directory (daemon.rules_dir)"


def test_rules_dir_that_is_a_file(rules_dir: Path) -> None:
    Path("file").write_text("x")
    with pytest.raises(RuleError) as info:
        load_rules(Path("file"), GROUPS)
    assert str(info.value) == "file: not a directory"


def test_which_files_are_rule_files(
    rules_dir: Path, write_rules: WriteRules, caplog: pytest.LogCaptureFixture
) -> None:
    write_rules("10-a.yaml", "rules: []\n")
    write_rules(".#10-a.yaml", "broken: [")
    write_rules("20-b.yml", "broken: [")
    write_rules("README.md", "# notes")
    assert [p.name for p in rule_files(rules_dir)] == ["10-a.yaml"]
    with caplog.at_level(logging.WARNING, logger="gateway.routing.loader"):
        rules = load_rules(rules_dir, GROUPS)
    assert [p.name for p in rules.files] == ["10-a.yaml"]
    assert "ignoring rules/20-b.yml: rule files must be named *.yaml" in caplog.messages


@pytest.mark.parametrize("kind", ["dangling symlink", "directory"])
def test_a_rule_file_that_cannot_be_read_is_an_error(
    rules_dir: Path, write_rules: WriteRules, kind: str
) -> None:
    write_rules("10-a.yaml", "rules: []\n")
    if kind == "directory":
        (rules_dir / "20-b.yaml").mkdir()
    else:
        (rules_dir / "20-b.yaml").symlink_to(rules_dir / "gone.yaml")
    with pytest.raises(RuleError) as info:
        load_rules(rules_dir, GROUPS)
    assert str(info.value) == "rules/20-b.yaml: not a readable file"


def test_unreadable_text(rules_dir: Path) -> None:
    (rules_dir / "10-latin1.yaml").write_bytes(b"rules: []\n# caf\xe9\n")
    with pytest.raises(RuleError) as info:
        load_rules(rules_dir, GROUPS)
    assert str(info.value) == "rules/10-latin1.yaml: not UTF-8 text (byte 15)"
    assert info.value.line is None and info.value.key is None


def test_rule_sources_and_compiled_actions(ruleset: LoadText) -> None:
    rules = ruleset(
        """
        rules:
          # a comment line

          - name: "  padded  "
            when: {subject: {contains: x}}
            then: {group: Orders, priority: low, type: " request ", tags: [a, b, a]}
        """
    )
    (rule,) = rules.rules
    assert rule.name == "padded"
    assert rule.source == "rules/10-test.yaml:4"
    assert (rule.group, rule.priority, rule.type, rule.tags) == (
        "Orders",
        "low",
        "request",
        ("a", "b"),
    )
