"""Mongo-style metadata filters: validation, an exact Python evaluator, and SQL compilation.

Semantics (identical in Python and SQL): keys are dotted paths into the metadata; `$eq`, `$ne`,
`$in`, `$nin` compare strings, numbers and booleans by kind (a boolean never equals a number);
`$gt/$gte/$lt/$lte` take a number or a string and match only stored values of that kind;
`$ne` and `$nin` also match records that lack the field; `$exists` tests presence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from memlayer.errors import InvalidInputError
from memlayer.types import check_unicode

COMPARISONS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$exists")
LOGICAL = ("$and", "$or")
_MAX_SAFE_INT = 2**53
_MISSING = object()

Filter = Mapping[str, Any]


def validate(filters: Filter | None, field: str = "filters") -> None:
    """Raise InvalidInputError naming the offending path when `filters` is malformed."""
    if filters is None:
        return
    if not isinstance(filters, Mapping):
        raise InvalidInputError(field, "must be a dict", filters)
    for key, value in filters.items():
        where = f"{field}.{key}"
        if not isinstance(key, str) or not key:
            raise InvalidInputError(field, "keys must be non-empty strings", key)
        check_unicode(key, field)
        if key in LOGICAL:
            if not isinstance(value, list) or not value:
                raise InvalidInputError(where, "must be a non-empty list of filters", value)
            for index, sub in enumerate(value):
                validate(sub, f"{where}[{index}]")
        elif key.startswith("$"):
            raise InvalidInputError(
                where, f"unknown operator; allowed: {', '.join(LOGICAL + COMPARISONS)}"
            )
        else:
            _validate_path(key, where)
            _validate_condition(value, where)


def matches(filters: Filter | None, metadata: Mapping[str, Any]) -> bool:
    """True when `metadata` satisfies `filters` (the reference semantics)."""
    if not filters:
        return True
    for key, value in filters.items():
        if key == "$and":
            ok = all(matches(sub, metadata) for sub in value)
        elif key == "$or":
            ok = any(matches(sub, metadata) for sub in value)
        else:
            ok = _field_matches(_lookup(metadata, key), value)
        if not ok:
            return False
    return True


def to_sql(
    filters: Filter | None, column: Any, dialect: str, indexed: frozenset[str] = frozenset()
) -> Any:
    """A SQLAlchemy boolean expression equal to `matches` on the JSON `column`. On
    PostgreSQL an equality on an `indexed` path is written as the covering filter index's
    expression (`column #> '{path}' = value`), so the index can answer it."""
    from sqlalchemy import and_, or_, true

    if not filters:
        return true()
    parts = []
    for key, value in filters.items():
        if key == "$and":
            parts.append(and_(*(to_sql(sub, column, dialect, indexed) for sub in value)))
        elif key == "$or":
            parts.append(or_(*(to_sql(sub, column, dialect, indexed) for sub in value)))
        else:
            parts.append(_field_sql(_json_field(column, key, dialect, key in indexed), value))
    return and_(*parts)


def path_expression(path: str) -> str:
    """PostgreSQL SQL of the JSON at `path` of the metadata column, as a filter index and
    the filters on its path both write it (`path` is a validated `pg_filter_keys` entry)."""
    return "metadata #> '{" + ",".join(path.split(".")) + "}'::text[]"


def _validate_path(key: str, where: str) -> None:
    if any(not part for part in key.split(".")) or '"' in key or "\\" in key:
        raise InvalidInputError(where, "field paths are dot-separated names without quotes")


def _validate_condition(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        _check_scalar(value, where)
        return
    if not value:
        raise InvalidInputError(where, "an operator dict must not be empty")
    for op, operand in value.items():
        at = f"{where}.{op}"
        if op not in COMPARISONS:
            raise InvalidInputError(at, f"unknown operator; allowed: {', '.join(COMPARISONS)}")
        if op in ("$in", "$nin"):
            if not isinstance(operand, list):
                raise InvalidInputError(at, "must be a list of strings, numbers or booleans")
            for item in operand:
                _check_scalar(item, at)
        elif op == "$exists":
            if not isinstance(operand, bool):
                raise InvalidInputError(at, "must be true or false", operand)
        elif op in ("$eq", "$ne"):
            _check_scalar(operand, at)
        else:
            if isinstance(operand, bool) or not isinstance(operand, (int, float, str)):
                raise InvalidInputError(at, "must be a number or a string", operand)
            _check_scalar(operand, at)


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, str):
        check_unicode(value, where)
        return
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) >= _MAX_SAFE_INT:
            raise InvalidInputError(where, "integers must be below 2**53 in size", value)
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError(where, "numbers must be finite", value)
        return
    raise InvalidInputError(where, "must be a string, a number or a boolean", value)


def _lookup(metadata: Mapping[str, Any], path: str) -> Any:
    node: Any = metadata
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _kind(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _equal(stored: Any, operand: Any) -> bool:
    return _kind(stored) == _kind(operand) and stored == operand


def _field_matches(stored: Any, condition: Any) -> bool:
    if not isinstance(condition, Mapping):
        return _equal(stored, condition)
    for op, operand in condition.items():
        if op == "$eq":
            ok = _equal(stored, operand)
        elif op == "$ne":
            ok = not _equal(stored, operand)
        elif op == "$in":
            ok = any(_equal(stored, item) for item in operand)
        elif op == "$nin":
            ok = not any(_equal(stored, item) for item in operand)
        elif op == "$exists":
            ok = (stored is not _MISSING) == operand
        else:
            ok = _kind(stored) == _kind(operand) and _ORDER[op](stored, operand)
        if not ok:
            return False
    return True


_ORDER = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


class _JsonField:
    """The kind and value of one JSON path in SQL, for one dialect."""

    def __init__(self, kind: Any, text: Any, number: Any, equals: Any = None):
        self.kind = kind  # 'number' | 'string' | 'true' | 'false' | 'null' | ...; NULL if missing
        self.text = text
        self.number = number
        # PostgreSQL: operand -> the path equals it, as containment `column @> {path:
        # operand}` (exact for a scalar under at least one key: jsonb compares types, and an
        # array holds a scalar only at the top level): a GIN index answers it, and the
        # planner estimates it from the column's statistics, so it weighs GIN against HNSW
        self.equals = equals


def _json_field(column: Any, path: str, dialect: str, indexed: bool = False) -> _JsonField:
    from sqlalchemy import Numeric, case, cast, func

    parts = path.split(".")
    if dialect == "sqlite":
        json_path = "$" + "".join(f'."{part}"' for part in parts)
        raw_kind = func.json_type(column, json_path)
        kind = case(
            (raw_kind.in_(["integer", "real"]), "number"),
            (raw_kind == "text", "string"),
            (raw_kind == "true", "true"),
            (raw_kind == "false", "false"),
            else_=raw_kind,
        )
        value = func.json_extract(column, json_path)
        return _JsonField(kind, value, value)
    if dialect == "postgresql":
        from sqlalchemy import Text, literal
        from sqlalchemy.dialects.postgresql import ARRAY

        pg_path = literal(parts, ARRAY(Text))  # bound: a key never becomes SQL
        node = column.op("#>")(pg_path)
        raw_kind = func.jsonb_typeof(node)
        text = column.op("#>>")(pg_path)
        kind = case(
            (raw_kind == "boolean", text),  # 'true' / 'false'
            else_=raw_kind,
        )
        number = case((raw_kind == "number", cast(text, Numeric)), else_=None)

        def equals(operand: Any) -> Any:
            from sqlalchemy import and_, literal_column
            from sqlalchemy.dialects.postgresql import JSONB

            value = cast(literal(json.dumps(operand), Text), JSONB)
            if indexed:  # jsonb equality: as exact as containment for a scalar operand,
                # false (not NULL) where the path is missing, so a negation holds there
                node = literal_column(path_expression(path), JSONB)
                return and_(node.is_not(None), node == value)
            nested: Any = operand
            for part in reversed(parts):
                nested = {part: nested}
            return column.bool_op("@>")(cast(literal(json.dumps(nested), Text), JSONB))

        return _JsonField(kind, text, number, equals)
    raise InvalidInputError("url", "metadata filters support SQLite and PostgreSQL", dialect)


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "number" if isinstance(value, (int, float)) else "string"


def _eq_sql(field: _JsonField, operand: Any) -> Any:
    from sqlalchemy import and_

    if field.equals is not None:
        return field.equals(operand)
    kind = _kind_name(operand)
    if kind in ("true", "false"):
        return and_(field.kind.is_not(None), field.kind == kind)
    target = field.number if kind == "number" else field.text
    return and_(field.kind.is_not(None), field.kind == kind, target == operand)


def _field_sql(field: _JsonField, condition: Any) -> Any:
    from sqlalchemy import and_, false, not_, or_

    if not isinstance(condition, Mapping):
        return _eq_sql(field, condition)
    parts = []
    for op, operand in condition.items():
        if op == "$eq":
            parts.append(_eq_sql(field, operand))
        elif op == "$ne":
            parts.append(not_(_eq_sql(field, operand)))
        elif op == "$in":
            parts.append(or_(false(), *(_eq_sql(field, item) for item in operand)))
        elif op == "$nin":
            parts.append(not_(or_(false(), *(_eq_sql(field, item) for item in operand))))
        elif op == "$exists":
            parts.append(field.kind.is_not(None) if operand else field.kind.is_(None))
        else:
            kind = _kind_name(operand)
            target = field.number if kind == "number" else field.text
            compare = {
                "$gt": target > operand,
                "$gte": target >= operand,
                "$lt": target < operand,
                "$lte": target <= operand,
            }[op]
            parts.append(and_(field.kind.is_not(None), field.kind == kind, compare))
    return and_(*parts)
