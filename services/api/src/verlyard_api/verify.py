"""Pure core: compare a replay of the log with the stored read models, field by field (`replay --verify`)."""

from __future__ import annotations

from typing import Any, Literal, cast

import msgspec

from verlyard_api.projector import Projection


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """One way the stored read model differs from a replay of the log."""

    kind: Literal["pipeline", "token"]
    id: str
    field: str
    """Dotted path of the field (`stages.train.attempts[0].status`); "" when the whole row is missing/extra."""
    expected: Any
    """The value the replay computes (null when the row should not exist)."""
    found: Any
    """The value stored (null when the row is missing)."""


def compare(expected: Projection, found: Projection) -> list[Difference]:
    """Every difference between a replayed projection and the stored one, pipelines then tokens."""
    out: list[Difference] = []
    for pid in sorted(expected.pipelines.keys() | found.pipelines.keys()):
        want, got = expected.pipelines.get(pid), found.pipelines.get(pid)
        if want is None or got is None:
            out.append(Difference(kind="pipeline", id=pid, field="", expected=_plain(want), found=_plain(got)))
            continue
        _compare_values("pipeline", pid, "", _plain(want), _plain(got), out)
    for tid in sorted(expected.tokens.keys() | found.tokens.keys()):
        want_t, got_t = expected.tokens.get(tid), found.tokens.get(tid)
        if want_t is None or got_t is None:
            out.append(Difference(kind="token", id=tid, field="", expected=_plain(want_t), found=_plain(got_t)))
            continue
        _compare_values("token", tid, "", _plain(want_t), _plain(got_t), out)
    return out


def _plain(value: msgspec.Struct | None) -> Any:
    """JSON data (lists, ISO times) as the report shows it."""
    return None if value is None else msgspec.json.decode(msgspec.json.encode(value))


def _compare_values(
    kind: Literal["pipeline", "token"], ident: str, path: str, want: Any, got: Any, out: list[Difference]
) -> None:
    if want == got:
        return
    # Recurse into the pipeline, its stages and each stage (`stages.<name>.<field>`), not deeper.
    if isinstance(want, dict) and isinstance(got, dict) and path.count(".") < 2:
        a = cast(dict[str, Any], want)
        b = cast(dict[str, Any], got)
        for key in [*a, *(k for k in b if k not in a)]:
            _compare_values(kind, ident, f"{path}.{key}" if path else key, a.get(key), b.get(key), out)
        return
    if isinstance(want, list) and isinstance(got, list) and path.endswith("attempts"):
        wants = cast(list[Any], want)
        gots = cast(list[Any], got)
        for index in range(max(len(wants), len(gots))):
            a_item: Any = wants[index] if index < len(wants) else None
            b_item: Any = gots[index] if index < len(gots) else None
            if isinstance(a_item, dict) and isinstance(b_item, dict):
                a = cast(dict[str, Any], a_item)
                b = cast(dict[str, Any], b_item)
                for key in [*a, *(k for k in b if k not in a)]:
                    _compare_values(kind, ident, f"{path}[{index}].{key}", a.get(key), b.get(key), out)
            elif a_item != b_item:
                out.append(Difference(kind=kind, id=ident, field=f"{path}[{index}]", expected=a_item, found=b_item))
        return
    out.append(Difference(kind=kind, id=ident, field=path, expected=want, found=got))
