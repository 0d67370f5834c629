"""Configuration: validation with key paths and lines, environment overrides, no leaked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import DEFAULTS
from gateway.config import ConfigError, load_settings, locate, parse_settings

BASE = {
    "inbound": [{"address": "help@h.test", "default_group": "L1"}],
    "agents": [{"address": "a@h.test"}],
    "groups": [{"name": "L1", "agents": ["A@H.test"]}],
}


def test_shipped_demo_config_is_valid() -> None:
    settings = load_settings(DEFAULTS / "helpdeskd.toml", environ={})
    assert settings.inbound and settings.groups and settings.agents


def test_addresses_are_normalised_and_subaddresses_resolve() -> None:
    s = parse_settings(BASE, environ={})
    assert s.group("L1") is not None and s.group("L1").agents == ("a@h.test",)  # type: ignore[union-attr]
    inbound = s.inbound_for("HELP+2026112700001.abcdefghijklmnopqrst@H.TEST")
    assert inbound is not None and inbound.address == "help@h.test"
    assert s.inbound_for("other@h.test") is None


@pytest.mark.parametrize(("change", "message"), [
    ({"smtp": {"prot": 25}}, "smtp.prot: unknown key"),
    ({"smtp": {"port": 70000}}, "smtp.port"),
    ({"daemon": {"secret": "short"}}, "daemon.secret"),
    ({"groups": [{"name": "L1", "agents": ["nobody@h.test"]}]}, "not in [[agents]]"),
    ({"inbound": [{"address": "help@h.test", "default_group": "L9"}]}, "is no group"),
    ({"smtp": {"tls_cert": "/x.pem"}}, "tls_cert and tls_key must be set together"),
    # '+' is where the reply addresses' ticket and token begin.
    ({"inbound": [{"address": "help+it@h.test", "default_group": "L1"}]},
     "inbound.0.address: 'help+it@h.test': '+' starts the sub-address"),
    # No guessing: a misspelt switch must not turn a channel off.
    ({"smtp": {"enabled": "no"}}, "smtp.enabled: expected true or false, not 'no'"),
    ({"outbound": {"max_attempts": True}}, "outbound.max_attempts: expected a number"),
    # What `run` would trip over, `check` reports first.
    ({"outbound": {"smarthost": "mx.h.test", "password": "p"}},
     "outbound.username: a smarthost password needs a username"),
    ({"smtp": {"tls_cert": "/nonexistent/c.pem", "tls_key": "/nonexistent/k.pem"}},
     "smtp.tls_cert: /nonexistent/c.pem is not a readable file"),
])
def test_invalid_settings_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({**BASE, **change}, environ={})
    assert message in str(err.value)


def test_environment_overrides_secrets() -> None:
    env = {"HELPDESKD_SECRET": "from-the-environment-123",
           "HELPDESKD_OUTBOUND__USERNAME": "helpdesk",
           "HELPDESKD_OUTBOUND__PASSWORD": "smtp-pass-456",
           "HELPDESKD_DATABASE_URL": "postgresql://u@db/helpdesk"}
    s = parse_settings(BASE, environ=env)
    assert s.daemon.secret.get_secret_value() == "from-the-environment-123"
    assert s.outbound.password.get_secret_value() == "smtp-pass-456"
    assert s.database_url == "postgresql://u@db/helpdesk"
    # Secrets never show in a repr (and so in a log line).
    assert "from-the-environment" not in repr(s) and "smtp-pass" not in repr(s)
    # Environment values are strings: "false" and numbers are still read as such.
    s = parse_settings(BASE, environ={"HELPDESKD_SMTP__ENABLED": "false",
                                      "HELPDESKD_SMTP__PORT": "2600"})
    assert (s.smtp.enabled, s.smtp.port) == (False, 2600)


def test_cross_references_name_the_line_of_their_key(tmp_path: Path) -> None:
    path = tmp_path / "helpdeskd.toml"
    path.write_text('[[agents]]\naddress = "a@h.test"\n\n[[groups]]\nname = "L1"\n'
                    'agents = ["a@h.test"]\n\n[[inbound]]\naddress = "help@h.test"\n'
                    'default_group = "L2"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert f"{path}:10: inbound.0.default_group: 'L2' is no group" in str(err.value)


def test_a_bad_environment_value_names_the_variable_not_a_line(tmp_path: Path) -> None:
    path = tmp_path / "helpdeskd.toml"
    path.write_text('[daemon]\nsecret = "long-enough-for-the-check-123"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={"HELPDESKD_SECRET": "short"})
    assert "HELPDESKD_SECRET (environment): daemon.secret: must be at least 16" in str(err.value)
    assert f"{path}:2" not in str(err.value)


def test_unreadable_configuration_is_a_readable_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[daemon]\nname = "Caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        load_settings(latin1, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path, environ={})  # a directory


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "h.toml"
    bad.write_text("[daemon\nname = 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad, environ={})
    assert str(bad) in str(err.value) and "line 1" in str(err.value)


def test_locate_finds_keys_in_tables_and_arrays() -> None:
    text = ('[daemon]\nname = "x"\n\n[[inbound]]\naddress = "a@b.c"\n\n'
            '[[inbound]]\naddress = "bad"\ndefault_group = "L1"\n')
    assert locate(text, ("daemon", "name")) == 2
    assert locate(text, ("inbound", 1, "address")) == 8
    assert locate(text, ("inbound", 0, "default_group")) == 4  # missing: the table's line


def test_demo_secret_is_replaced_by_a_generated_one(tmp_path: Path) -> None:
    from gateway.config import DEFAULT_SECRET, with_real_secret

    s = parse_settings({**BASE, "daemon": {"data_dir": str(tmp_path / "var")}},
                       base_dir=tmp_path, environ={})
    assert s.daemon.secret.get_secret_value() == DEFAULT_SECRET
    first = with_real_secret(s)
    secret = first.daemon.secret.get_secret_value()
    assert secret != DEFAULT_SECRET and len(secret) >= 32
    stored = tmp_path / "var" / "secret"
    assert stored.stat().st_mode & 0o777 == 0o600
    # Reused on the next start, so reply addresses already sent stay valid.
    assert with_real_secret(s).daemon.secret.get_secret_value() == secret
    # A configured secret is left alone.
    own = parse_settings({**BASE, "daemon": {"secret": "x" * 20}}, environ={})
    assert with_real_secret(own) is own


def test_init_writes_its_own_secret(tmp_path: Path) -> None:
    from gateway.cli import main
    from gateway.config import DEFAULT_SECRET

    assert main(["init", str(tmp_path / "site")]) == 0
    text = (tmp_path / "site" / "helpdeskd.toml").read_text()
    assert DEFAULT_SECRET not in text
    assert load_settings(tmp_path / "site" / "helpdeskd.toml", environ={}).daemon.secret
