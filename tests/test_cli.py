"""The `helpdeskd` command line: init, check, rules explain, tickets, quarantine, outbox, run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support.mailer import make_mail, send
from support.sink import free_port

from gateway.cli import main
from gateway.config import Settings
from gateway.daemon import App
from gateway.message import Channel, Inbound


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    """Serialise the demo config dict as TOML (only what demo_config produces)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
        else:
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {value(v)}" for k, v in item.items()]
        lines.append("")
    path = tmp_path / "helpdeskd.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    from support.app import demo_config

    return write_config(tmp_path, demo_config(tmp_path, db_url))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def ingest(config: Path, raw: bytes, rcpt: str = "help@helpdesk.test") -> Any:
    from gateway.config import load_settings

    app = App(load_settings(config, environ={}))
    import datetime as dt

    result = app.intake.ingest_now(Inbound(Channel.EMAIL, raw, dt.datetime.now(dt.UTC), "test",
                                           "dana@users.test", (rcpt,)))
    app.engine.dispose()
    return result


def test_init_writes_a_working_setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "site"
    code, out, _ = run_cli(capsys, "init", str(target))
    assert code == 0
    assert (target / "helpdeskd.toml").exists()
    assert list((target / "rules").glob("*.yaml"))
    assert (target / "var" / "helpdeskd.sqlite3").exists()
    code, out, err = run_cli(capsys, "check", "--config", str(target / "helpdeskd.toml"))
    assert code == 0, err
    assert "configuration OK" in out
    # Refuses to overwrite without --force.
    code, _, err = run_cli(capsys, "init", str(target))
    assert code == 1 and "--force" in err


def test_check_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nname = "x"\n\n[smtp]\nprot = 25\nport = "many"\n')
    code, _, err = run_cli(capsys, "check", "--config", str(bad))
    assert code == 1
    assert f"{bad}:5: smtp.prot: unknown key" in err
    assert f"{bad}:6: smtp.port:" in err


def test_check_reports_bad_rules(config: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rules" / "20-bad.yaml").write_text(
        "rules:\n  - name: broken\n    when: {subject: {regex: '(a'}}\n    then: {group: X}\n")
    code, _, err = run_cli(capsys, "check", "--config", str(config))
    assert code == 1
    assert "20-bad.yaml:3" in err and "regex" in err


def test_config_from_environment_variable(config: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELPDESKD_CONFIG", str(config))
    code, out, _ = run_cli(capsys, "check")
    assert code == 0 and "3 group(s)" in out


def test_rules_explain(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail("Catalogue is urgent"))
    code, out, _ = run_cli(capsys, "rules", "explain", "--config", str(config), str(eml))
    assert code == 0
    assert "HIT  catalogue" in out and "group Catalogue Support" in out
    code, out, _ = run_cli(capsys, "rules", "explain", "--json", "--config", str(config),
                           str(eml))
    data = json.loads(out)
    # The group rule comes first and ends evaluation: the later priority rule is not reached.
    assert data["group"] == "Catalogue Support" and data["priority"] == "normal"
    assert [(t["rule"], t["matched"]) for t in data["trail"]] == [("catalogue", True)]


def test_rules_explain_takes_the_inbound_address_from_the_envelope(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """B2 as in the daemon: the envelope decides, not the To header."""
    eml = tmp_path / "m.eml"
    eml.write_bytes(make_mail("Question", to="help@helpdesk.test"))
    explain = ("rules", "explain", "--json", "--config", str(config), str(eml))
    data = json.loads(run_cli(capsys, *explain, "--rcpt", "catalogue@helpdesk.test")[1])
    assert (data["inbound"], data["inbound_source"]) == ("catalogue@helpdesk.test", "--rcpt")
    assert data["group"] == "Catalogue Support"
    eml.write_bytes(b"Delivered-To: catalogue@helpdesk.test\r\n" + eml.read_bytes())
    data = json.loads(run_cli(capsys, *explain)[1])
    assert (data["inbound"], data["group"]) == ("catalogue@helpdesk.test", "Catalogue Support")
    ingest(config, eml.read_bytes(), rcpt="catalogue@helpdesk.test")
    code, out, _ = run_cli(capsys, "tickets", "list", "--json", "--config", str(config))
    assert [t["group"] for t in json.loads(out)] == ["Catalogue Support"]


def test_operational_errors_are_one_line_not_a_traceback(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(capsys, "rules", "explain", "--config", str(config), "nope.eml")
    assert (code, out) == (1, "")
    assert err == "helpdeskd: [Errno 2] No such file or directory: 'nope.eml'\n"
    # Nothing listens on port 1; the password never reaches the message.
    monkeypatch.setenv("HELPDESKD_DATABASE_URL", "postgresql://u:sekrit@127.0.0.1:1/x")
    code, out, err = run_cli(capsys, "tickets", "list", "--config", str(config))
    assert code == 1 and err.startswith("helpdeskd: database error: ")
    assert err.count("\n") == 1 and "sekrit" not in err


def test_reading_commands_leave_no_files_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Embedded defaults in an empty directory: nothing to check against is created.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HELPDESKD_CONFIG", raising=False)
    for command in (["check"], ["calendar", "show", "berlin"]):
        assert run_cli(capsys, *command)[0] == 0
    code, out, err = run_cli(capsys, "tickets", "list")
    assert (code, out) == (1, "")
    assert err.startswith(f"helpdeskd: no database at {tmp_path / 'var' / 'helpdeskd.sqlite3'}")
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_url_with_options_names_an_existing_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from support.app import demo_config

    url = f"sqlite:///{tmp_path / 'helpdeskd.sqlite3'}?timeout=30"
    config = write_config(tmp_path, demo_config(tmp_path, url))
    ingest(config, make_mail("Via a URL with options"))
    code, out, err = run_cli(capsys, "tickets", "list", "--config", str(config))
    assert (code, err) == (0, "") and "Via a URL with options" in out


def test_tickets_list_and_show_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = ingest(config, make_mail("First", message_id="<one@users.test>"))
    ingest(config, make_mail("Catalogue thing"))
    code, out, _ = run_cli(capsys, "tickets", "list", "--json", "--config", str(config))
    rows = json.loads(out)
    assert [r["subject"] for r in rows] == ["First", "Catalogue thing"]
    assert set(rows[0]) >= {"number", "hook", "subject", "state", "priority", "group", "owner",
                            "customer", "channel", "created_at", "updated_at"}
    assert rows[0]["hook"] == f"[Ticket#{first.ticket}]"
    code, out, _ = run_cli(capsys, "tickets", "list", "--json", "--group", "Catalogue Support",
                           "--config", str(config))
    assert [r["subject"] for r in json.loads(out)] == ["Catalogue thing"]
    code, out, _ = run_cli(capsys, "tickets", "show", first.ticket, "--json", "--config",
                           str(config))
    data = json.loads(out)
    assert data["articles"][0]["kind"] == "public"
    assert data["articles"][0]["sender"] == "dana@users.test"
    assert data["articles"][0]["message_id"] == "one@users.test"
    assert "First" in data["articles"][0]["subject"]
    assert data["participants"][0]["role"] == "customer"
    assert {e["kind"] for e in data["events"]} >= {"created", "routed"}
    assert set(data["deadlines"]) == {"first_response_due", "update_due", "solution_due",
                                      "next_escalation_at"}
    code, out, _ = run_cli(capsys, "tickets", "show", first.ticket, "--config", str(config))
    assert code == 0 and "I cannot log in" in out
    code, _, err = run_cli(capsys, "tickets", "show", "999", "--config", str(config))
    assert code == 1


def test_quarantine_list_show_retry(config: Path, capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    # No From, no Reply-To, and (as on IMAP) no envelope sender: nobody to answer.
    raw = b"To: help@helpdesk.test\r\nSubject: orphan\r\n\r\nWho am I?\r\n"
    from gateway.config import load_settings

    app = App(load_settings(config, environ={}))
    import datetime as dt

    result = app.intake.ingest_now(Inbound(Channel.EMAIL, raw, dt.datetime.now(dt.UTC),
                                           "imap:test", None, ("help@helpdesk.test",)))
    assert result.outcome.value == "quarantined"
    code, out, _ = run_cli(capsys, "quarantine", "list", "--json", "--config", str(config))
    [row] = json.loads(out)
    assert (row["stage"], row["reason"], row["state"]) == ("normalise", "no-sender", "held")
    code, out, _ = run_cli(capsys, "quarantine", "show", str(row["id"]), "--config",
                           str(config))
    assert "Who am I?" in out
    # Still no sender: retry quarantines again and says so.
    code, out, _ = run_cli(capsys, "quarantine", "retry", str(row["id"]), "--json",
                           "--config", str(config))
    assert code == 1 and json.loads(out)["outcome"] == "quarantined"
    app.engine.dispose()


def test_quarantine_retry_succeeds_after_fix(config: Path, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    # A rule file the operator later fixes is not what quarantines mail; a missing
    # group fallback is simulated by a mail with no sender that the operator re-sends
    # with the envelope recorded: retry uses the stored envelope.
    raw = b"To: help@helpdesk.test\r\nSubject: orphan\r\n\r\nHello\r\n"
    from gateway.config import load_settings

    app = App(load_settings(config, environ={}))
    import datetime as dt

    app.intake.ingest_now(Inbound(Channel.EMAIL, raw, dt.datetime.now(dt.UTC), "imap:test",
                                  None, ("help@helpdesk.test",)))
    from gateway.store.models import QuarantineRow

    with app.sessions() as s, s.begin():
        q = s.query(QuarantineRow).one()
        q.mail_from = "dana@users.test"  # the operator learnt who sent it
        qid = q.id
    code, out, _ = run_cli(capsys, "quarantine", "retry", str(qid), "--json", "--config",
                           str(config))
    assert code == 0 and json.loads(out)["outcome"] == "created"
    code, out, _ = run_cli(capsys, "quarantine", "list", "--json", "--config", str(config))
    assert json.loads(out)[0]["state"] == "retried"
    app.engine.dispose()


def test_outbox_list(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = ingest(config, make_mail("Outbox"))
    code, out, _ = run_cli(capsys, "outbox", "list", "--json", "--config", str(config))
    rows = json.loads(out)
    assert [(r["kind"], r["state"], r["channel"]) for r in rows] == [
        ("ack", "pending", "email"), ("notify", "pending", "email")]
    assert rows[0]["recipient"] == "dana@users.test" and rows[0]["ticket"] == result.ticket
    code, out, _ = run_cli(capsys, "outbox", "list", "--state", "sent", "--json", "--config",
                           str(config))
    assert json.loads(out) == []


async def run_daemon(tmp_path: Path, db_url: str, until: bytes,
                     ) -> tuple[asyncio.subprocess.Process, Path, int]:
    """`helpdeskd run` in a subprocess, once it has logged `until`: (process, config, port)."""
    from support.app import demo_config

    data = demo_config(tmp_path, db_url)
    port = free_port()
    data["smtp"]["port"] = port
    config = write_config(tmp_path, data)
    env = {**os.environ, "HELPDESKD_CONFIG": str(config)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while until not in (line := await proc.stdout.readline()):
                assert line, f"daemon exited before it logged {until!r}"
    except BaseException:
        proc.kill()
        raise
    return proc, config, port


async def stopped(proc: asyncio.subprocess.Process) -> tuple[int, bytes]:
    """SIGTERM; the exit code and what the daemon logged until it exited."""
    assert proc.stdout is not None
    try:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = await proc.stdout.read()
            return await proc.wait(), rest
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_run_stops_cleanly_on_sigterm(tmp_path: Path, db_url: str) -> None:
    proc, config, port = await run_daemon(tmp_path, db_url, b"helpdeskd: running")
    try:
        code, text = await send(port, make_mail("Via the real daemon"))
    finally:
        exit_code, rest = await stopped(proc)
    assert code == 250 and "created" in text
    assert exit_code == 0
    assert b"helpdeskd: stopped" in rest
    assert b"created ticket" in rest  # one log line per message with its ticket
    settings_toml = tomllib.loads(config.read_text())
    assert settings_toml["smtp"]["port"] == port


async def test_signals_while_starting_neither_kill_nor_hang(tmp_path: Path, db_url: str) -> None:
    proc, _, _ = await run_daemon(tmp_path, db_url, b"helpdeskd: starting")
    # The App is being built (imports, migrations): a reload, then a stop request.
    proc.send_signal(signal.SIGHUP)
    exit_code, rest = await stopped(proc)
    assert exit_code == 0, rest.decode()
    assert b"Traceback" not in rest


def test_daemon_logs_keep_secrets_out_at_debug_level() -> None:
    """Libraries that log bot tokens (in Bot API URLs) or reply-token addresses (aiosmtpd's
    RCPT lines) are held at WARNING even when the daemon logs at DEBUG."""
    script = (
        "import logging\n"
        "from gateway.cli import configure_logging\n"
        "configure_logging('DEBUG')\n"
        "logging.getLogger('telegram.Bot').debug('Set Bot API URL: /bot123:TOKEN-A')\n"
        "logging.getLogger('httpx').info('POST /bot123:TOKEN-B/getUpdates')\n"
        "logging.getLogger('mail.log').info('recip: help+2026112700001.TOKEN-C@h.test')\n"
        "logging.getLogger('gateway.intake').debug('our own debug line')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert "our own debug line" in done.stderr
    assert "TOKEN" not in done.stderr


def test_settings_fixture_matches_config_file(settings: Settings, config: Path) -> None:
    from gateway.config import load_settings

    assert load_settings(config, environ={}).group_names == settings.group_names


def test_status_shows_what_waits_in_the_spool(config: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Mail answered 250 under a burst has no ticket yet: `status` says how much waits."""
    import datetime as dt

    from gateway.config import load_settings
    from gateway.store import spool

    app = App(load_settings(config, environ={}))  # creates the database
    code, out, _ = run_cli(capsys, "status", "--config", str(config))
    assert code == 0 and "spool: empty" in out
    received = dt.datetime(2026, 11, 27, 9, 30, tzinfo=dt.UTC)
    with app.sessions() as s, s.begin():
        spool.put(s, [Inbound(Channel.EMAIL, make_mail(f"m{i}"), received + dt.timedelta(
            seconds=i), "smtp", "dana@users.test", ("help@helpdesk.test",)) for i in range(2)])
    app.engine.dispose()
    code, out, _ = run_cli(capsys, "status", "--json", "--config", str(config))
    assert code == 0
    assert json.loads(out)["spool"] == {"waiting": 2,
                                        "oldest_received_at": "2026-11-27T09:30:00+00:00"}
    code, out, _ = run_cli(capsys, "status", "--config", str(config))
    assert "spool: 2 message(s) accepted under a burst wait" in out
