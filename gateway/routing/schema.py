"""The shape of a routing rule file: pydantic models of what an admin may write.

A rule file is `{rules: [rule, ...]}`; a rule is `{name, when, then}`. `when` is a
condition: a mapping whose keys are all required to hold (an implicit "all"),
each key either a field test (`subject: {contains: ...}`) or a combinator
(`all: [...]`, `any: [...]`, `not: {...}`). `then` is the action.

Validation is strict (YAML `5` is not a string, `yes` is not a boolean), refuses
unknown keys, compiles every regex with RE2 and checks group names against the
configured groups, which the loader passes in the validation context under
`group_names`. The models only describe and check; `engine` compiles them into
matchers and `loader` turns validation errors into messages with file and line.
"""

from __future__ import annotations

import datetime as dt
import difflib
from typing import Annotated, Any, ClassVar, Literal

import re2
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.message import Channel

# The context key under which the loader passes the configured group names.
GROUP_NAMES_CONTEXT = "group_names"
CHANNELS: tuple[str, ...] = tuple(channel.value for channel in Channel)


def regex_options(*, case_sensitive: bool) -> re2.Options:
    """RE2 options for an admin regex: case as asked, no captures (we only test)."""
    options = re2.Options()
    options.case_sensitive = case_sensitive
    # Matching only needs a yes/no; without captures RE2 can stay on its DFA.
    options.never_capture = True
    # A bad pattern is reported as a RuleError; RE2 need not also print it to stderr.
    options.log_errors = False
    return options


def compile_regex(pattern: str, *, case_sensitive: bool) -> Any:
    """Compile an admin regex with RE2 (linear-time matching: no ReDoS).

    Raises ValueError with RE2's reason (e.g. "missing ): (a") if it is invalid.
    """
    try:
        return re2.compile(pattern, regex_options(case_sensitive=case_sensitive))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "unknown error"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"invalid regex: {reason}") from None


def _check_regex(pattern: str) -> str:
    # Case sensitivity does not change what is valid syntax.
    compile_regex(pattern, case_sensitive=True)
    return pattern


def _check_address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(ch.isspace() for ch in value):
        raise ValueError(f"expected a whole address such as 'help@example.org', got '{value}'")
    return value


def _check_domain(value: str) -> str:
    if "@" in value or not value or any(ch.isspace() for ch in value):
        raise ValueError(f"expected a domain such as 'example.org', got '{value}'")
    return value


def _check_header_name(value: str) -> str:
    # RFC 5322 section 3.6.8: a field name is printable US-ASCII except ':'.
    if not value or any(not 33 <= ord(ch) <= 126 or ch == ":" for ch in value):
        raise ValueError(f"not a header field name: '{value}'")
    return value


def _check_channel(value: str) -> str:
    if value not in CHANNELS:
        raise ValueError(f"unknown channel '{value}' (expected one of: {', '.join(CHANNELS)})")
    return value


def describe_value(value: Any) -> str:
    """A YAML value as an admin would name it: "string 'yes'", "integer 5", "a list"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string '{value}'"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, dt.date):
        return f"date {value.isoformat()}"
    return type(value).__name__


def _one_or_many(value: Any) -> Any:
    """Let an operator take one string or a list of them (any of them may match)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a string or a list of strings, got {describe_value(value)}")
    return value


# Names shown in logs and trails, tags and types: surrounding blanks are noise.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# Needles are taken verbatim: " order " with its spaces is a deliberate choice.
Needle = Annotated[str, StringConstraints(min_length=1)]
Regex = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_regex)]
AddressValue = Annotated[str, AfterValidator(_check_address)]
DomainValue = Annotated[str, AfterValidator(_check_domain)]
ChannelValue = Annotated[str, AfterValidator(_check_channel)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]


# Each operator takes one string or a non-empty list of them (any may match); the
# list is spelt out per type so error paths never show a union's branches.
_OneOrMany = BeforeValidator(_one_or_many)
Needles = Annotated[list[Needle], _OneOrMany, Field(min_length=1)]
Equals = Annotated[list[str], _OneOrMany, Field(min_length=1)]
Regexes = Annotated[list[Regex], _OneOrMany, Field(min_length=1)]
Addresses = Annotated[list[AddressValue], _OneOrMany, Field(min_length=1)]
Domains = Annotated[list[DomainValue], _OneOrMany, Field(min_length=1)]
Channels = Annotated[list[ChannelValue], _OneOrMany, Field(min_length=1)]
Tags = Annotated[list[Name], _OneOrMany]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextTest(_Spec):
    """A test of a text field: exactly one operator, each a string or a list of them.

    `contains` is a substring test, `equals` a whole-value test, `regex` an RE2
    search; all are case-insensitive unless `case_sensitive: true`.
    """

    OPERATORS: ClassVar[tuple[str, ...]] = ("contains", "equals", "regex")

    contains: Needles | None = None
    equals: Equals | None = None
    regex: Regexes | None = None
    case_sensitive: bool = False

    def operator(self) -> tuple[str, list[str]]:
        """The one operator given, and its values."""
        for op in self.OPERATORS:
            values = getattr(self, op)
            if values is not None:
                return op, values
        raise AssertionError("validated model has no operator")  # pragma: no cover

    @model_validator(mode="after")
    def _exactly_one_operator(self) -> TextTest:
        given = [op for op in self.OPERATORS if getattr(self, op) is not None]
        if len(given) != 1:
            expected = ", ".join(self.OPERATORS)
            found = f", got {', '.join(given)}" if given else ""
            raise ValueError(f"expected exactly one of {expected}{found}")
        return self


class AddressTest(TextTest):
    """A test of an address field; adds `address` and `domain`, exact and case-insensitive."""

    OPERATORS: ClassVar[tuple[str, ...]] = ("contains", "equals", "regex", "address", "domain")

    address: Addresses | None = None
    domain: Domains | None = None

    @model_validator(mode="after")
    def _case_applies(self) -> AddressTest:
        if self.case_sensitive and (self.address is not None or self.domain is not None):
            # B3: addresses and domains always compare case-insensitively.
            raise ValueError("case_sensitive does not apply to address or domain")
        return self


class HeaderTest(TextTest):
    """A test of every value of one header (name case-insensitive)."""

    name: HeaderName


class ChannelTest(_Spec):
    """A test of the channel the message came in on."""

    equals: Channels


class Condition(_Spec):
    """A condition: every key given must hold. Lists (to, cc, headers) match if any element does."""

    all_: Annotated[list[Condition], Field(min_length=1)] | None = Field(None, alias="all")
    any_: Annotated[list[Condition], Field(min_length=1)] | None = Field(None, alias="any")
    not_: Condition | None = Field(None, alias="not")
    subject: TextTest | None = None
    from_: AddressTest | None = Field(None, alias="from")
    to: AddressTest | None = None
    cc: AddressTest | None = None
    body: TextTest | None = None
    header: HeaderTest | None = None
    channel: ChannelTest | None = None
    inbound: AddressTest | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            keys = ", ".join(f.alias or n for n, f in type(self).model_fields.items())
            raise ValueError(f"empty condition (expected at least one of: {keys})")
        return self


class Action(_Spec):
    """What a matching rule does."""

    group: Name | None = None
    priority: Literal["low", "normal", "high"] | None = None
    type: Name | None = None
    tags: Tags = Field(default_factory=list)
    drop: bool = False
    continue_: bool = Field(False, alias="continue")
    stop: bool = False

    @field_validator("group")
    @classmethod
    def _known_group(cls, value: str | None, info: ValidationInfo) -> str | None:
        context = info.context or {}
        groups: frozenset[str] | None = context.get(GROUP_NAMES_CONTEXT)
        if value is None or groups is None or value in groups:
            return value
        close = difflib.get_close_matches(value, sorted(groups), n=1)
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif len(groups) <= 10:
            hint = "configured: " + (", ".join(f"'{g}'" for g in sorted(groups)) or "none")
        else:
            hint = "not among the configured groups"
        raise ValueError(f"unknown group '{value}' ({hint})")

    @model_validator(mode="after")
    def _coherent(self) -> Action:
        sets = [
            key
            for key, given in (
                ("group", self.group is not None),
                ("priority", self.priority is not None),
                ("type", self.type is not None),
                ("tags", bool(self.tags)),
            )
            if given
        ]
        if self.drop and (sets or self.continue_):
            others = ", ".join([*sets, *(["continue"] if self.continue_ else [])])
            raise ValueError(f"drop cannot be combined with {others}")
        if self.stop and self.continue_:
            raise ValueError("stop and continue contradict each other")
        if not (sets or self.drop or self.stop):
            raise ValueError("no action (expected group, priority, type, tags, drop or stop)")
        return self


class RuleSpec(_Spec):
    """One rule as written: a unique name, a condition and an action."""

    name: Name
    when: Condition
    then: Action


class RuleFile(_Spec):
    """One rule file. `rules: []` is a valid placeholder; a missing list is not.

    Top-level keys starting with `x-` are ignored, so a file can hold YAML
    anchors to share conditions (`x-spam: &spam {...}` ... `when: *spam`).
    """

    rules: list[RuleSpec]

    @model_validator(mode="before")
    @classmethod
    def _drop_extensions(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not str(k).startswith("x-")}
        return data
