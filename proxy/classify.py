"""Statement facts from SQL text, without a full parse.

A small hand lexer (comments, strings, quoted identifiers, words) finds the
first keyword, the tables a statement names, comment tags and locking
clauses.  Results are cached by statement text.  It is built to err on the
side of safety for the cut-over gate: when it cannot tell which tables a
statement touches (``CALL``, ``EXECUTE``, a lexing surprise) ``tables`` is
``None``, which the gate treats as "may touch any table".  Naming a table the
statement does not really touch (``EXTRACT(YEAR FROM d)``) only costs an
unneeded wait during a hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum

Table = tuple[str | None, str]  # (schema or None for the session's, table), lower case


class Kind(Enum):
    READ = "read"
    WRITE = "write"
    DDL = "ddl"
    TRANSACTION = "transaction"
    SESSION = "session"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Facts:
    kind: Kind
    keyword: str
    #: tables named by the statement; None when they cannot be determined
    tables: tuple[Table, ...] | None
    tags: dict[str, str] = field(default_factory=dict)
    locking: bool = False  # SELECT ... FOR UPDATE / LOCK IN SHARE MODE / FOR SHARE
    #: must run on the primary whatever the rules say (locks, session state, ...)
    primary_only: bool = False
    multi: bool = False
    #: the statement with its literals as ``?`` (comments and identifiers kept):
    #: statements differing only in literals share it, and their facts
    shape: bytes = b""
    #: every ``name(`` / ``schema.name(`` in the statement: built-in functions,
    #: stored functions and a few look-alikes (``INSERT INTO t(a)``).  The gate
    #: matches them against the stored functions that reach a held table.
    calls: tuple[Table, ...] = ()

    def resolved(self, schema: str | None) -> frozenset[str] | None:
        """``schema.table`` names with the session's schema filled in."""
        if self.tables is None:
            return None
        default = (schema or "").lower()
        return frozenset(f"{s or default}.{t}" for s, t in self.tables)

    def reach(self, schema: str | None) -> frozenset[str] | None:
        """What a cut-over hold compares: the tables plus ``schema.function`` of every call."""
        if self.tables is None:
            return None
        default = (schema or "").lower()
        return frozenset(f"{s or default}.{t}" for s, t in (*self.tables, *self.calls))


_KINDS = {
    "SELECT": Kind.READ, "WITH": Kind.READ, "SHOW": Kind.READ, "DESCRIBE": Kind.READ,
    "DESC": Kind.READ, "EXPLAIN": Kind.READ, "HELP": Kind.READ, "VALUES": Kind.READ,
    "TABLE": Kind.READ, "CHECKSUM": Kind.READ,
    "INSERT": Kind.WRITE, "UPDATE": Kind.WRITE, "DELETE": Kind.WRITE, "REPLACE": Kind.WRITE,
    "LOAD": Kind.WRITE, "CALL": Kind.WRITE, "DO": Kind.WRITE, "HANDLER": Kind.WRITE,
    "CREATE": Kind.DDL, "ALTER": Kind.DDL, "DROP": Kind.DDL, "RENAME": Kind.DDL,
    "TRUNCATE": Kind.DDL, "GRANT": Kind.DDL, "REVOKE": Kind.DDL, "ANALYZE": Kind.DDL,
    "OPTIMIZE": Kind.DDL, "REPAIR": Kind.DDL, "CHECK": Kind.DDL,
    "BEGIN": Kind.TRANSACTION, "START": Kind.TRANSACTION, "COMMIT": Kind.TRANSACTION,
    "ROLLBACK": Kind.TRANSACTION, "SAVEPOINT": Kind.TRANSACTION, "RELEASE": Kind.TRANSACTION,
    "XA": Kind.TRANSACTION, "LOCK": Kind.TRANSACTION, "UNLOCK": Kind.TRANSACTION,
    "SET": Kind.SESSION, "USE": Kind.SESSION, "PREPARE": Kind.SESSION,
    "DEALLOCATE": Kind.SESSION, "EXECUTE": Kind.SESSION, "FLUSH": Kind.OTHER,
}

#: keywords after which table names follow
_TABLE_KEYWORDS = frozenset({"FROM", "JOIN", "UPDATE", "INTO", "TABLE", "TABLES", "STRAIGHT_JOIN"})
#: after these a comma-separated list of tables may follow
_LIST_KEYWORDS = frozenset({"FROM", "UPDATE", "TABLE", "TABLES"})
#: words that can sit between a table keyword and the name
_SKIP_WORDS = frozenset({"IF", "NOT", "EXISTS", "IGNORE", "LOW_PRIORITY", "HIGH_PRIORITY",
                         "DELAYED", "QUICK", "ONLY", "TEMPORARY", "LATERAL", "TABLE"})
#: words after a table keyword that are not tables
_NOT_TABLES = frozenset({"DUAL", "OUTFILE", "DUMPFILE", "SELECT", "VALUES", "VALUE", "SET",
                         "WITH", "NOWAIT", "SKIP", "SHARE", "UPDATE", "ALL", "STATUS", "LOCAL"})
#: a table reference ends at these words (the next word is not an alias)
_CLAUSE_WORDS = frozenset({
    "WHERE", "SET", "ON", "USING", "JOIN", "INNER", "LEFT", "RIGHT", "CROSS", "NATURAL",
    "STRAIGHT_JOIN", "GROUP", "ORDER", "LIMIT", "HAVING", "UNION", "EXCEPT", "INTERSECT",
    "FOR", "LOCK", "WINDOW", "VALUES", "VALUE", "SELECT", "PARTITION", "FORCE", "USE",
    "IGNORE", "READ", "WRITE", "TO", "LIKE", "AS", "INTO", "FROM", "WITH", "RETURNING",
    "DEFAULT", "CHARACTER", "FIELDS", "COLUMNS", "LINES", "ENGINE", "ADD", "DROP",
    "MODIFY", "CHANGE", "RENAME", "ALGORITHM", "OUTER", "PROCEDURE", "DUPLICATE",
})
#: statements whose tables we cannot know from the text
_OPAQUE = frozenset({"CALL", "EXECUTE", "HANDLER", "DO"})
#: session-dependent functions: statements using them stay on the primary
_PRIMARY_FUNCTIONS = re.compile(
    rb"last_insert_id|get_lock|release_lock|is_used_lock|is_free_lock|found_rows|row_count"
    rb"|nextval|lastval|setval|connection_id|@@session|sql_calc_found_rows"
    rb"|@@identity|@@insert_id|@@last_gtid|warning_count|error_count",
    re.IGNORECASE,
)
_TAG = re.compile(r"([A-Za-z_][\w.-]*)\s*(?:[=:]\s*('(?:[^'\\]|\\.)*'|\"[^\"]*\"|[^\s,*/]+))?")


_TOKEN = re.compile(
    r"""
    \s+
    |(?P<comment>/\*.*?\*/)
    |(?P<line>(?:--(?=\s|$)|\#)[^\n]*)
    |(?P<word>[^\W\d][\w$]*|\$[\w$]*)
    |(?P<ident>`(?:[^`]|``)*`)
    |(?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
    |(?P<number>\d[\w.]*)
    |(?P<var>@[\w@.$]*)
    |(?P<punct>.)
    """,
    re.S | re.X,
)
_UNTERMINATED = frozenset({"'", '"', "`"})


class _Lexer:
    """Words (keywords and identifiers), quoted identifiers, punctuation.

    One compiled regex does the scanning (C speed); Python only sees tokens.
    """

    __slots__ = ("comments", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.comments: list[str] = []

    def tokens(self) -> list[tuple[str, str]]:
        """(type, value) with type in: word, ident (quoted), string, number, var, punct."""
        out: list[tuple[str, str]] = []
        append = out.append
        for match in _TOKEN.finditer(self.text):
            kind = match.lastgroup
            if kind is None:
                continue
            if kind == "word":
                append(("word", match.group()))
            elif kind == "punct":
                value = match.group()
                if value in _UNTERMINATED or (value == "/" and self.text.startswith("/*", match.start())):
                    raise ValueError("unterminated quote or comment")
                append(("punct", value))
            elif kind == "ident":
                append(("ident", match.group()[1:-1].replace("``", "`")))
            elif kind == "comment":
                body = match.group()[2:-2]
                if body.startswith("!") or body.startswith("M!"):
                    # Executable comment: its content is SQL for the server.
                    inner = body[2:] if body.startswith("M!") else body[1:]
                    out.extend(_Lexer(inner.lstrip("0123456789")).tokens())
                elif not body.startswith("+"):
                    self.comments.append(body)
            elif kind == "line":
                self.comments.append(match.group().lstrip("-#"))
            else:
                append((kind, match.group() if kind == "var" else ""))
        return out


def parse_tags(comments: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for comment in comments:
        for match in _TAG.finditer(comment):
            key, value = match.group(1), match.group(2)
            if value is None:
                continue
            if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) >= 2:
                value = value[1:-1]
            tags[key.lower()] = value
    return tags


def _statement_facts(tokens: list[tuple[str, str]], comments: list[str], multi: bool) -> Facts:
    keyword = ""
    for kind_, value in tokens:
        if kind_ == "word":
            keyword = value.upper()
            break
        if kind_ == "punct" and value == "(":
            continue
        break
    kind = _KINDS.get(keyword, Kind.OTHER)
    tables: list[Table] = []
    opaque = keyword in _OPAQUE
    locking = False
    index = 0
    count = len(tokens)
    upper_words = [value.upper() if t == "word" else "" for t, value in tokens]
    while index < count:
        word = upper_words[index]
        if word in _TABLE_KEYWORDS:
            index = _read_tables(tokens, upper_words, index + 1, tables, word in _LIST_KEYWORDS)
            continue
        if word == "FOR" and index + 1 < count and upper_words[index + 1] in ("UPDATE", "SHARE"):
            locking = True
            index += 2
            continue
        if word == "LOCK" and index + 2 < count and upper_words[index + 1] == "IN" and upper_words[index + 2] == "SHARE":
            locking = True
        if word in ("DELETE",) and index + 1 < count and tokens[index + 1][0] in ("word", "ident") \
                and upper_words[index + 1] not in ("FROM", "LOW_PRIORITY", "QUICK", "IGNORE"):
            # multi-table DELETE t1, t2 FROM ...: the names before FROM are aliases or tables
            index = _read_tables(tokens, upper_words, index + 1, tables, True)
            continue
        if word in ("TRUNCATE", "DESCRIBE", "DESC", "EXPLAIN", "REPLACE", "INSERT", "ALTER",
                    "OPTIMIZE", "ANALYZE", "REPAIR", "CHECK", "CHECKSUM") and index == _first_word_index(tokens):
            nxt = upper_words[index + 1] if index + 1 < count else ""
            if nxt not in _TABLE_KEYWORDS and nxt not in ("IGNORE", "LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY",
                                                          "ONLINE", "SELECT", "FORMAT", "EXTENDED", "PARTITIONS",
                                                          "DATABASE", "SCHEMA", "VIEW", "USER", "EVENT",
                                                          "FUNCTION", "PROCEDURE", "SERVER", "INDEX", "SEQUENCE",
                                                          "LOCAL", "NO_WRITE_TO_BINLOG", "ALL", "WITH", "("):
                index = _read_tables(tokens, upper_words, index + 1, tables, False)
                continue
        if word == "RENAME" and index + 1 < count and upper_words[index + 1] == "TABLE":
            index = _read_rename(tokens, upper_words, index + 2, tables)
            continue
        if word in ("VIEW", "TRIGGER", "PROCEDURE", "FUNCTION", "EVENT") and kind is Kind.DDL:
            opaque = True
        index += 1
    calls: list[Table] = []
    for index in range(1, count):
        if tokens[index] == ("punct", "(") and tokens[index - 1][0] in ("word", "ident"):
            name = tokens[index - 1][1].lower()
            if index >= 3 and tokens[index - 2] == ("punct", ".") and tokens[index - 3][0] in ("word", "ident"):
                calls.append((tokens[index - 3][1].lower(), name))
            else:
                calls.append((None, name))
    # User variables (@v) live in the primary's session; reading a system
    # variable (@@v) is answered alike by a replica (session ones only differ
    # after a SET, which pins the session to the primary anyway).
    primary_only = locking or kind not in (Kind.READ,) or (keyword in ("SELECT", "WITH") and (
        any(t == "var" and not v.startswith("@@") for t, v in tokens) or "INTO" in upper_words
    ))
    return Facts(
        kind=kind,
        keyword=keyword,
        tables=None if opaque else tuple(dict.fromkeys(tables)),
        tags=parse_tags(comments),
        locking=locking,
        primary_only=primary_only,
        multi=multi,
        calls=tuple(dict.fromkeys(calls)),
    )


def _first_word_index(tokens: list[tuple[str, str]]) -> int:
    for index, (kind, _) in enumerate(tokens):
        if kind == "word":
            return index
    return -1


def _name_at(tokens: list[tuple[str, str]], upper: list[str], index: int) -> tuple[Table | None, int]:
    """A possibly schema-qualified name starting at ``index``."""
    count = len(tokens)
    if index >= count or tokens[index][0] not in ("word", "ident"):
        return None, index
    if tokens[index][0] == "word" and upper[index] in _NOT_TABLES:
        return None, index
    first = tokens[index][1].lower()
    if index + 2 < count and tokens[index + 1] == ("punct", ".") and tokens[index + 2][0] in ("word", "ident"):
        return (first, tokens[index + 2][1].lower()), index + 3
    return (None, first), index + 1


def _read_tables(
    tokens: list[tuple[str, str]], upper: list[str], index: int, tables: list[Table], allow_list: bool
) -> int:
    count = len(tokens)
    while index < count and upper[index] in _SKIP_WORDS:
        index += 1
    while True:
        if index < count and tokens[index] == ("punct", "("):
            return index  # a subquery or a column list: its own keywords are scanned later
        name, index = _name_at(tokens, upper, index)
        if name is None:
            return index
        tables.append(name)
        # optional PARTITION (...) and alias
        if index < count and upper[index] == "AS":
            index += 2
        elif index < count and tokens[index][0] in ("word", "ident") and upper[index] not in _CLAUSE_WORDS:
            index += 1
        while index < count and upper[index] in ("READ", "WRITE", "LOCAL", "LOW_PRIORITY"):
            index += 1  # LOCK TABLES t WRITE, u READ LOCAL
        if allow_list and index < count and tokens[index] == ("punct", ","):
            index += 1
            continue
        return index


def _read_rename(tokens: list[tuple[str, str]], upper: list[str], index: int, tables: list[Table]) -> int:
    count = len(tokens)
    while index < count:
        name, index = _name_at(tokens, upper, index)
        if name is None:
            return index
        tables.append(name)
        if index < count and upper[index] == "TO":
            index += 1
            continue
        if index < count and tokens[index] == ("punct", ","):
            index += 1
            continue
        return index
    return index


_UNKNOWN = Facts(Kind.OTHER, "", None)


def classify_text(sql: str) -> Facts:
    try:
        lexer = _Lexer(sql)
        tokens = lexer.tokens()
    except ValueError:
        return _UNKNOWN
    # Split on top-level semicolons (multi-statements).
    statements: list[list[tuple[str, str]]] = [[]]
    for token in tokens:
        if token == ("punct", ";"):
            statements.append([])
        else:
            statements[-1].append(token)
    statements = [s for s in statements if s]
    if not statements:
        return Facts(Kind.OTHER, "", (), parse_tags(lexer.comments))
    if len(statements) == 1:
        facts = _statement_facts(statements[0], lexer.comments, False)
        if facts.primary_only is False and _PRIMARY_FUNCTIONS.search(sql.encode("utf-8", "replace")):
            return replace(facts, primary_only=True)
        return facts
    parts = [_statement_facts(s, [], True) for s in statements]
    tables: list[Table] | None = []
    for part in parts:
        if part.tables is None:
            tables = None
            break
        assert tables is not None
        tables.extend(part.tables)
    kinds = {part.kind for part in parts}
    kind = parts[0].kind if len(kinds) == 1 else Kind.WRITE if Kind.WRITE in kinds else Kind.OTHER
    return Facts(
        kind=kind,
        keyword=parts[0].keyword,
        tables=None if tables is None else tuple(dict.fromkeys(tables)),
        tags=parse_tags(lexer.comments),
        locking=any(p.locking for p in parts),
        primary_only=True,
        multi=True,
        calls=tuple(dict.fromkeys(call for part in parts for call in part.calls)),
    )


#: literals become ``?``; comments (tags live there) and quoted identifiers
#: (they may look like literals) are kept as they are
_SHAPE = re.compile(
    rb"""(/\*.*?\*/|--[^\n]*|\#[^\n]*|`(?:[^`]|``)*`)"""
    rb"""|'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|(?<![\w$.@])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w$])""",
    re.S,
)


def _keep_or_literal(match: re.Match[bytes]) -> bytes:
    return match.group(1) or b"?"


def shape_of(sql: bytes) -> bytes:
    """``SELECT c FROM t WHERE id = 42 /* uid=7 */`` → ``SELECT c FROM t WHERE id = ? /* uid=7 */``.

    Literals never name tables, change the kind or carry tags, so a statement
    and its shape have the same facts.
    """
    return _SHAPE.sub(_keep_or_literal, sql)


class Classifier:
    """``classify_text`` with bounded caches keyed by the statement bytes and by its shape.

    Applications that inline literals send mostly distinct texts; those miss
    the first cache and hit the second, so the lexer runs once per shape.
    """

    def __init__(self, size: int = 20_000) -> None:
        self._cache: dict[bytes, Facts] = {}
        self._shapes: dict[bytes, Facts] = {}
        self._size = size
        self.hits = 0
        self.misses = 0

    def classify(self, sql: bytes) -> Facts:
        facts = self._cache.get(sql)
        if facts is not None:
            self.hits += 1
            return facts
        shape = shape_of(sql)
        facts = self._shapes.get(shape)
        if facts is None:
            self.misses += 1
            facts = classify_text(shape.decode("utf-8", "replace"))
            facts = replace(facts, shape=shape)
            if len(self._shapes) >= self._size:
                self._shapes.clear()
            self._shapes[shape] = facts
        else:
            self.hits += 1
        if len(self._cache) >= self._size:
            self._cache.clear()  # cheap and good enough: hot statements come back at once
        self._cache[sql] = facts
        return facts
