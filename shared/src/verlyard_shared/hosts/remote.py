"""Pure core: what verlyard says to an SSH host — validated names, paths under the host's verlyard root,
and shell commands built only from `shlex.quote`d tokens and allow-listed values.

Every remote command goes through `command()` (tokens joined with `shlex.join`), so `shlex.split` of
it gives the tokens back, whatever a user put in a name, an override or a hyperparameter; every
remote path goes through `under()`, which refuses `..`, absolute parts and anything that would
leave the root. tests/unit/test_hosts_remote.py checks both with hypothesis (reliability T13).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

HOST_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
"""Host names: like pipeline names (they are URL path segments and parts of the agent id `ssh:<name>`)."""
USER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
HOSTNAME: Final = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
IPV6: Final = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
SEGMENT: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,254}$")
"""One path segment verlyard creates on a host (ids, stage names, sha256s, file names)."""
ENV_NAME: Final = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
PROGRAM: Final = re.compile(r"^[A-Za-z0-9_./+-]{1,4096}$")
"""A program path given in configuration (the trainer's Python): no spaces, quotes or shell syntax."""
DEFAULT_PORT: Final = 22
ROOT_DIR: Final = ".verlyard"
"""The host's verlyard folder, under the SSH user's home: every path verlyard touches lies below it."""


class RemoteError(ValueError):
    """A name, address or path that verlyard refuses to put on a remote command line."""


def check_host_name(name: str) -> str:
    if not HOST_NAME.fullmatch(name):
        raise RemoteError(f"host name {name!r}: expected {HOST_NAME.pattern}")
    return name


def check_user(user: str) -> str:
    if not USER.fullmatch(user):
        raise RemoteError(f"user {user!r}: expected {USER.pattern}")
    return user


def check_program(path: str) -> str:
    if not PROGRAM.fullmatch(path) or path.startswith("-"):
        raise RemoteError(f"program {path!r}: expected a path of {PROGRAM.pattern} not starting with '-'")
    return path


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT` -> (host, port). Raises RemoteError."""
    raw = text.strip()
    port_text = ""
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RemoteError(f"address {text!r}: expected [IPV6] or [IPV6]:PORT")
        port_text = rest[1:]
        if not IPV6.fullmatch(host):
            raise RemoteError(f"address {text!r}: not an IPv6 address")
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
    elif raw.count(":") > 1:
        host = raw
        if not IPV6.fullmatch(host):
            raise RemoteError(f"address {text!r}: not an IPv6 address (write [V6]:PORT with a port)")
    else:
        host = raw
    if ":" not in host and not HOSTNAME.fullmatch(host):
        raise RemoteError(f"address {text!r}: not a host name or IP address")
    port = default_port
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise RemoteError(f"address {text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return host, port


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise RemoteError(f"port {port}: expected 1..65535")
    return port


# ---- paths -------------------------------------------------------------------------------------------


def root_for(home: str) -> str:
    """The verlyard root of a user whose home is `home` (an absolute, normalised path)."""
    if not home.startswith("/") or "\x00" in home or "\n" in home:
        raise RemoteError(f"home folder {home!r}: not an absolute path")
    return posixpath.join(posixpath.normpath(home), ROOT_DIR)


def check_root(path: str) -> str:
    """A configured verlyard folder: absolute, normalised, every segment allow-listed, not `/` itself."""
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise RemoteError(f"verlyard folder {path!r}: expected a normalised absolute path below /")
    for part in path.strip("/").split("/"):
        check_segment(part)
    return path


def check_segment(part: str) -> str:
    if part in (".", "..") or not SEGMENT.fullmatch(part):
        raise RemoteError(f"path segment {part!r}: expected {SEGMENT.pattern}, not '.' or '..'")
    return part


def under(root: str, *parts: str) -> str:
    """`root/part/...`, each part one checked segment; the result provably stays below `root`."""
    if not root.startswith("/"):
        raise RemoteError(f"remote root {root!r} is not absolute")
    base = posixpath.normpath(root)
    path = posixpath.join(base, *(check_segment(p) for p in parts))
    if path != base and not path.startswith(base + "/"):  # cannot happen with checked segments: belt and braces
        raise RemoteError(f"{path!r} is not under {base!r}")
    return path


def relative_under(root: str, relative: str) -> str:
    """A slash-separated relative path (`outputs/eval.json`) below `root`, each segment checked."""
    parts = [p for p in relative.split("/") if p]
    if relative.startswith("/") or not parts:
        raise RemoteError(f"path {relative!r}: expected a path relative to the host's verlyard folder")
    return under(root, *parts)


def contains(root: str, path: str) -> bool:
    """Whether the (absolute) `path` lies below `root` after normalisation."""
    base, full = posixpath.normpath(root), posixpath.normpath(path)
    return path.startswith("/") and (full == base or full.startswith(base + "/"))


# ---- commands ----------------------------------------------------------------------------------------


def command(argv: Sequence[str]) -> str:
    """One simple command: every token quoted, so `shlex.split(command(argv)) == list(argv)`."""
    if not argv:
        raise RemoteError("an empty command")
    for token in argv:
        if "\x00" in token:
            raise RemoteError("a command token holds a NUL byte")
    return shlex.join(argv)


def env_tokens(env: Mapping[str, str]) -> list[str]:
    """`NAME=value` tokens for `env`; names allow-listed, values passed as data (quoted by `command`)."""
    tokens: list[str] = []
    for name in sorted(env):
        if not ENV_NAME.fullmatch(name):
            raise RemoteError(f"environment variable name {name!r}: expected {ENV_NAME.pattern}")
        tokens.append(f"{name}={env[name]}")
    return tokens


def sequence(commands: Iterable[str]) -> str:
    """Commands built by `command()` run one after the other, stopping at the first failure."""
    return " && ".join(commands)


@dataclass(frozen=True, kw_only=True)
class RunFiles:
    """The files of one detached remote run, all under its folder."""

    folder: str
    pid_file: str
    log_file: str
    exit_file: str


def run_files(root: str, *parts: str) -> RunFiles:
    folder = under(root, *parts)
    return RunFiles(
        folder=folder,
        pid_file=under(folder, "pid"),
        log_file=under(folder, "output.log"),
        exit_file=under(folder, "exit-code"),
    )


# The wrapper a detached run executes (`sh -c WRAPPER verlyard-run PID EXIT ARGV...`): it writes its own pid
# (= the process group id: setsid made it a session leader), runs the stage, then writes the exit code
# through a temporary file and a rename, so a reader never sees half a number. No value is interpolated
# into it: everything arrives as positional parameters.
DETACHED_WRAPPER: Final = (
    'pid_file=$1; exit_file=$2; shift 2; echo $$ > "$pid_file.tmp" && mv "$pid_file.tmp" "$pid_file"; '
    '"$@"; code=$?; echo $code > "$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"'
)


def launch_detached(files: RunFiles, argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> str:
    """Start `argv` detached from the SSH session: its own session and process group (`setsid`), stdin
    from /dev/null, stdout+stderr appended to the log file, pid and exit-code files beside it.

    The connection may drop right after: nothing of the run depends on it.
    """
    inner = command(
        [
            *("setsid", "sh", "-c", DETACHED_WRAPPER, "verlyard-run", files.pid_file, files.exit_file),
            *("env", *env_tokens(env), *argv),
        ]
    )
    return sequence(
        [
            command(["mkdir", "-p", files.folder, cwd]),
            command(["cd", cwd]),
            # The redirections and `&` are fixed syntax; the paths in them are quoted tokens.
            f"{{ {inner} < /dev/null >> {shlex.quote(files.log_file)} 2>&1 & }}",
        ]
    )


def signal_group(files: RunFiles, signal: str) -> str:
    """Signal the run's whole process group (`kill -SIG -- -PGID`); prints `gone` when no such group."""
    if signal not in ("TERM", "KILL", "0"):
        raise RemoteError(f"signal {signal!r} is not allow-listed")
    pid = f"$(cat {shlex.quote(files.pid_file)})"
    return f'kill -{signal} -- -"{pid}" 2>/dev/null || echo gone'


def group_alive(files: RunFiles) -> str:
    """Prints `alive` while any process of the run's group lives, else `gone`."""
    pid = f"$(cat {shlex.quote(files.pid_file)} 2>/dev/null)"
    return f'p="{pid}"; if [ -n "$p" ] && kill -0 -- -"$p" 2>/dev/null; then echo alive; else echo gone; fi'
