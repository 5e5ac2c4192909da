"""Testing: build a sample instance of any contract Struct by filling each field from its type."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)

FIXED_TIME = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def _value(t: msgspec.inspect.Type) -> Any:
    match t:
        case msgspec.inspect.StrType():
            return "sample"
        case msgspec.inspect.BoolType():
            return True
        case msgspec.inspect.IntType():
            return 7
        case msgspec.inspect.FloatType():
            return 1.5
        case msgspec.inspect.DateTimeType():
            return FIXED_TIME
        case msgspec.inspect.LiteralType():
            return t.values[0]
        case msgspec.inspect.UnionType():
            non_none = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
            return _value(non_none[0])
        case msgspec.inspect.VarTupleType() | msgspec.inspect.ListType():
            return (_value(t.item_type),) if not isinstance(t, msgspec.inspect.ListType) else [_value(t.item_type)]
        case msgspec.inspect.DictType():
            return {"k": _value(t.value_type)}
        case msgspec.inspect.StructType():
            return sample(t.cls)
        case msgspec.inspect.AnyType():
            return {"any": [1, "two"]}
        case _:
            raise TypeError(f"no sample for {t!r}")


def sample(cls: type[T]) -> T:
    """An instance of `cls` with every field (required or not) set to a non-default sample value."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return cls(**{f.name: _value(f.type) for f in info.fields})
