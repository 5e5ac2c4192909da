"""Pure core: how the SSH runner maps the paths of an attempt between its local mirror and the host.

The runner runs the ordinary agent machinery against a local mirror folder (`<runner home>/ssh/<host>`);
on the host the same layout lives under the host's verlyard root. Every path a stage's command line
names under the mirror is rewritten to the host root; files the runner itself ships (the agent's
launcher scripts, pushed datasets) are uploaded content-addressed to `<root>/blobs/<sha256>/<name>`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from verlyard_shared.hosts.remote import RemoteError, check_segment, contains, under

_PATH_END = r"[^\s,\]\[\"'=:;]+"
_DOTDOT = re.compile(r"(?:^|[/\s,\]\[\"'=:;])\.\.(?:$|[/\s,\]\[\"'=:;])")


@dataclass(frozen=True, kw_only=True)
class PathMap:
    local_root: str
    """The runner's mirror folder for this host (absolute, no trailing slash)."""
    remote_root: str
    """The host's verlyard folder (absolute, checked)."""

    def to_remote(self, text: str) -> str:
        """`text` with every occurrence of a mirror path rewritten to the host's (paths stay under the root)."""
        base = self.local_root.rstrip("/")
        # Only where a path starts (not inside a longer one: `x/var/...` is not ours).
        pattern = re.compile(r"(?<![A-Za-z0-9_./~-])" + re.escape(base) + r"(?=/|$|[\s,\]\"'=:;])(/" + _PATH_END + ")?")

        def swap(match: re.Match[str]) -> str:
            rest = (match.group(1) or "").strip("/")
            parts = [p for p in rest.split("/") if p]
            return under(self.remote_root, *parts) if parts else self.remote_root

        out = pattern.sub(swap, text)
        if out != text and _DOTDOT.search(text):
            # A `..` next to a rewritten path could walk out of the root after it (`<mirror>/"/../..`):
            # no stage command needs one, so refuse the token rather than guess where the path ends.
            raise RemoteError(f"a path in {text!r} has a '..' segment: refused")
        return out

    def to_local(self, remote_path: str) -> str:
        """A host path under the root, as its mirror path (ValueError when outside the root)."""
        if not contains(self.remote_root, remote_path):
            raise ValueError(f"{remote_path!r} is not under the host's verlyard folder {self.remote_root!r}")
        rest = posixpath.relpath(posixpath.normpath(remote_path), posixpath.normpath(self.remote_root))
        return self.local_root if rest == "." else posixpath.join(self.local_root, rest)


def shipped_files(texts: Iterable[str], prefixes: Sequence[str]) -> list[str]:
    """Local file paths under one of `prefixes` (the launcher folder, the datasets cache) named in `texts`."""
    found: list[str] = []
    for prefix in prefixes:
        pattern = re.compile(re.escape(prefix.rstrip("/")) + "/" + _PATH_END)
        for text in texts:
            for match in pattern.finditer(text):
                if match.group(0) not in found:
                    found.append(match.group(0))
    return found


def blob_path(remote_root: str, sha256: str, name: str) -> str:
    """Where an uploaded file lives on the host: content-addressed, its own name kept (scripts need it)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return under(remote_root, "blobs", sha256, check_segment(name))


def rewrite(
    argv: Sequence[str], env: Mapping[str, str], cwd: str, *, paths: PathMap, uploads: Mapping[str, str]
) -> tuple[list[str], dict[str, str], str]:
    """argv, env and cwd for the host: uploaded files by their blob path, then mirror paths by host paths."""

    def one(text: str) -> str:
        for local, remote_path in uploads.items():
            text = text.replace(local, remote_path)
        return paths.to_remote(text)

    return [one(a) for a in argv], {k: one(v) for k, v in env.items()}, one(cwd)
