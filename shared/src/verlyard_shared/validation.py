"""Pure core: parse and validate a pipeline spec (YAML or JSON) into the normalised `PipelineSpec`.

Shared by the API (which maps `SpecError` to 400/422 and `SpecTooLarge` to 413) and the scheduler.
Every issue names its field as a dotted path (`stages.train.retry.max_attempts`) and, for YAML, the
line it sits on. Hostile input is bounded before any work proportional to its expanded size is done:
the byte size, the nesting depth and the alias-expanded node count are all capped.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Final, Literal, cast, get_args

import msgspec
import yaml

from verlyard_shared.spec import (
    STAGE_KINDS,
    WITH_EXTENSION_PREFIX,
    WITH_KEYS,
    FailureClass,
    PipelineSpec,
    Resources,
    RetryPolicy,
    StageSpec,
)

MAX_SPEC_BYTES: Final = 1024 * 1024
"""Larger documents are refused before parsing (HTTP 413)."""
MAX_DEPTH: Final = 32
"""Deepest nesting of mappings/lists a spec may have (the real schema needs about 6)."""
MAX_NODES: Final = 50_000
"""Most values a document may hold once YAML aliases are expanded (a "billion laughs" guard)."""
MAX_STAGES: Final = 1000
MAX_DURATION_S: Final = 366 * 86_400.0
MAX_PRIORITY: Final = 1_000_000

PIPELINE_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
STAGE_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
"""Stage names become NATS subject tokens (`vy.met.<pipeline>.<stage>`): no dots, spaces or wildcards."""
LABEL_KEY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
OVERRIDE_KEY_RE: Final = re.compile(r"[+~]{0,2}[A-Za-z0-9_][A-Za-z0-9_.@/-]{0,199}")
"""A Hydra override key (`trainer.total_training_steps`, `+model.override_config.x`): no `=` or spaces."""

FAILURE_CLASSES: Final[tuple[str, ...]] = get_args(FailureClass)
WHEN_VALUES: Final = ("on_success", "on_failure", "always")
BACKOFF_VALUES: Final = ("fixed", "exponential")
JITTER_VALUES: Final = ("none", "full")
VERL_ADV_ESTIMATORS: Final = (
    "gae",
    "grpo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
    "rloo",
    "opo",
    "grpo_passk",
    "gpg",
    "rloo_vectorized",
    "grpo_vectorized",
    "optimal_token_baseline",
    "tir_optimal_token_baseline",
    "gdpo",
)
"""`algorithm.adv_estimator` values of verl 0.9.1 (docs: shared/docs/verl.md)."""
TRAIN_ALGORITHMS: Final[tuple[str, ...]] = ("sft", "grpo", "ppo", *(a for a in VERL_ADV_ESTIMATORS if a != "grpo"))

TOP_KEYS: Final = ("name", "labels", "priority", "defaults", "stages")
DEFAULTS_KEYS: Final = ("retry", "timeout", "resources", "priority")
STAGE_KEYS: Final = ("kind", "needs", "when", "retry", "timeout", "resources", "priority", "with")
RETRY_KEYS: Final = ("max_attempts", "backoff", "initial_delay", "max_delay", "jitter", "retry_on")
RESOURCE_KEYS: Final = ("gpus", "gpu_memory_gb", "cpu_slots", "labels")

_DURATION_PART: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

Path = tuple[str | int, ...]


class SpecIssue(msgspec.Struct, frozen=True, kw_only=True):
    """One problem with a spec: where (`path`, and `line` for YAML) and what."""

    path: str
    """Dotted path of the field (`stages.train.retry.max_attempts`); "" for the whole document."""
    message: str
    line: int | None = None
    """1-based line in the YAML source, when known."""


class SpecError(ValueError):
    """The spec is invalid; `errors` lists every problem found (HTTP 422, or 400 when unparsable)."""

    def __init__(self, errors: Sequence[SpecIssue]) -> None:
        self.errors: list[SpecIssue] = list(errors)
        super().__init__("; ".join(_describe(i) for i in self.errors) or "invalid pipeline spec")


class SpecTooLarge(SpecError):
    """The document is over `MAX_SPEC_BYTES` (HTTP 413)."""


def _describe(issue: SpecIssue) -> str:
    where = issue.path or "spec"
    if issue.line is not None:
        where += f" (line {issue.line})"
    return f"{where}: {issue.message}"


def format_path(path: Path) -> str:
    """`("stages", "train", "needs", 0)` -> `stages.train.needs[0]`; odd keys are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


# ---- parsing ---------------------------------------------------------------------------------------


def parse_pipeline(raw: bytes | str, *, content_type: Literal["yaml", "json"]) -> PipelineSpec:
    """Parse and validate a spec document. Raises `SpecTooLarge` or `SpecError` (with YAML lines)."""
    size = len(raw) if isinstance(raw, bytes) else (len(raw) if len(raw) > MAX_SPEC_BYTES else len(raw.encode()))
    if size > MAX_SPEC_BYTES:
        raise SpecTooLarge(
            [SpecIssue(path="", message=f"the document is {size} bytes; the limit is {MAX_SPEC_BYTES} bytes (1 MiB)")]
        )
    if content_type == "yaml":
        doc, lines = _load_yaml(raw)
    elif content_type == "json":
        doc, lines = _load_json(raw), {}
    else:
        raise ValueError(f"content_type must be 'yaml' or 'json', not {content_type!r}")
    return validate_pipeline(doc, lines=lines)


# YAML 1.1 reads `on`, `yes`, `no` as booleans and bare dates as timestamps; a spec wants YAML 1.2's
# reading (stage names like `on` stay strings, dates stay text that JSON can carry).
_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# libyaml when present: the pure-Python composer costs ~50 µs a node, which a 1 MiB list turns into
# half a minute of CPU; libyaml parses and composes the same in well under a second.
_BaseLoader: type[yaml.SafeLoader] = cast(type[yaml.SafeLoader], getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class _SpecLoader(_BaseLoader):
    """SafeLoader with YAML 1.2 booleans and no implicit timestamps."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_SpecLoader.add_implicit_resolver(  # pyright: ignore[reportUnknownMemberType]
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_OPEN_EVENTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE_EVENTS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
_LEAF_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent)


def _prescan(raw: bytes | str) -> None:
    """Bound depth and size on the event stream, before composing: the parser keeps an explicit
    stack (no recursion), so deep or huge documents are refused in time linear in what was read."""
    loader = _SpecLoader(raw)
    depth = nodes = 0
    try:
        while loader.check_event():  # pyright: ignore[reportUnknownMemberType]
            event = cast(yaml.Event, loader.get_event())  # pyright: ignore[reportUnknownMemberType]
            if isinstance(event, _CLOSE_EVENTS):
                depth -= 1
                continue
            if isinstance(event, _OPEN_EVENTS):
                depth += 1
            elif not isinstance(event, _LEAF_EVENTS):
                continue
            nodes += 1
            line = cast(yaml.Mark, event.start_mark).line + 1
            if depth > MAX_DEPTH:
                raise SpecError([SpecIssue(path="", message=f"nested deeper than {MAX_DEPTH} levels", line=line)])
            if nodes > MAX_NODES:
                raise SpecError([SpecIssue(path="", message=f"the document holds more than {MAX_NODES} values")])
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc)
        # libyaml has its own (larger) nesting limit; say the same thing either way.
        message = f"nested deeper than {MAX_DEPTH} levels" if "nesting depth" in problem else f"invalid YAML: {problem}"
        raise SpecError([SpecIssue(path="", message=message, line=_yaml_line(exc))]) from None
    finally:
        loader.dispose()  # pyright: ignore[reportUnknownMemberType]


def _yaml_line(exc: yaml.YAMLError) -> int | None:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = getattr(mark, "line", None)
    return line + 1 if isinstance(line, int) else None


def _load_yaml(raw: bytes | str) -> tuple[object, dict[str, int]]:
    _prescan(raw)
    loader = _SpecLoader(raw)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise SpecError([SpecIssue(path="", message=f"invalid YAML: {problem}", line=_yaml_line(exc))]) from None
        if node is None:
            raise SpecError([SpecIssue(path="", message="the document is empty")])
        issues: list[SpecIssue] = []
        _check_expansion(node, issues)
        if issues:
            raise SpecError(issues)
        lines: dict[str, int] = {"": node.start_mark.line + 1}
        _walk_nodes(node, (), lines, issues)
        if issues:
            raise SpecError(issues)
        try:
            doc = cast(object, loader.construct_document(node))  # pyright: ignore[reportUnknownMemberType]
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise SpecError([SpecIssue(path="", message=f"invalid YAML: {problem}", line=_yaml_line(exc))]) from None
        except (TypeError, ValueError) as exc:  # e.g. an unhashable merge key, a huge int literal
            raise SpecError([SpecIssue(path="", message=f"invalid YAML: {exc}")]) from None
        return doc, lines
    finally:
        loader.dispose()  # pyright: ignore[reportUnknownMemberType]


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from cast(list[yaml.Node], node.value)
    elif isinstance(node, yaml.MappingNode):
        for key, value in cast(list[tuple[yaml.Node, yaml.Node]], node.value):
            yield key
            yield value


def _check_expansion(root: yaml.Node, issues: list[SpecIssue]) -> None:
    """Refuse alias cycles and documents whose alias expansion exceeds `MAX_NODES` or `MAX_DEPTH`.

    Aliases make the node graph a DAG (or a cyclic graph); sizes are memoised per node so a
    "billion laughs" document costs time linear in its text, not in its expansion.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = list(_children(node))
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            on_path.discard(key)
            continue
        if key in size:
            continue
        if key in on_path:
            line = node.start_mark.line + 1
            issues.append(SpecIssue(path="", message="a YAML alias refers to its own anchor (a cycle)", line=line))
            return
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)
    if size[id(root)] > MAX_NODES:
        issues.append(
            SpecIssue(
                path="",
                message=f"the document expands to {size[id(root)]} values with its aliases; the limit is {MAX_NODES}",
            )
        )
    elif depth[id(root)] > MAX_DEPTH:
        issues.append(SpecIssue(path="", message=f"nested deeper than {MAX_DEPTH} levels (through aliases)"))


def _walk_nodes(root: yaml.Node, root_path: Path, lines: dict[str, int], issues: list[SpecIssue]) -> None:
    """Record each value's line by path; flag duplicate and non-scalar mapping keys."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, Path]] = [(root, root_path)]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # an alias: its lines are recorded where the anchor is
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(cast(list[yaml.Node], node.value)):
                lines.setdefault(format_path((*path, i)), item.start_mark.line + 1)
                stack.append((item, (*path, i)))
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in cast(list[tuple[yaml.Node, yaml.Node]], node.value):
                line = key_node.start_mark.line + 1
                if key_node.tag == _MERGE_TAG:
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    issues.append(
                        SpecIssue(path=format_path(path), message="mapping keys must be plain strings", line=line)
                    )
                    continue
                ident = (str(key_node.tag), str(key_node.value))
                child = (*path, str(key_node.value))
                if ident in first_line:
                    issues.append(
                        SpecIssue(
                            path=format_path(child),
                            message=f"duplicate key {key_node.value!r} (first defined on line {first_line[ident]})",
                            line=line,
                        )
                    )
                    continue
                first_line[ident] = line
                lines.setdefault(format_path(child), line)
                stack.append((value_node, child))


class _PairsDict(dict[str, object]):
    """A JSON object that remembers the keys it saw twice (json keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, object]]) -> _PairsDict:
    out = _PairsDict(pairs)
    if len(out) != len(pairs):
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        out.duplicates = tuple(k for k, n in counts.items() if n > 1)
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


_JSON_STRINGS: Final = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS: Final = re.compile(r"[\[\]{}]")


def _load_json(raw: bytes | str) -> object:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError([SpecIssue(path="", message=f"the document is not valid UTF-8: {exc.reason}")]) from None
    else:
        text = raw
    # The json module recurses per level: measure the depth first, outside strings.
    depth = 0
    for match in _JSON_BRACKETS.finditer(_JSON_STRINGS.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise SpecError([SpecIssue(path="", message=f"nested deeper than {MAX_DEPTH} levels")])
    try:
        return cast(object, json.loads(text, object_pairs_hook=_json_object, parse_constant=_reject_constant))
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue(path="", message=f"invalid JSON: {exc.msg}", line=exc.lineno)]) from None
    except (ValueError, RecursionError) as exc:
        raise SpecError([SpecIssue(path="", message=f"invalid JSON: {exc}")]) from None


# ---- validation ------------------------------------------------------------------------------------


def validate_pipeline(doc: object, *, lines: Mapping[str, int] | None = None) -> PipelineSpec:
    """Validate a decoded document (a dict from YAML/JSON) and return the normalised spec.

    `lines` maps formatted paths to YAML lines (built by `parse_pipeline`); issues take the line of
    their path or of its nearest ancestor. Raises `SpecError` listing every problem found.
    """
    checker = _Checker(lines or {})
    checker.plain(doc)
    if checker.issues:
        raise SpecError(checker.issues)
    spec = checker.pipeline(doc)
    if checker.issues or spec is None:
        raise SpecError(checker.issues)
    return spec


def find_cycle(needs: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as `[a, b, c, a]` (a needs b, b needs c, c needs a), or None.

    Edges to unknown stages are ignored. Deterministic: the search starts from stages in mapping order.
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in needs:
        if state.get(start):
            continue
        path: list[str] = [start]
        iters: list[Iterator[str]] = [iter(needs[start])]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif nxt not in needs:
                continue
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(needs[nxt]))
    return None


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _kind_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class _Checker:
    """Collects issues while walking one document; every method returns the normalised value or None."""

    def __init__(self, lines: Mapping[str, int]) -> None:
        self.lines = lines
        self.issues: list[SpecIssue] = []

    def issue(self, path: Path, message: str) -> None:
        line: int | None = None
        probe = path
        while True:
            line = self.lines.get(format_path(probe))
            if line is not None or not probe:
                break
            probe = probe[:-1]
        self.issues.append(SpecIssue(path=format_path(path), message=message, line=line))

    # -- generic shape ---------------------------------------------------------------------------------

    def plain(self, doc: object) -> None:
        """Only JSON-able values, string keys, finite numbers, no NUL characters; bounded depth and size."""
        count = 0
        stack: list[tuple[object, Path]] = [(doc, ())]
        while stack:
            value, path = stack.pop()
            count += 1
            if count > MAX_NODES:
                self.issue((), f"the document holds more than {MAX_NODES} values")
                return
            if len(path) > MAX_DEPTH:
                self.issue(path, f"nested deeper than {MAX_DEPTH} levels")
                return
            if isinstance(value, dict):
                mapping = cast(dict[object, object], value)
                for dup in getattr(mapping, "duplicates", ()):
                    self.issue((*path, dup), f"duplicate key {dup!r}")
                for key, item in mapping.items():
                    if not isinstance(key, str):
                        self.issue(path, f"keys must be strings; {key!r} is {_kind_name(key)}")
                        continue
                    self._text(key, path, "key")
                    stack.append((item, (*path, key)))
            elif isinstance(value, list):
                stack.extend((item, (*path, i)) for i, item in enumerate(cast(list[object], value)))
            elif isinstance(value, str):
                self._text(value, path, "value")
            elif isinstance(value, float):
                if not math.isfinite(value):
                    self.issue(path, "numbers must be finite")
            elif value is None or isinstance(value, bool | int):
                pass
            else:
                self.issue(path, f"unsupported value of type {type(value).__name__} (use plain strings and numbers)")

    def _text(self, text: str, path: Path, what: str) -> None:
        if "\x00" in text:
            self.issue(path, f"{what} contains a NUL character")
            return
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.issue(path, f"{what} is not valid Unicode (a lone surrogate)")

    def mapping(self, value: object, path: Path, *, allowed: Sequence[str] | None = None) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.issue(path, f"must be a mapping, not {_kind_name(value)}")
            return None
        out = cast(dict[str, Any], value)
        if allowed is not None:
            for key in out:
                if key not in allowed:
                    self.issue(
                        (*path, key),
                        f"unknown key {key!r}; expected one of: {', '.join(allowed)}{_did_you_mean(key, allowed)}",
                    )
        return out

    def integer(self, value: object, path: Path, *, low: int, high: int | None = None) -> int | None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.issue(path, f"must be an integer, not {_kind_name(value)} ({value!r})")
            return None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            self.issue(path, f"must be {bound}, got {value}")
            return None
        return value

    def number(
        self, value: object, path: Path, *, low: float, strict_low: bool = False, high: float | None = None
    ) -> float | None:
        # YAML 1.1 reads `1e-5` (no dot) as a string: accept numeric text for number fields.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.issue(path, f"must be a number, not {_kind_name(value)} ({value!r})")
            return None
        number = float(value)
        if not math.isfinite(number) or number < low or (strict_low and number == low):
            self.issue(path, f"must be {'>' if strict_low else '>='} {low:g}, got {value}")
            return None
        if high is not None and number > high:
            self.issue(path, f"must be <= {high:g}, got {value}")
            return None
        return number

    def text(self, value: object, path: Path, *, required_nonempty: bool = True) -> str | None:
        if not isinstance(value, str):
            self.issue(path, f"must be a string, not {_kind_name(value)}")
            return None
        if required_nonempty and not value.strip():
            self.issue(path, "must not be empty")
            return None
        return value

    def choice(self, value: object, path: Path, choices: Sequence[str]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            shown = repr(value) if isinstance(value, str) else _kind_name(value)
            hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
            self.issue(path, f"{shown} is not valid; expected one of: {', '.join(choices)}{hint}")
            return None
        return value

    def duration(self, value: object, path: Path, *, allow_zero: bool) -> float | None:
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            text = value.strip()
            if _NUMBER.fullmatch(text):
                seconds = float(text)
            else:
                pos, total = 0, 0.0
                for match in _DURATION_PART.finditer(text):
                    if match.start() != pos:
                        break
                    total += float(match.group(1)) * _UNIT_S[match.group(2)]
                    pos = match.end()
                if pos == len(text) and pos > 0:
                    seconds = total
        if seconds is None:
            self.issue(
                path,
                f"{value!r} is not a duration: use seconds (30) or a number with units ms, s, m, h, d "
                "(30s, 10m, 24h, 1d, 1h30m)",
            )
            return None
        if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
            self.issue(path, f"must be {'>= 0' if allow_zero else 'greater than 0'}, got {value!r}")
            return None
        if seconds > MAX_DURATION_S:
            self.issue(path, f"{value!r} is longer than the limit of 366 days")
            return None
        return seconds

    def labels(self, value: object, path: Path) -> dict[str, str] | None:
        if value is None:
            return {}
        mapping = self.mapping(value, path)
        if mapping is None:
            return None
        out: dict[str, str] = {}
        ok = True
        for key, item in mapping.items():
            if not LABEL_KEY_RE.fullmatch(key):
                self.issue(
                    (*path, key),
                    f"{key!r} is not a valid label key (letters, digits, '.', '_', '/', '-'; at most 63 characters)",
                )
                ok = False
            elif isinstance(item, bool):
                out[key] = "true" if item else "false"
            elif isinstance(item, str | int):
                text = str(item)
                if len(text) > 256:
                    self.issue((*path, key), "label values are at most 256 characters")
                    ok = False
                out[key] = text
            else:
                self.issue((*path, key), f"label values must be strings, not {_kind_name(item)}")
                ok = False
        return out if ok else None

    # -- the schema ------------------------------------------------------------------------------------

    def pipeline(self, doc: object) -> PipelineSpec | None:
        if doc is None:
            self.issue((), "the document is empty")
            return None
        root = self.mapping(doc, (), allowed=TOP_KEYS)
        if root is None:
            return None
        name: str | None = None
        if "name" not in root:
            self.issue(("name",), "required: the pipeline's name ([a-z0-9][a-z0-9-]{0,62})")
        else:
            name = self.text(root["name"], ("name",))
            if name is not None and not PIPELINE_NAME_RE.fullmatch(name):
                self.issue(
                    ("name",),
                    f"{name!r} is not a valid pipeline name: use lowercase letters, digits and '-', starting with a "
                    "letter or digit, at most 63 characters",
                )
                name = None
        labels = self.labels(root.get("labels"), ("labels",))
        priority = 0
        if "priority" in root:
            priority = self.integer(root["priority"], ("priority",), low=-MAX_PRIORITY, high=MAX_PRIORITY) or 0
        defaults = self.defaults(root.get("defaults"))
        stages = self.stages(root, defaults)
        if name is None or labels is None or stages is None or self.issues:
            return None
        return PipelineSpec(name=name, labels=labels, priority=priority, stages=stages)

    def defaults(self, value: object) -> _Partial:
        out = _Partial()
        if value is None:
            return out
        path: Path = ("defaults",)
        mapping = self.mapping(value, path, allowed=DEFAULTS_KEYS)
        if mapping is None:
            return out
        if "retry" in mapping:
            out.retry = self.retry(mapping["retry"], (*path, "retry")) or {}
            self.retry_consistency(out.retry, (*path, "retry"))
        if mapping.get("timeout") is not None:
            out.timeout_s = self.duration(mapping["timeout"], (*path, "timeout"), allow_zero=False)
        if "resources" in mapping:
            out.resources = self.resources(mapping["resources"], (*path, "resources")) or {}
        if "priority" in mapping:
            out.priority = self.integer(mapping["priority"], (*path, "priority"), low=-MAX_PRIORITY, high=MAX_PRIORITY)
        return out

    def retry(self, value: object, path: Path) -> dict[str, Any] | None:
        mapping = self.mapping(value, path, allowed=RETRY_KEYS)
        if mapping is None:
            return None
        out: dict[str, Any] = {}
        if "max_attempts" in mapping:
            out["max_attempts"] = self.integer(mapping["max_attempts"], (*path, "max_attempts"), low=1, high=100)
        if "backoff" in mapping:
            out["backoff"] = self.choice(mapping["backoff"], (*path, "backoff"), BACKOFF_VALUES)
        if "initial_delay" in mapping:
            out["initial_delay_s"] = self.duration(mapping["initial_delay"], (*path, "initial_delay"), allow_zero=True)
        if "max_delay" in mapping:
            out["max_delay_s"] = self.duration(mapping["max_delay"], (*path, "max_delay"), allow_zero=True)
        if "jitter" in mapping:
            out["jitter"] = self.choice(mapping["jitter"], (*path, "jitter"), JITTER_VALUES)
        if "retry_on" in mapping:
            raw = mapping["retry_on"]
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list):
                self.issue((*path, "retry_on"), f"must be a list of failure classes, not {_kind_name(raw)}")
                out["retry_on"] = None
            else:
                classes: list[str] = []
                for i, item in enumerate(cast(list[object], raw)):
                    got = self.choice(item, (*path, "retry_on", i), FAILURE_CLASSES)
                    if got is not None and got not in classes:
                        classes.append(got)
                out["retry_on"] = tuple(classes)
        return {k: v for k, v in out.items() if v is not None}

    def retry_consistency(self, merged: Mapping[str, Any], path: Path) -> bool:
        initial, maximum = merged.get("initial_delay_s"), merged.get("max_delay_s")
        if initial is not None and maximum is not None and initial > maximum:
            self.issue(
                (*path, "initial_delay"),
                f"initial_delay ({initial:g}s) must not exceed max_delay ({maximum:g}s)",
            )
            return False
        return True

    def resources(self, value: object, path: Path) -> dict[str, Any] | None:
        mapping = self.mapping(value, path, allowed=RESOURCE_KEYS)
        if mapping is None:
            return None
        out: dict[str, Any] = {}
        if "gpus" in mapping:
            out["gpus"] = self.integer(mapping["gpus"], (*path, "gpus"), low=0, high=4096)
        if "gpu_memory_gb" in mapping:
            out["gpu_memory_gb"] = self.number(mapping["gpu_memory_gb"], (*path, "gpu_memory_gb"), low=0, high=1e6)
        if "cpu_slots" in mapping:
            out["cpu_slots"] = self.integer(mapping["cpu_slots"], (*path, "cpu_slots"), low=1, high=1_000_000)
        if "labels" in mapping:
            out["labels"] = self.labels(mapping["labels"], (*path, "labels"))
        return {k: v for k, v in out.items() if v is not None}

    def stages(self, root: Mapping[str, Any], defaults: _Partial) -> dict[str, StageSpec] | None:
        if "stages" not in root:
            self.issue(("stages",), "required: at least one stage")
            return None
        mapping = self.mapping(root["stages"], ("stages",))
        if mapping is None:
            return None
        if not mapping:
            self.issue(("stages",), "at least one stage is required")
            return None
        if len(mapping) > MAX_STAGES:
            self.issue(("stages",), f"{len(mapping)} stages; the limit is {MAX_STAGES}")
            return None
        out: dict[str, StageSpec] = {}
        needs: dict[str, tuple[str, ...]] = {}
        for name, body in mapping.items():
            path: Path = ("stages", name)
            if not STAGE_NAME_RE.fullmatch(name):
                self.issue(
                    path,
                    f"{name!r} is not a valid stage name: use lowercase letters, digits, '_' and '-', starting with a "
                    "letter or digit, at most 63 characters",
                )
                continue
            stage, needs[name] = self.stage(name, body, path, defaults)
            if stage is not None:
                out[name] = stage
        # Edges are checked once every name is known.
        names = list(mapping)
        for name, deps in needs.items():
            for i, dep in enumerate(deps):
                if dep == name:
                    self.issue(("stages", name, "needs", i), f"stage {name!r} needs itself")
                elif dep not in mapping:
                    self.issue(
                        ("stages", name, "needs", i),
                        f"unknown stage {dep!r}; stages are: {', '.join(names)}{_did_you_mean(dep, names)}",
                    )
        acyclic = {n: tuple(d for d in deps if d != n and d in needs) for n, deps in needs.items()}
        reported: set[str] = set()
        while (cycle := find_cycle({n: d for n, d in acyclic.items() if n not in reported})) is not None:
            spelled = ", ".join(f"{a} needs {b}" for a, b in itertools.pairwise(cycle))
            self.issue(("stages", cycle[0], "needs"), f"dependency cycle: {' -> '.join(cycle)} ({spelled})")
            reported.update(cycle)
        return out

    def stage(
        self, name: str, body: object, path: Path, defaults: _Partial
    ) -> tuple[StageSpec | None, tuple[str, ...]]:
        """The normalised stage (None when it has issues) and its `needs` (checked by the caller)."""
        if body is None:
            self.issue(path, f"stage {name!r} is empty: it needs at least `kind`")
            return None, ()
        mapping = self.mapping(body, path, allowed=STAGE_KEYS)
        if mapping is None:
            return None, ()
        before = len(self.issues)
        kind: str | None = None
        if "kind" not in mapping:
            self.issue((*path, "kind"), f"required: one of {', '.join(STAGE_KINDS)}")
        else:
            kind = self.choice(mapping["kind"], (*path, "kind"), STAGE_KINDS)
        needs: list[str] = []
        raw_needs = mapping.get("needs")
        if isinstance(raw_needs, str):
            raw_needs = [raw_needs]
        if raw_needs is not None:
            if not isinstance(raw_needs, list):
                self.issue((*path, "needs"), f"must be a list of stage names, not {_kind_name(raw_needs)}")
            else:
                for i, dep in enumerate(cast(list[object], raw_needs)):
                    got = self.text(dep, (*path, "needs", i))
                    if got is not None and got not in needs:
                        needs.append(got)
        when = "on_success"
        if "when" in mapping:
            when = self.choice(mapping["when"], (*path, "when"), WHEN_VALUES) or when
        retry_partial = dict(defaults.retry)
        if "retry" in mapping:
            retry_partial.update(self.retry(mapping["retry"], (*path, "retry")) or {})
            self.retry_consistency(retry_partial, (*path, "retry"))
        timeout_s = defaults.timeout_s
        if mapping.get("timeout") is not None:
            timeout_s = self.duration(mapping["timeout"], (*path, "timeout"), allow_zero=False)
        resources_partial = dict(defaults.resources)
        if "resources" in mapping:
            own = self.resources(mapping["resources"], (*path, "resources")) or {}
            # Labels merge key by key (the stage wins); other fields replace.
            if "labels" in own and "labels" in resources_partial:
                own["labels"] = {**resources_partial["labels"], **own["labels"]}
            resources_partial.update(own)
        priority = defaults.priority or 0
        if "priority" in mapping:
            priority = self.integer(mapping["priority"], (*path, "priority"), low=-MAX_PRIORITY, high=MAX_PRIORITY) or 0
        params: dict[str, Any] = {}
        raw_with = mapping.get("with")
        if raw_with is not None:
            params = self.mapping(raw_with, (*path, "with")) or {}
        if kind is not None:
            params = self.params(kind, dict(params), (*path, "with"))
        if len(self.issues) > before or kind is None:
            return None, tuple(needs)
        spec = StageSpec(
            kind=cast(Any, kind),
            needs=tuple(needs),
            when=cast(Any, when),
            retry=RetryPolicy(**retry_partial),
            timeout_s=timeout_s,
            resources=Resources(**resources_partial),
            priority=priority,
            params=params,
        )
        return spec, spec.needs

    def params(self, kind: str, params: dict[str, Any], path: Path) -> dict[str, Any]:
        """Kind-specific checks of `with:`: only the keys the kind reads (`spec.WITH_KEYS`) or `x-` ones."""
        known = sorted(WITH_KEYS.get(kind, ()))
        for key in params:
            if key not in known and not key.startswith(WITH_EXTENSION_PREFIX):
                # The agent would ignore the key, so a misspelt one would silently change nothing.
                self.issue(
                    (*path, key),
                    f"stage {path[1]!r}: unknown key `with.{key}` for a {kind} stage; known keys: "
                    f"{', '.join(known)}{_did_you_mean(key, known)}",
                )
        if kind == "noop":
            if "sleep_ms" in params:
                self.integer(params["sleep_ms"], (*path, "sleep_ms"), low=0, high=86_400_000)
        elif kind == "command":
            self.command(params, path)
        elif kind == "train":
            self.train(params, path)
        elif kind == "preprocess":
            if "dataset" not in params:
                self.issue((*path, "dataset"), "required: a pushed dataset's name, or an absolute path on the host")
            else:
                self.text(params["dataset"], (*path, "dataset"))
            if "format" in params:
                self.text(params["format"], (*path, "format"))
            if "val_fraction" in params:
                got = self.number(params["val_fraction"], (*path, "val_fraction"), low=0, high=0.99)
                if got is not None:
                    params["val_fraction"] = got
            if params.get("tokenizer") is not None:
                self.tokenizer(params["tokenizer"], (*path, "tokenizer"))
        elif kind == "cleanup" and "keep_last" in params:
            self.integer(params["keep_last"], (*path, "keep_last"), low=0)
        return params

    def tokenizer(self, value: object, path: Path) -> None:
        """A folder on the agent's host, as the agent's preprocess takes it: an absolute path without `..`.

        The agent loads no hub ids (`org/name`) and resolves no relative paths here (its working folder
        is the attempt's own), so both would only fail once the stage ran; they are refused at submission.
        """
        text = self.text(value, path)
        if text is None:
            return
        if not text.startswith("/"):
            self.issue(
                path,
                f"must be an absolute path to a model or tokenizer folder on the agent's host, not {text!r} "
                "(relative paths and hub ids are not resolved)",
            )
        elif ".." in PurePosixPath(text).parts:
            self.issue(path, f"must not contain `..`: {text!r}")

    def command(self, params: dict[str, Any], path: Path) -> None:
        run = params.get("run")
        at: Path = (*path, "run")
        if "run" not in params:
            self.issue(at, "required: the command as a list of arguments, e.g. [python, script.py]")
        elif isinstance(run, str):
            self.issue(at, "must be a list of arguments (there is no shell), e.g. [python, script.py]")
        elif not isinstance(run, list) or not run:
            self.issue(at, "must be a non-empty list of arguments")
        else:
            for i, arg in enumerate(cast(list[object], run)):
                if not isinstance(arg, str):
                    self.issue((*at, i), f"arguments must be strings, not {_kind_name(arg)} (quote it)")
            if isinstance(run[0], str) and not run[0].strip():
                self.issue((*at, 0), "the program must not be empty")

    def train(self, params: dict[str, Any], path: Path) -> None:
        algorithm = params.setdefault("algorithm", "sft")
        self.choice(algorithm, (*path, "algorithm"), TRAIN_ALGORITHMS)
        if "model" not in params:
            self.issue((*path, "model"), "required: a local path on the host, or a model id the host can load")
        else:
            self.text(params["model"], (*path, "model"))
        for key in ("epochs", "batch_size"):
            if key in params:
                self.integer(params[key], (*path, key), low=1)
        if "save_every" in params:
            self.integer(params["save_every"], (*path, "save_every"), low=0)
        if "lr" in params:
            lr = self.number(params["lr"], (*path, "lr"), low=0, strict_low=True)
            if lr is not None:
                params["lr"] = lr
        if params.get("lora") is not None:
            lora = self.mapping(params["lora"], (*path, "lora"))
            if lora is not None:
                if "rank" in lora:
                    self.integer(lora["rank"], (*path, "lora", "rank"), low=1)
                if "alpha" in lora:
                    self.number(lora["alpha"], (*path, "lora", "alpha"), low=0, strict_low=True)
        if params.get("overrides") is not None:
            overrides = self.mapping(params["overrides"], (*path, "overrides"))
            for key, value in (overrides or {}).items():
                at: Path = (*path, "overrides", key)
                if not OVERRIDE_KEY_RE.fullmatch(key):
                    self.issue(at, f"{key!r} is not a valid override key (dotted names like trainer.save_freq)")
                elif isinstance(value, dict):
                    self.issue(at, "override values must be scalars or lists, not mappings (use dotted keys)")


class _Partial:
    """`defaults:` once validated: the normalised fields it sets (stages fill in the rest)."""

    def __init__(self) -> None:
        self.retry: dict[str, Any] = {}
        self.timeout_s: float | None = None
        self.resources: dict[str, Any] = {}
        self.priority: int | None = None
