"""SQL string literals, for the few statements DuckDB cannot prepare with parameters.

`CREATE VIEW` bodies and `COMMENT ON` cannot take `?` parameters, yet they hold paths and text from outside
(a data root such as `/data/it's here/`). Everywhere else values are bound as parameters.
"""

from __future__ import annotations


def sql_string_literal(value: str) -> str:
    """`value` as a SQL string literal: quoted, with every `'` doubled (the only escape standard SQL knows)."""
    return "'" + value.replace("'", "''") + "'"
