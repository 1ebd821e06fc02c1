"""The platform's ready-made score queries: DuckDB table macros kept in the analytics database.

The macros live in `score_queries.sql` next to this module, so the SQL is read and reviewed as SQL; each
macro's leading comment is its description, listed by `describe_macros` for the CLI. They are stored in the
database file itself, so any DuckDB client that opens it (read-only included) can call them:
`SELECT * FROM score_histogram('reward_model', 'v3', bins := 40)`.

DuckDB binds a macro's body when the macro is created, so the views it reads (`scores`, `subsets`) must
exist by then; after that the views can be replaced freely, as the macros resolve them at each call.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import duckdb

from ca_platform.analytics.sql_literals import sql_string_literal

SQL_FILE = "score_queries.sql"
_CREATE = re.compile(r"CREATE\s+OR\s+REPLACE\s+MACRO\s+(\w+)\s*\(([^()]*)\)\s+AS\s+TABLE\b", re.IGNORECASE)


@dataclass(frozen=True)
class Macro:
    name: str
    parameters: str  # as written in the SQL, defaults included: "scorer_name, version, bins := 20"
    description: str
    sql: str  # the CREATE OR REPLACE MACRO statement, without its trailing semicolon

    @property
    def signature(self) -> str:
        return f"{self.name}({self.parameters})"

    @property
    def comment(self) -> str:
        """The database comment: the description, then a digest of the SQL so a changed body is noticed."""
        return f"{self.description} [sql {hashlib.sha256(self.sql.encode()).hexdigest()[:12]}]"


def parse_macros(text: str, source: str = SQL_FILE) -> tuple[Macro, ...]:
    """Every macro of a SQL file in the format `score_queries.sql` describes, in file order."""
    macros: list[Macro] = []
    comments: list[str] = []
    statement: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not statement:
            if stripped.startswith("--"):
                comments.append(stripped.removeprefix("--").strip())
                continue
            if not stripped:
                comments = []
                continue
            start = number
        statement.append(line)
        if stripped.endswith(";"):
            sql = "\n".join(statement).rstrip().removesuffix(";")
            match = _CREATE.match(sql.lstrip())
            if match is None:
                raise ValueError(f"{source}:{start}: expected `CREATE OR REPLACE MACRO name(...) AS TABLE`")
            if not comments:
                raise ValueError(f"{source}:{start}: macro {match[1]} has no comment line saying what it returns")
            parameters = " ".join(match[2].split())
            macros.append(Macro(match[1], parameters, " ".join(comments), sql))
            comments, statement = [], []
    if statement:
        raise ValueError(f"{source}:{start}: statement not ended with `;`")
    names = [m.name for m in macros]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: a macro is defined twice: {sorted(n for n in names if names.count(n) > 1)}")
    return tuple(macros)


MACROS: tuple[Macro, ...] = parse_macros(resources.files(__package__).joinpath(SQL_FILE).read_text("utf-8"))


def describe_macros() -> list[tuple[str, str, str]]:
    """(name, signature, description) of every macro, for listing."""
    return [(m.name, m.signature, m.description) for m in MACROS]


def stale_macros(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Names of the macros missing from the database or installed from a different SQL text."""
    installed = dict(
        con.execute(
            "SELECT function_name, comment FROM duckdb_functions() "
            "WHERE function_type = 'table_macro' AND NOT internal AND database_name = current_database()"
        ).fetchall()
    )
    return [m.name for m in MACROS if installed.get(m.name) != m.comment]


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create or replace every macro in one transaction; the views `scores` and `subsets` must exist."""
    con.execute("BEGIN TRANSACTION")
    try:
        for macro in MACROS:
            try:
                con.execute(macro.sql)
            except duckdb.Error as err:
                raise RuntimeError(f"{SQL_FILE}: could not create macro {macro.signature}: {err}") from err
            con.execute(f"COMMENT ON MACRO TABLE {macro.name} IS {sql_string_literal(macro.comment)}")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
