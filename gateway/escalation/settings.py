"""The escalation part of helpdeskd.toml: ``[sla.<name>]``, ``[escalation]``, ``[major_incidents]``.

This module's sole purpose is to describe and check those tables; `gateway.config`
mounts them next to ``[calendars.<name>]`` (`CalendarSettings`) and the per-group
keys, and calls `reference_problems` so that a name that points nowhere is refused
at load with its key path. See ``docs/escalation.md`` for the whole picture::

    [calendars.berlin]
    timezone = "Europe/Berlin"
    country = "DE"
    subdivision = "BE"

    [sla.standard]
    calendar = "berlin"        # optional: else the group's calendar, else the default
    first_response = "4h"      # 240, "240m", "4h", "2wd", "2 working days"; <= 8760h, 260wd
    update = "1wd"
    solution = "5wd"
    warning_share = 0.75       # warn at 75% of each target; 0 disables warnings

    [escalation]
    default_calendar = "berlin"
    default_sla = "standard"
    sweep_seconds = 300

    [major_incidents]
    sla = "major"
    notify = ["incident-team@example.org"]
    tag = "major-incident"     # a routing rule adding this tag declares a major incident
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Final, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from gateway.escalation.sla import parse_target

__all__ = [
    "PRIORITIES",
    "SLA_TAG_PREFIX",
    "EscalationSettings",
    "MajorIncidentSettings",
    "SlaSettings",
    "TargetText",
    "reference_problems",
]

#: Ticket priorities, lowest first; raising a priority moves one step right.
#: Must equal `gateway.commands.PRIORITIES` (a test checks it).
PRIORITIES: Final[tuple[str, ...]] = ("low", "normal", "high")
#: A routing rule tag ``sla:<name>`` selects ``[sla.<name>]`` for a new ticket.
SLA_TAG_PREFIX: Final = "sla:"


def _target_text(value: Any) -> Any:
    if isinstance(value, int | str):
        return parse_target(value).text
    return value


#: A target as written in the file, normalised to ``240m`` / ``3wd``.
TargetText = Annotated[str, BeforeValidator(_target_text)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlaSettings(_Section):
    """One ``[sla.<name>]`` table: targets in business time and the warning share."""

    calendar: str | None = None
    first_response: TargetText | None = None
    update: TargetText | None = None
    solution: TargetText | None = None
    warning_share: float = Field(default=0.75, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _some_target(self) -> SlaSettings:
        if self.first_response is None and self.update is None and self.solution is None:
            raise ValueError("an SLA needs at least one of first_response, update, solution")
        return self

    def targets(self) -> dict[str, str]:
        """Clock name -> target text, for the targets this SLA sets."""
        pairs = (("first_response", self.first_response), ("update", self.update),
                 ("solution", self.solution))
        return {name: text for name, text in pairs if text is not None}


class EscalationSettings(_Section):
    """``[escalation]``: defaults and the scheduler's safety-net sweep."""

    #: Off: no timer, no sweep, no firing (deadlines are still computed and shown).
    enabled: bool = True
    default_calendar: str | None = None
    default_sla: str | None = None
    #: The periodic sweep that catches what the timer missed (another daemon's commits).
    sweep_seconds: float = Field(default=300.0, ge=1.0)
    #: Tickets claimed per transaction when firing.
    batch_size: int = Field(default=200, ge=1, le=10_000)


def _addresses(value: Any) -> Any:
    if isinstance(value, list | tuple):
        out = []
        for item in value:
            text = str(item).strip().lower()
            if text.count("@") != 1 or not all(text.split("@")):
                raise ValueError(f"not an email address: {item!r}")
            out.append(text)
        return tuple(out)
    return value


Addresses = Annotated[tuple[str, ...], BeforeValidator(_addresses)]


class MajorIncidentSettings(_Section):
    """``[major_incidents]``: the tighter SLA, who is told at once, the rule tag."""

    sla: str | None = None
    notify: Addresses = ()
    tag: str = Field(default="major-incident", min_length=1)


class _Group(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def calendar(self) -> str | None: ...
    @property
    def sla(self) -> str | None: ...
    @property
    def sla_by_priority(self) -> Mapping[str, str]: ...
    @property
    def escalate_to(self) -> str | None: ...


def reference_problems(
    groups: Sequence[_Group],
    calendars: Iterable[str],
    slas: Mapping[str, SlaSettings],
    escalation: EscalationSettings,
    major: MajorIncidentSettings,
) -> list[str]:
    """Every name that points nowhere, as ``key.path: problem`` lines (empty: all fine)."""
    problems: list[str] = []
    known_calendars = sorted(calendars)
    cal_list = ", ".join(known_calendars) or "none defined"
    sla_list = ", ".join(sorted(slas)) or "none defined"

    def calendar(path: str, name: str | None) -> None:
        if name is not None and name not in known_calendars:
            problems.append(f"{path}: no [calendars.{name}] table (calendars: {cal_list})")

    def sla(path: str, name: str | None) -> None:
        if name is not None and name not in slas:
            problems.append(f"{path}: no [sla.{name}] table (SLAs: {sla_list})")

    calendar("escalation.default_calendar", escalation.default_calendar)
    sla("escalation.default_sla", escalation.default_sla)
    sla("major_incidents.sla", major.sla)
    for name, table in slas.items():
        calendar(f"sla.{name}.calendar", table.calendar)
    for index, group in enumerate(groups):
        where = f"groups.{index} ({group.name})"
        calendar(f"{where}.calendar", group.calendar)
        sla(f"{where}.sla", group.sla)
        for priority, name in group.sla_by_priority.items():
            if priority not in PRIORITIES:
                problems.append(f"{where}.sla_by_priority: {priority!r} is no priority"
                                f" (priorities: {', '.join(PRIORITIES)})")
            sla(f"{where}.sla_by_priority.{priority}", name)
    # An SLA without its own calendar counts in the group's: every group must have one.
    if escalation.default_calendar is None:
        floating = sorted(name for name, table in slas.items() if table.calendar is None)
        bare = [g.name for g in groups if g.calendar is None]
        if floating and bare:
            problems.append(
                f"sla.{floating[0]}: sets no calendar, and neither do escalation.default_calendar"
                f" nor group(s) {', '.join(map(repr, bare))}; say which business hours count"
            )
    problems.extend(_escalation_cycles(groups))
    return problems


def _escalation_cycles(groups: Sequence[_Group]) -> list[str]:
    """escalate_to chains must end: L1 -> L2 -> L1 would bounce a ticket forever."""
    following = {g.name: g.escalate_to for g in groups}
    problems: list[str] = []
    reported: set[str] = set()
    for start in following:
        path = [start]
        seen = {start}
        nxt = following.get(start)
        while nxt is not None and nxt in following:
            if nxt in seen:
                loop = [*path[path.index(nxt):], nxt]
                if not reported & set(loop):
                    problems.append("groups: escalate_to forms a cycle: " + " -> ".join(loop))
                    reported |= set(loop)
                break
            path.append(nxt)
            seen.add(nxt)
            nxt = following.get(nxt)
    return problems
