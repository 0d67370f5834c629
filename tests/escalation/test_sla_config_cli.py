"""Escalation configuration (validated with key paths) and its CLI commands.

The CLI runs on a copy of the shipped ``helpdeskd.toml``, whose commented demo
``[calendars.*]``/``[sla.*]`` setup must therefore keep working.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import time_machine
from sla_helpers import agent_reply, berlin, customer_mail

from gateway import commands
from gateway.cli import DEFAULTS, main
from gateway.config import ConfigError, Settings, load_settings, parse_settings
from gateway.daemon import App
from gateway.escalation.settings import PRIORITIES

# --- validation --------------------------------------------------------------------------


def problems(settings: Settings, **changes: Any) -> str:
    data = settings.model_dump()
    groups = {g["name"]: g for g in data["groups"]}
    for name, keys in changes.pop("groups", {}).items():
        groups[name].update(keys)
    data.update(changes)
    with pytest.raises(ConfigError) as info:
        parse_settings(data, environ={})
    return str(info.value)


BERLIN_CAL = {"berlin": {"timezone": "Europe/Berlin", "country": "DE"}}


def test_references_are_checked_with_key_paths(settings: Settings) -> None:
    text = problems(
        settings, calendars=BERLIN_CAL,
        sla={"std": {"calendar": "paris", "first_response": "4h"}},
        escalation={"default_sla": "gold"},
        major_incidents={"sla": "major"},
        groups={"First Line": {"calendar": "rome", "sla": "silver",
                               "sla_by_priority": {"urgent": "std"}}},
    )
    for line in (
        "escalation.default_sla: no [sla.gold] table (SLAs: std)",
        "major_incidents.sla: no [sla.major] table",
        "sla.std.calendar: no [calendars.paris] table (calendars: berlin)",
        "groups.0 (First Line).calendar: no [calendars.rome] table",
        "groups.0 (First Line).sla: no [sla.silver] table",
        "groups.0 (First Line).sla_by_priority: 'urgent' is no priority",
    ):
        assert line in text, text
    # One problem per line, under the file name.
    assert text.count("\n  ") >= 6


def test_field_errors_name_the_key(settings: Settings) -> None:
    text = problems(settings, calendars=BERLIN_CAL, sla={"std": {
        "calendar": "berlin", "first_response": "4 days", "warning_share": 1.0, "colour": 1}})
    assert "sla.std.first_response: '4 days' is not a target" in text
    assert "sla.std.warning_share: Input should be less than 1" in text
    assert "sla.std.colour: unknown key" in text
    text = problems(settings, calendars={"x": {"timezone": "Europe/Nowhere"}})
    assert "calendars.x.timezone: unknown IANA time zone" in text
    text = problems(settings, groups={"Orders": {"leads": ["not-an-address"]}})
    assert "groups.2.leads" in text
    text = problems(settings, sla={"empty": {}})
    assert "sla.empty: an SLA needs at least one of" in text


def test_a_calendar_never_open_again_is_refused(settings: Settings) -> None:
    # Valid tables, but no business hour from today on: every ticket change would end
    # in an sla-error event without deadlines.
    for table in ({"closures": ["2020-01-01..2099-12-31"]},
                  {"hours": {}, "open_days": ["2020-01-06 09:00-17:00"]}):
        text = problems(settings, calendars={"berlin": BERLIN_CAL["berlin"] | table})
        assert "calendars.berlin: never open again: no business hours in the 1830 days" in text
    # An open day ahead is business time: accepted.
    ahead = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    parse_settings(settings.model_dump() | {"calendars": {"berlin": {
        "timezone": "Europe/Berlin", "hours": {}, "open_days": [f"{ahead} 09:00-17:00"]}}},
        environ={})


def test_an_sla_without_a_calendar_needs_one_from_somewhere(settings: Settings) -> None:
    text = problems(settings, calendars=BERLIN_CAL, sla={"std": {"first_response": 60}},
                    groups={"First Line": {"sla": "std", "calendar": "berlin"}})
    assert "sla.std: sets no calendar" in text and "'Catalogue Support', 'Orders'" in text
    data = settings.model_dump()
    data.update(calendars=BERLIN_CAL, sla={"std": {"first_response": 60}},
                escalation={"default_calendar": "berlin"})
    assert parse_settings(data, environ={}).sla["std"].first_response == "60m"


def test_escalation_cycles_are_refused(settings: Settings) -> None:
    text = problems(settings, groups={"First Line": {"escalate_to": "Orders"},
                                      "Orders": {"escalate_to": "Catalogue Support"},
                                      "Catalogue Support": {"escalate_to": "First Line"}})
    assert "escalate_to forms a cycle: First Line -> Orders -> Catalogue Support -> First Line" \
        in text


def test_priorities_match_the_commands() -> None:
    assert PRIORITIES == commands.PRIORITIES
    assert "major" in commands.COMMANDS
    assert commands.check(commands.split_block("#major now\n").commands, None) == [  # type: ignore[arg-type]
        "#major now: #major takes no argument"]


# --- the CLI on the shipped configuration ---------------------------------------------------


@pytest.fixture
def shipped(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "helpdeskd.toml"
    shutil.copyfile(DEFAULTS / "helpdeskd.toml", config)
    shutil.copytree(DEFAULTS / "rules", tmp_path / "rules")
    monkeypatch.setenv("HELPDESKD_DATABASE_URL", db_url)
    return config


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out + err


def test_calendar_show(shipped: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(capsys, "calendar", "show", "berlin", "--config", str(shipped),
                    "--from", "2024-03-28", "--days", "6", "--json")
    assert code == 0
    view = json.loads(out)
    assert [h["name"] for h in view["holidays"]] == ["Karfreitag", "Ostermontag"]
    assert view["dates"][0]["hours"] == ["09:00-12:00", "13:00-17:00"]
    assert view["business_minutes"] == 420 + 420  # Thursday and Tuesday
    code, out = cli(capsys, "calendar", "show", "berlin", "--config", str(shipped),
                    "--from", "2024-03-28", "--days", "6")
    assert "2024-03-29 fri  closed" in out and "holiday: Karfreitag" in out
    assert "holidays skipped:" in out
    code, out = cli(capsys, "calendar", "show", "paris", "--config", str(shipped))
    assert code == 1 and "no calendar 'paris' (calendars: berlin)" in out


def test_check_refuses_a_target_beyond_a_year(
    shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = shipped.read_text().splitlines()
    index = lines.index('solution = "5wd"')
    lines[index] = 'solution = "99999999wd"'
    shipped.write_text("\n".join(lines) + "\n")
    code, out = cli(capsys, "--config", str(shipped), "check")
    assert code != 0
    assert (f"helpdeskd.toml:{index + 1}: sla.first-line.solution: a target must be at most"
            " 260 working days (a year), got 99999999") in out


@pytest.mark.parametrize(("days", "message"), [
    ("-1", "-1 is out of range: 0 to 3660 days"),
    ("99999999", "99999999 is out of range"),
    ("two", "'two' is not a whole number of days"),
])
def test_calendar_show_refuses_a_bad_day_count(
    shipped: Path, capsys: pytest.CaptureFixture[str], days: str, message: str
) -> None:
    # A usage error (exit 2) naming the option, not a traceback from describe_days.
    with pytest.raises(SystemExit) as exited:
        main(["calendar", "show", "berlin", "--config", str(shipped), f"--days={days}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --days: {message}" in err and "Traceback" not in err


def test_check_names_the_line_of_a_calendar_never_open_again(
    shipped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = shipped.read_text().splitlines()
    lines[lines.index('closures = ["12-24", "12-31"]')] = 'closures = ["2020-01-01..2099-12-31"]'
    shipped.write_text("\n".join(lines) + "\n")
    code, out = cli(capsys, "--config", str(shipped), "check")
    assert code != 0
    table = lines.index("[calendars.berlin]") + 1
    assert f"helpdeskd.toml:{table}: calendars.berlin: never open again" in out


def test_sla_explain_stats_and_incidents(
    shipped: Path, capsys: pytest.CaptureFixture[str], clock: Any
) -> None:
    settings = load_settings(shipped)
    clock.now = berlin(2026, 11, 23, 9, 0)
    app = App(settings, clock=clock)
    try:
        number = customer_mail(app, to="help@helpdesk.localhost").ticket
        assert number is not None
        clock.now = berlin(2026, 11, 23, 14, 0)  # 4 business hours (with lunch) are 14:00
        app.sla.fire_due(clock.now)
        clock.now = berlin(2026, 11, 23, 14, 5)
        agent_reply(app, number, "#major\n#note\n\nbig", agent="bob@agents.localhost",
                    inbound="help@helpdesk.localhost")
        agent_reply(app, number, "#close\n\nfixed", agent="bob@agents.localhost",
                    inbound="help@helpdesk.localhost")
    finally:
        app.engine.dispose()

    with time_machine.travel(berlin(2026, 11, 23, 15, 0), tick=False):
        code, out = cli(capsys, "sla", "explain", f"[Ticket#{number}]", "--config", str(shipped),
                        "--json")
        assert code == 0, out
        data = json.loads(out)
        assert data["sla"] == "major" and data["group"] == "Catalogue Support"
        assert data["escalation_level"] == 1 and data["state"] == "closed"
        # The closing reply was public: the first response, 5 minutes after the move.
        assert [c["status"] for c in data["clocks"]] == ["met", "stopped"]
        code, out = cli(capsys, "sla", "explain", number, "--config", str(shipped))
        assert "SLA major (major incident), calendar berlin (Europe/Berlin)" in out
        assert "first response: met" in out

        code, out = cli(capsys, "sla", "stats", "--config", str(shipped), "--json")
        stats = json.loads(out)
        assert stats["counts"]["sla-breach"] == 1 and stats["counts"]["escalated"] == 1
        assert stats["counts"]["major-incident"] == 1
        assert stats["counts"]["incident-review"] == 1
        assert stats["breaches_by_clock"] == {"first_response": 1}
        code, out = cli(capsys, "sla", "stats", "--config", str(shipped), "--prometheus")
        assert 'helpdeskd_sla_events_total{kind="sla-breach"} 1' in out
        code, out = cli(capsys, "sla", "stats", "--config", str(shipped))
        assert "sla-breach" in out and "open tickets 0" in out

    code, out = cli(capsys, "incidents", "list", "--config", str(shipped), "--json")
    [incident] = json.loads(out)
    assert incident["ticket"] == number and len(incident["reviews"]) == 1
    code, out = cli(capsys, "incidents", "review", number, "--config", str(shipped))
    assert code == 0 and f"review #{incident['reviews'][0]} of {number}" in out
    assert "sla-breach" in out and "major-incident" in out and "command:close" in out
    code, out = cli(capsys, "tickets", "show", number, "--config", str(shipped), "--json")
    detail = json.loads(out)
    assert detail["sla"] == "major" and detail["major_at"] is not None
