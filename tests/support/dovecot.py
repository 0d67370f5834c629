"""A real Dovecot IMAP server for tests and benches, started unprivileged on a free port.

`Dovecot(root)` writes its own dovecot.conf under `root` (base_dir, state_dir,
log and mail all inside it), a passwd-file with static plain-text passwords, and
runs `dovecot -F -c <conf>` as a child in its own process group::

    with Dovecot(tmp, users={"help": "secret"}) as server:
        server.append("help", raw)              # IMAP APPEND with the stdlib imaplib
        ...                                     # point the daemon at server.port
        server.kill(); server.start()           # a crash, then the same server again

Run as root (CI), Dovecot's own processes run as `nobody` and mail belongs to
`nobody`, as Dovecot refuses mail access as root; run as another user, everything
runs as that user. `capability=` replaces the CAPABILITY list (e.g. without IDLE
and MOVE, to exercise polling and the COPY fallback); `tls=True` adds implicit TLS
(`imaps_port`) and STARTTLS with a throwaway self-signed certificate for
127.0.0.1, whose file is `cert_file`.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"

__all__ = ["DOVECOT", "Dovecot", "dovecot_available"]


def dovecot_available() -> bool:
    return Path(DOVECOT).exists()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Dovecot:
    """One Dovecot instance; a context manager that starts and stops it."""

    def __init__(
        self,
        root: Path,
        *,
        users: dict[str, str] | None = None,
        capability: str | None = None,
        tls: bool = False,
    ) -> None:
        self.root = root
        self.users = dict(users or {"help": "secret"})
        self.capability = capability
        self.tls = tls
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.imaps_port = _free_port() if tls else 0
        self.cert_file = root / "cert.pem"
        self._process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            self._user = "nobody"
            self._group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
        else:
            self._user = pwd.getpwuid(os.geteuid()).pw_name
            self._group = grp.getgrgid(os.getegid()).gr_name
        self._write_config()

    # -- configuration ------------------------------------------------------------------

    def _write_config(self) -> None:
        root = self.root
        for sub in ("run", "state", "mail"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Dovecot's unprivileged processes must reach their files through these.
        for path in (root, root / "mail"):
            path.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(root / "mail", self._user, self._group)
        self.write_users()
        tls = self._tls_config() if self.tls else "ssl = no\n"
        capability = f"imap_capability = {self.capability}\n" if self.capability else ""
        imaps = (f"  inet_listener imaps {{\n    address = {self.host}\n"
                 f"    port = {self.imaps_port}\n  }}\n") if self.tls else (
                 "  inet_listener imaps {\n    port = 0\n  }\n")
        mail_ids = ""
        if os.geteuid() == 0:
            # Dovecot refuses to access mail as root (uid 0).
            mail_ids = f"mail_uid = {self._user}\nmail_gid = {self._group}\n"
        (root / "dovecot.conf").write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
listen = {self.host}
protocols = imap
disable_plaintext_auth = no
auth_mechanisms = plain login
# No brute-force protection on loopback: failed logins are answered at once
# (trusted networks skip the growing auth penalty too).
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
default_internal_user = {self._user}
default_internal_group = {self._group}
default_login_user = {self._user}
{mail_ids}first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
{capability}{tls}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
{imaps}}}
""")

    def _tls_config(self) -> str:
        key = self.root / "key.pem"
        if not self.cert_file.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(self.cert_file)],
                check=True, capture_output=True)
        return f"ssl = yes\nssl_cert = <{self.cert_file}\nssl_key = <{key}\n"

    def write_users(self) -> None:
        """(Re)write the passwd-file; Dovecot re-reads it when it changes."""
        lines = [f"{user}:{{PLAIN}}{password}::::::\n" for user, password in self.users.items()]
        (self.root / "passwd").write_text("".join(lines))

    def add_user(self, user: str, password: str = "secret") -> None:
        self.users[user] = password
        self.write_users()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same ports and mail) and wait for the greeting."""
        if self._process is not None:
            raise RuntimeError("dovecot is already running")
        self._process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode() if self._process.stderr else ""
                self._process = None
                raise RuntimeError(f"dovecot exited at start: {err}\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"* OK"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not answer on {self.port}:\n{self.log()}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL to Dovecot and all its processes: every client connection drops."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()
        if self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None

    def stop(self) -> None:
        self.kill()

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- an administrator's view of the mailboxes (stdlib imaplib, blocking) ------------

    @contextlib.contextmanager
    def client(self, user: str = "help") -> Iterator[imaplib.IMAP4]:
        imap = imaplib.IMAP4(self.host, self.port, timeout=10)
        try:
            imap.login(user, self.users[user])
            yield imap
        finally:
            with contextlib.suppress(Exception):
                imap.logout()

    def append(self, user: str, *messages: bytes, folder: str = "INBOX",
               flags: str | None = None) -> None:
        with self.client(user) as imap:
            for raw in messages:
                typ, data = imap.append(_quote(folder), flags, None, raw)
                assert typ == "OK", data

    def create(self, user: str, folder: str) -> None:
        with self.client(user) as imap:
            typ, data = imap.create(_quote(folder))
            assert typ == "OK", data

    def delete(self, user: str, folder: str) -> None:
        with self.client(user) as imap:
            typ, data = imap.delete(_quote(folder))
            assert typ == "OK", data

    def folders(self, user: str = "help") -> list[str]:
        with self.client(user) as imap:
            typ, data = imap.list()
            assert typ == "OK", data
        names = []
        for item in data:
            if isinstance(item, bytes):
                m = re.match(rb'^\(.*?\) (?:"."|NIL|"/") (.*)$', item)
                if m:
                    names.append(m.group(1).decode().strip('"'))
        return names

    def messages(self, user: str = "help", folder: str = "INBOX") -> list[tuple[set[str], bytes]]:
        """(flags, bytes) of every message in `folder` (an empty list if it does not exist)."""
        with self.client(user) as imap:
            typ, _ = imap.select(_quote(folder), readonly=True)
            if typ != "OK":
                return []
            typ, data = imap.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
            assert typ == "OK", data
        found = []
        for item in data:
            if isinstance(item, tuple):
                head = item[0].decode()
                m = re.search(r"FLAGS \(([^)]*)\)", head)
                flags = set(m.group(1).split()) if m else set()
                found.append((flags, item[1]))
        return found

    def count(self, user: str = "help", folder: str = "INBOX") -> int:
        with self.client(user) as imap:
            typ, data = imap.status(_quote(folder), "(MESSAGES)")
        if typ != "OK":
            return 0
        m = re.search(rb"MESSAGES (\d+)", data[0] or b"")
        return int(m.group(1)) if m else 0

    def uidnext(self, user: str = "help", folder: str = "INBOX") -> int:
        with self.client(user) as imap:
            typ, data = imap.status(_quote(folder), "(UIDNEXT)")
            assert typ == "OK", data
        m = re.search(rb"UIDNEXT (\d+)", data[0] or b"")
        assert m is not None
        return int(m.group(1))

    def uidvalidity(self, user: str = "help", folder: str = "INBOX") -> int:
        with self.client(user) as imap:
            typ, data = imap.status(_quote(folder), "(UIDVALIDITY)")
            assert typ == "OK", data
        m = re.search(rb"UIDVALIDITY (\d+)", data[0] or b"")
        assert m is not None
        return int(m.group(1))


def _quote(folder: str) -> str:
    # imaplib sends arguments as given; quote names with spaces (ASCII names only here).
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
