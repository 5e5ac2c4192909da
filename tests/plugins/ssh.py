"""Test fixtures: a real OpenSSH server (Debian's `/usr/sbin/sshd`) on a loopback port, with its own host
key and config in a temporary folder, and two throwaway login users.

Users (decided: one throwaway password user, and root with a key):
- `vyssh-pw` logs in with the canary password `CANARY_PASSWORD` (password auth only); tests run as root,
  so the fixture creates it with `useradd` when absent (left in place; its password is reset each session);
- `root` logs in with the canary ed25519 key (public-key auth only, `PermitRootLogin prohibit-password`,
  authorized through this server's own AuthorizedKeysFile, never /root/.ssh). Root, because the trainer
  environment (`.trainer-venv`) links to an interpreter under /root (mode 0700) that no other user can
  run, and the remote-training tests need verl on the "remote" host; tests give root's hosts a
  temporary verlyard folder (`root` in the add body) so nothing lands in /root.
The canaries are recognisable on purpose: the T12 checks grep for them everywhere they must not be.
The server reads no system config (`-f` our file) and keeps no state outside the
temporary folder, except the users.

`sshd` (session): the running server. `sshd_factory` (function): more servers (another host key, the same
users), stopped at the end of the test. Without `/usr/sbin/sshd` the tests skip locally and FAIL under CI
(`CI=true`): scripts/system-deps.sh installs openssh-server there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import psutil
import pytest

from verlyard_shared.embedded.ports import free_port

SSHD = "/usr/sbin/sshd"
PW_USER = "vyssh-pw"
KEY_USER = "root"
CANARY_PASSWORD = "vy-Canary-Pw-7f3a9c41e2"
"""The password used through the SSH suite; it must never show up outside the sealed credential."""
_KEY_CACHE: dict[str, str] = {}


def canary_key() -> str:
    """The canary private key (OpenSSH text), the same for the whole session."""
    if "key" not in _KEY_CACHE:
        key = asyncssh.generate_private_key("ssh-ed25519", comment="vy-canary-key")
        _KEY_CACHE["key"] = key.export_private_key("openssh").decode()
        _KEY_CACHE["pub"] = key.export_public_key("openssh").decode()
    return _KEY_CACHE["key"]


def canary_public_key() -> str:
    canary_key()
    return _KEY_CACHE["pub"]


def key_canaries() -> list[str]:
    """Substrings of the private key that would betray it (its base64 body lines)."""
    lines = [ln for ln in canary_key().splitlines() if ln and not ln.startswith("-----")]
    return [ln for ln in lines if len(ln) >= 40]


def _require_sshd() -> None:
    if os.path.exists(SSHD):
        return
    message = f"{SSHD} is not installed (scripts/system-deps.sh installs openssh-server)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def _ensure_user(name: str) -> Path:
    try:
        import pwd

        home = Path(pwd.getpwnam(name).pw_dir)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
        import pwd

        home = Path(pwd.getpwnam(name).pw_dir)
    return home


def _set_password(name: str, password: str) -> None:
    # chpasswd reads the secret from stdin: never on a command line (T12: argv is checked).
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True)


@dataclass
class SshServer:
    folder: Path
    port: int
    host_key: Path
    proc: subprocess.Popen[bytes] | None = None
    address: str = "127.0.0.1"
    extra: list[str] = field(default_factory=list)

    @property
    def log_file(self) -> Path:
        return self.folder / "sshd.log"

    @property
    def host_fingerprint(self) -> str:
        return asyncssh.read_public_key(str(self.host_key) + ".pub").get_fingerprint("sha256")

    def start(self) -> None:
        config = self.folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.address}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.folder / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.folder / 'authorized_keys'}/%u",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    f"AllowUsers {PW_USER} {KEY_USER}",
                    "PasswordAuthentication yes",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "Subsystem sftp internal-sftp",
                    # The "remote" host has no network, like the test machine: its sessions say so to HF.
                    "SetEnv HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1",
                    f"Match User {PW_USER}",
                    "  PubkeyAuthentication no",
                    f"Match User {KEY_USER}",
                    "  PasswordAuthentication no",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(config), "-E", str(self.log_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}): {self.log_file.read_text()[-2000:]}")
            try:
                import socket

                with socket.create_connection((self.address, self.port), timeout=0.5) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        for child in self.session_processes():
            with _suppress():
                child.kill()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def session_processes(self) -> list[psutil.Process]:
        """The server-side processes serving connections (children of the listening sshd)."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []

    def kill_sessions(self) -> int:
        """Kill (SIGKILL) every server-side process serving a connection: the client sees the link drop."""
        killed = 0
        for child in self.session_processes():
            with _suppress():
                child.kill()
                killed += 1
        return killed

    def new_host_key(self) -> None:
        """Restart on the same port with a freshly generated host key (a reinstalled or impostor host)."""
        self.stop()
        self.host_key.unlink()
        Path(str(self.host_key) + ".pub").unlink()
        _keygen(self.host_key)
        self.start()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], psutil.Error)  # type: ignore[arg-type]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True)


def _prepare_users(folder: Path) -> None:
    _ensure_user(PW_USER)
    _set_password(PW_USER, CANARY_PASSWORD)
    keys = folder / "authorized_keys"
    keys.mkdir(exist_ok=True)
    keys.chmod(0o755)
    (keys / KEY_USER).write_text(canary_public_key())
    (keys / KEY_USER).chmod(0o644)


def _server(folder: Path) -> SshServer:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    host_key = folder / "host_ed25519"
    _keygen(host_key)
    _prepare_users(folder)
    server = SshServer(folder=folder, port=free_port(), host_key=host_key)
    server.start()
    return server


def _folder() -> Path:
    # Not under pytest's tmp_path: its parents are 0700 root, and sshd reads authorized_keys as the user.
    return Path(tempfile.mkdtemp(prefix="verlyard-sshd-"))


@pytest.fixture(scope="session")
def sshd() -> Iterator[SshServer]:
    _require_sshd()
    folder = _folder()
    server = _server(folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def sshd_factory() -> Iterator[list[SshServer]]:
    """Call `new_sshd(sshd_factory, name)` to start another server; every one is stopped afterwards."""
    _require_sshd()
    servers: list[SshServer] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)


def new_sshd(servers: list[SshServer]) -> SshServer:
    server = _server(_folder())
    servers.append(server)
    return server
