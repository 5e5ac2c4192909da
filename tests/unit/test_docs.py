"""Unit: the user guide and the troubleshooting page name only real things.

Every `VERLYARD_*` variable must be one the settings read (`verlyard_shared.settings.ENV_NAMES`), every
`verlyard ...` command in code (fenced blocks, or inline code that starts with `verlyard`) must parse
as a real subcommand with real flags of the CLI's own parser, and every `/api/v1/...` route must be
one the API declares. Prose is not checked; code is what users copy.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from verlyard_shared.cli import build_parser
from verlyard_shared.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs" / "guide").glob("*.md")), ROOT / "docs" / "troubleshooting.md"]
ROUTE_SOURCES = ROOT / "services" / "api" / "src" / "verlyard_api"
GUIDE_PAGES = {"pipelines", "cli", "api", "agents", "hosts", "audit", "operations"}

_ENV = re.compile(r"VERLYARD_[A-Z0-9_]*[A-Z0-9]")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"(?<![\w/.$-])verlyard ([^|#;&<>\n]*)")
_FLAG = re.compile(r"^-{1,2}[A-Za-z][\w-]*")
_ROUTE_DECL = re.compile(r"""["'](/api/v1/[^"'\s]*)["']""")
_ROUTE_DOC = re.compile(r"/api/v1/[A-Za-z0-9_{}./-]*[A-Za-z0-9_}]")


def doc_ids(path: Path) -> str:
    return path.name if path.parent.name != "guide" else f"guide/{path.name}"


def code_commands(text: str) -> list[str]:
    """The argument strings after `verlyard ` in code: each up to a pipe, comment, `;`, `&&` or redirect."""
    found: list[str] = []
    for block in _FENCE.findall(text):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)  # shell comments are prose
            found.extend(m.group(1).strip() for m in _COMMAND.finditer(line))
    prose = _FENCE.sub("", text)
    for span in _INLINE.findall(prose):
        if span.startswith("verlyard "):
            found.extend(m.group(1).strip() for m in _COMMAND.finditer(span))
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # pyright: ignore[reportPrivateUsage]
        if isinstance(action, argparse._SubParsersAction):  # pyright: ignore[reportPrivateUsage]
            return dict(action.choices)  # pyright: ignore[reportUnknownArgumentType]
    return {}


def check_command(args: str) -> str | None:
    """None when `verlyard <args>` names a real command and real flags; else what is wrong."""
    tokens = [t.strip("[]()") for t in args.split()]
    parser = build_parser()
    path: list[str] = []
    rest = tokens
    while rest and (choices := subparsers(parser)):
        word = rest[0]
        if word in choices:
            parser, path, rest = choices[word], [*path, word], rest[1:]
        elif re.fullmatch(r"[a-z][a-z-]*", word) or not (path or word.isupper()):
            return f"`verlyard {' '.join([*path, word])}`: no such command (known: {', '.join(sorted(choices))})"
        else:
            break  # an optional action left out (`agents [ls]`), or a placeholder
    options = set(parser._option_string_actions)  # pyright: ignore[reportPrivateUsage]
    for token in rest:
        flag = _FLAG.match(token)
        if flag and flag.group(0) not in options:
            return f"`verlyard {' '.join(path)}` has no option {flag.group(0)}"
    return None


def declared_routes() -> set[tuple[str, ...]]:
    routes: set[tuple[str, ...]] = set()
    for source in ROUTE_SOURCES.rglob("*.py"):
        for path in _ROUTE_DECL.findall(source.read_text()):
            routes.add(route_shape(path))
    return routes


def route_shape(path: str) -> tuple[str, ...]:
    """Segments, with every parameter (`{id}`, `{id:str}`, `ID`) as `*`."""
    segments = path.split("?", 1)[0].strip("/").split("/")
    return tuple("*" if s.startswith("{") or (s.isupper() and s.isalpha()) else s for s in segments)


def test_every_guide_page_is_there_and_linked_from_the_readme() -> None:
    assert {p.stem for p in DOCS if p.parent.name == "guide"} >= GUIDE_PAGES
    readme = (ROOT / "README.md").read_text()
    for page in sorted(GUIDE_PAGES):
        assert f"docs/guide/{page}.md" in readme, page
    assert "docs/troubleshooting.md" in readme


@pytest.mark.parametrize("path", DOCS, ids=doc_ids)
def test_every_env_name_is_a_real_setting(path: Path) -> None:
    unknown = sorted(set(_ENV.findall(path.read_text())) - set(ENV_NAMES))
    assert not unknown, f"{doc_ids(path)} names settings that verlyard_shared.settings does not read: {unknown}"


@pytest.mark.parametrize("path", DOCS, ids=doc_ids)
def test_every_command_is_a_real_cli_command(path: Path) -> None:
    problems = [p for args in code_commands(path.read_text()) if (p := check_command(args))]
    assert not problems, f"{doc_ids(path)}: " + "; ".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=doc_ids)
def test_every_api_route_is_declared(path: Path) -> None:
    routes = declared_routes()
    unknown = sorted({p for p in _ROUTE_DOC.findall(path.read_text()) if route_shape(p) not in routes})
    assert not unknown, f"{doc_ids(path)} names routes the API does not declare: {unknown}"


def test_the_checks_would_catch_a_wrong_command_flag_or_route() -> None:
    assert check_command("submit x.yaml --watch") is None
    assert check_command("agents drain gpu-1") is None
    assert check_command("hosts add box --address a --user u --key k") is None
    assert check_command("sumbit x.yaml") is not None
    assert check_command("submit x.yaml --follow") is not None
    assert check_command("hosts frobnicate box") is not None
    assert check_command("COMMAND --help") is None
    assert route_shape("/api/v1/pipelines/{pipeline_id:str}/cancel") in declared_routes()
    assert route_shape("/api/v1/pipelines/ID/stream") in declared_routes()
    assert route_shape("/api/v1/pipelines/{id}/explode") not in declared_routes()
    doc = "```sh\nverlyard ls  # verlyard owns this\n```\nprose verlyard owns `verlyard up --port 1`"
    assert code_commands(doc) == ["ls", "up --port 1"]
