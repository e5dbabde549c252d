"""Routing rules: (statement facts, session, live rules) → decision.  Pure code.

Rules are ordered by ``id`` (ProxySQL's ``mysql_query_rules`` in spirit).  A
rule *matches* a statement when every matcher it sets matches: ``user``,
``schema``, ``kinds``, ``tables``, comment ``tags``, connection
``attributes``, a ``digest`` of the normalized statement or a ``match``
regex; and, for a rule with ``percent``, when the stable hash of its ``key``
(a comment tag or connection attribute such as ``uid``) falls in the first
``percent`` of 10 000 buckets, so a key always lands on the same side and
raising the percentage only adds keys.

Matching rules contribute actions in order: the first ``route`` and the
first ``mirror`` win, ``rewrite`` / ``comment`` / ``hint`` accumulate,
``reject`` ends the evaluation, and ``last`` stops it after the rule.

The hot path: a statement's own matchers (kind, tables, tags, digest, regex)
are evaluated once per statement text and session schema and cached as a
bit mask; the session's (user, schema, attributes) mask is computed once per
session by the caller; the decision for (text, mask) is cached too.  So a
routed statement costs two or three dict lookups, plus a cached hash for
percentage rules.

Nothing here does I/O; ``proxy.router`` applies decisions.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from proxy.classify import Facts, Kind

__all__ = [
    "FIELDS",
    "NO_DECISION",
    "Decision",
    "RuleError",
    "RuleSet",
    "RuleSpec",
    "bucket",
    "compile_rules",
    "decode_rules",
    "digest",
    "digest_text",
    "encode_rules",
    "make_spec",
    "spec_row",
]

KIND_NAMES = {kind.value: kind for kind in Kind}
#: targets a rule may route to besides backend names
ROLES = ("primary", "replica")
BUCKETS = 10_000
#: caches are cleared when they reach this many entries (hot statements come back at once)
CACHE_SIZE = 20_000


class RuleError(ValueError):
    """A rule that cannot be used.  ``field`` names the offending setting."""

    def __init__(self, rule_id: int | None, field_name: str, message: str) -> None:
        where = f"rule {rule_id}" if rule_id is not None else "rule"
        super().__init__(f"{where}: {field_name}: {message}")
        self.rule_id = rule_id
        self.field = field_name
        self.problem = message


@dataclass(frozen=True)
class RuleSpec:
    """One rule as an operator writes it (config file or admin port)."""

    id: int
    active: bool = True
    note: str = ""
    # matchers (unset: matches anything)
    user: str | None = None
    schema: str | None = None
    kinds: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    digest: str | None = None
    match: str | None = None
    percent: float | None = None
    key: str = "uid"
    salt: str = ""
    # actions
    route: str | None = None
    rewrite: str | None = None
    comment: str | None = None
    hint: str | None = None
    mirror: str | None = None
    reject: str | None = None
    last: bool = False


#: every setting of a rule, in the order the admin table shows them
FIELDS = tuple(item.name for item in fields(RuleSpec))


# --------------------------------------------------------------------------- specs from values


def _text(rule_id: int | None, name: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RuleError(rule_id, name, f"expected a string, got {value!r}")
    if not empty and not value.strip():
        raise RuleError(rule_id, name, "must not be empty")
    if "\x00" in value:
        raise RuleError(rule_id, name, "must not contain NUL characters")
    return value


def _names(rule_id: int | None, name: str, value: object) -> tuple[str, ...]:
    """A list, or a comma-separated string (the admin port's form)."""
    if isinstance(value, str):
        items: Sequence[object] = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise RuleError(rule_id, name, f"expected a list or a comma-separated string, got {value!r}")
    return tuple(_text(rule_id, name, item).strip().lower() for item in items)


def _pairs(rule_id: int | None, name: str, value: object) -> tuple[tuple[str, str], ...]:
    """A table ``{k = "v"}``, or ``"k=v,k2=*"`` (the admin port's form)."""
    pairs: list[tuple[object, object]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str):
        pairs = []
        for item in value.split(","):
            if not item.strip():
                continue
            key, equals, wanted = item.partition("=")
            if not equals:
                raise RuleError(rule_id, name, f"expected name=value pairs (value * for any), got {item.strip()!r}")
            pairs.append((key.strip(), wanted.strip()))
    else:
        raise RuleError(rule_id, name, f"expected a table or 'name=value,...', got {value!r}")
    out: list[tuple[str, str]] = []
    for raw_key, raw_value in pairs:
        key_text = _text(rule_id, name, raw_key).strip()
        if not isinstance(raw_value, str | int) or isinstance(raw_value, bool):
            raise RuleError(rule_id, f"{name}.{key_text}", f"expected a string (or * for any), got {raw_value!r}")
        out.append((key_text.lower() if name == "tags" else key_text, str(raw_value)))
    return tuple(out)


def _boolean(rule_id: int | None, name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise RuleError(rule_id, name, f"expected true or false (1 or 0), got {value!r}")


def make_spec(values: Mapping[str, object]) -> RuleSpec:
    """A rule from raw values (TOML table or admin row); raises ``RuleError``.

    Checks each value on its own; ``compile_rules`` checks the rule as a whole
    (regex, backends, combinations).
    """
    raw_id = values.get("id")
    if isinstance(raw_id, str) and raw_id.strip().isdigit():
        raw_id = int(raw_id)
    if not isinstance(raw_id, int) or isinstance(raw_id, bool) or not 1 <= raw_id <= 1_000_000_000:
        raise RuleError(None, "id", f"required: an integer 1..1000000000 that orders the rules, got {raw_id!r}")
    rule_id = raw_id
    known = set(FIELDS)
    settings: dict[str, Any] = {"id": rule_id}
    for name, value in values.items():
        if name == "id":
            continue
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RuleError(rule_id, name, f"unknown setting{hint}; rules take: {', '.join(FIELDS)}")
        if value is None:
            continue
        if name in ("active", "last"):
            settings[name] = _boolean(rule_id, name, value)
        elif name in ("kinds", "tables"):
            settings[name] = _names(rule_id, name, value)
        elif name in ("tags", "attributes"):
            settings[name] = _pairs(rule_id, name, value)
        elif name == "percent":
            number: float | None = None
            if isinstance(value, int | float) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                try:
                    number = float(value.strip().rstrip("%"))
                except ValueError:
                    number = None
            if number is None or not 0.0 <= number <= 100.0:
                raise RuleError(rule_id, name, f"expected a number 0..100, got {value!r}")
            settings[name] = number
        elif name in ("note", "salt"):
            settings[name] = _text(rule_id, name, value, empty=True)
        elif name == "rewrite":
            settings[name] = _text(rule_id, name, value, empty=True)
        else:
            settings[name] = _text(rule_id, name, value)
    return RuleSpec(**settings)


def spec_row(spec: RuleSpec) -> dict[str, object]:
    """A rule as the admin port shows it (lists and pairs as comma-separated text)."""
    row: dict[str, object] = {}
    for name in FIELDS:
        value = getattr(spec, name)
        if name in ("kinds", "tables"):
            value = ",".join(value) or None
        elif name in ("tags", "attributes"):
            value = ",".join(f"{k}={v}" for k, v in value) or None
        elif name == "note":
            value = value or None
        row[name] = value
    return row


# --------------------------------------------------------------------------- digests and buckets

_DIGEST_TOKENS = re.compile(
    r"""
    (?P<comment>/\*(?![!+]).*?\*/|(?:--(?=\s|$)|\#)[^\n]*)
    |(?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
    |(?P<number>\b0x[0-9a-fA-F]+\b|(?<![\w$.])[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?\b)
    |(?P<space>\s+)
    """,
    re.S | re.X,
)
_DIGEST_WORDS = re.compile(r"`(?:[^`]|``)*`|[\w$@.]+|\?|<=>|<=|>=|<>|!=|:=|\|\||&&|\S")
_IN_LIST = re.compile(r"\( \?(?: , \?)+ \)")
_VALUES_LIST = re.compile(r"(\( \?(?: , \?)* \))(?: , \1)+")


def digest_text(sql: str) -> str:
    """The statement with literals as ``?``, comments dropped, spacing and case folded.

    ``SELECT * FROM t WHERE id IN (1, 2, 3) /* x */`` and
    ``select *  from t where id in (7)`` both give
    ``select * from t where id in ( ? )``.
    """

    def fold(match: re.Match[str]) -> str:
        return " " if match.lastgroup in ("comment", "space") else "?"

    text = _DIGEST_TOKENS.sub(fold, sql).lower()
    text = " ".join(_DIGEST_WORDS.findall(text))
    while text.endswith(";"):
        text = text[:-1].rstrip()
    text = _IN_LIST.sub("( ? )", text)
    return _VALUES_LIST.sub(r"\1", text)


def digest(sql: str) -> str:
    """16 hex digits identifying a statement's shape (see ``digest_text``)."""
    return hashlib.blake2b(digest_text(sql).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


_HEX_DIGEST = re.compile(r"^(?:0x)?[0-9a-fA-F]{16}$")


@functools.lru_cache(maxsize=65_536)
def bucket(value: str, salt: str = "") -> int:
    """Stable bucket 0..9999 of a key (the same in every process and version)."""
    data = (salt + "\x00" + value).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % BUCKETS


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    #: backend name, "primary" or "replica"; None: the default (read/write split)
    route: str | None = None
    #: the statement to send instead of the client's (rewrite, comment, hint)
    sql: bytes | None = None
    mirror: str | None = None
    #: refuse the statement with this message
    reject: str | None = None
    #: positions (in the rule set) of the rules that matched, for hit counters
    rules: tuple[int, ...] = ()
    #: id of the rule that chose the route (for metrics and logs)
    route_rule: int | None = None


NO_DECISION = Decision()

_HINTABLE = frozenset({"select", "insert", "update", "delete", "replace"})
_LEADING = re.compile(
    r"(\s*(?:(?:/\*(?![!+]).*?\*/|(?:--(?=\s)|\#)[^\n]*(?:\n|$))\s*)*)([A-Za-z]+)", re.S
)
_EXISTING_HINT = re.compile(r"\s*/\*\+")


def inject_hint(text: str, hint: str) -> str:
    """``/*+ hint */`` right after the statement's first keyword (merged into one there)."""
    match = _LEADING.match(text)
    if match is None or match.group(2).lower() not in _HINTABLE:
        return text
    at = match.end(2)
    existing = _EXISTING_HINT.match(text, at)
    if existing is not None:
        inside = existing.end()
        return f"{text[:inside]} {hint}{text[inside:]}"
    return f"{text[:at]} /*+ {hint} */{text[at:]}"


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True, eq=False)
class _Rule:
    spec: RuleSpec
    bit: int
    position: int
    kinds: frozenset[Kind] | None
    #: (schema or None for any, table) patterns; fnmatch-style when they contain * or ?
    tables: tuple[tuple[str | None, str], ...]
    tags: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, str], ...]
    digest: str | None
    digest_is_text: bool
    regex: re.Pattern[str] | None
    route: str | None
    threshold: int | None  # percent as buckets: matches when bucket(key) < threshold


def _kinds(spec: RuleSpec) -> frozenset[Kind] | None:
    if not spec.kinds:
        return None
    out = set()
    for name in spec.kinds:
        kind = KIND_NAMES.get(name)
        if kind is None:
            raise RuleError(spec.id, "kinds", f"unknown kind {name!r}; kinds are {', '.join(KIND_NAMES)}")
        out.add(kind)
    return frozenset(out)


def _table_patterns(spec: RuleSpec) -> tuple[tuple[str | None, str], ...]:
    out = []
    for name in spec.tables:
        schema, dot, table = name.rpartition(".")
        if not table or (dot and not schema):
            raise RuleError(spec.id, "tables", f"expected table or schema.table, got {name!r}")
        out.append((schema or None, table.strip("`")))
    return tuple(out)


def _check_comment_text(spec: RuleSpec, name: str, value: str | None) -> None:
    if value is not None and ("*/" in value or "/*" in value):
        raise RuleError(spec.id, name, "must not contain /* or */ (it is injected inside a comment)")


def _compile(spec: RuleSpec, position: int, backends: Mapping[str, str]) -> _Rule:
    regex = None
    if spec.match is not None:
        try:
            regex = re.compile(spec.match, re.IGNORECASE | re.DOTALL)
        except re.error as error:
            raise RuleError(spec.id, "match", f"invalid regular expression {spec.match!r}: {error}") from None
    if spec.rewrite is not None:
        if regex is None:
            raise RuleError(spec.id, "rewrite", "needs match: the pattern whose matches it replaces")
        _check_template(spec, regex, spec.rewrite)
    digest_value = None
    digest_is_text = False
    if spec.digest is not None:
        if _HEX_DIGEST.match(spec.digest.strip()):
            digest_value = spec.digest.strip().lower().removeprefix("0x")
        else:
            digest_value = digest_text(spec.digest)
            digest_is_text = True
    if spec.route is not None and spec.route not in ROLES and spec.route not in backends:
        raise RuleError(
            spec.id, "route",
            f"unknown backend {spec.route!r}; route to one of: "
            f"{', '.join([*ROLES, *sorted(set(backends) - set(ROLES))])}",
        )
    if spec.mirror is not None:
        if spec.mirror not in backends:
            raise RuleError(spec.id, "mirror", f"unknown backend {spec.mirror!r}; backends: {', '.join(sorted(backends))}")
        if backends[spec.mirror] == "primary":
            raise RuleError(spec.id, "mirror", f"{spec.mirror} is the primary: mirroring to it would run statements twice")
    _check_comment_text(spec, "comment", spec.comment)
    _check_comment_text(spec, "hint", spec.hint)
    if spec.percent is not None and not spec.key.strip():
        raise RuleError(spec.id, "key", "percent needs a key: the tag or connection attribute to hash (e.g. uid)")
    for name, pairs in (("tags", spec.tags), ("attributes", spec.attributes)):
        for key, _ in pairs:
            if not key:
                raise RuleError(spec.id, name, "empty name")
    actions = (spec.route, spec.rewrite, spec.comment, spec.hint, spec.mirror, spec.reject)
    if all(action is None for action in actions) and not spec.last:
        raise RuleError(
            spec.id, "route",
            "the rule does nothing: give route, rewrite, comment, hint, mirror, reject or last",
        )
    threshold = None if spec.percent is None else round(spec.percent * BUCKETS / 100)
    return _Rule(
        spec=spec,
        bit=1 << position,
        position=position,
        kinds=_kinds(spec),
        tables=_table_patterns(spec),
        tags=tuple((k.lower(), v) for k, v in spec.tags),
        attributes=spec.attributes,
        digest=digest_value,
        digest_is_text=digest_is_text,
        regex=regex,
        route=spec.route,
        threshold=threshold,
    )


def compile_rules(specs: Iterable[RuleSpec], backends: Mapping[str, str]) -> RuleSet:
    """Check every rule and build a rule set; raises ``RuleError`` for the first bad one.

    ``backends`` maps backend names to roles ("primary" / "replica").
    """
    ordered = sorted(specs, key=lambda spec: spec.id)
    seen: set[int] = set()
    for spec in ordered:
        if spec.id in seen:
            raise RuleError(spec.id, "id", "duplicate rule id")
        seen.add(spec.id)
    active = [spec for spec in ordered if spec.active]
    compiled = [_compile(spec, position, backends) for position, spec in enumerate(active)]
    for spec in ordered:
        if not spec.active:
            _compile(spec, 0, backends)  # inactive rules must still be valid
    return RuleSet(tuple(ordered), compiled)


class RuleSet:
    """Live, compiled rules.  ``hits`` counts matches per rule id."""

    def __init__(self, specs: tuple[RuleSpec, ...], rules: list[_Rule]) -> None:
        self.specs = specs
        self.rules = rules
        self.hits: dict[int, int] = {spec.id: 0 for spec in specs}
        self._by_position = [rule.spec.id for rule in rules]
        self._percent_mask = 0
        self._regex_mask = 0
        self._text_mask = 0  # rules whose actions change the statement text
        self._statement_rules: list[_Rule] = []
        self._regex_rules: list[_Rule] = []
        self._session_rules: list[_Rule] = []
        for rule in rules:
            spec = rule.spec
            if rule.threshold is not None:
                self._percent_mask |= rule.bit
            if rule.kinds or rule.tables or rule.tags or rule.digest:
                self._statement_rules.append(rule)
            if rule.regex is not None:
                self._regex_rules.append(rule)
                self._regex_mask |= rule.bit
            if spec.rewrite is not None or spec.comment is not None or spec.hint is not None:
                self._text_mask |= rule.bit
            if spec.user is not None or spec.schema is not None or rule.attributes:
                self._session_rules.append(rule)
        self._all = (1 << len(rules)) - 1
        #: (shape, schema) → rules whose kind/tables/tags/digest match
        self._statement_cache: dict[tuple[bytes, str | None], int] = {}
        #: statement text → regex rules that match it
        self._regex_cache: dict[bytes, int] = {}
        self._decisions: dict[tuple[bytes, int], Decision] = {}
        #: decisions that do not change the text are shared by every statement with their rules
        self._plain_decisions: dict[int, Decision] = {}

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def empty(self) -> bool:
        return not self.rules

    def carry_hits(self, previous: RuleSet) -> None:
        """Keep the counters of rules that did not change."""
        old = {spec.id: spec for spec in previous.specs}
        for spec in self.specs:
            if old.get(spec.id) == spec:
                self.hits[spec.id] = previous.hits.get(spec.id, 0)

    # -- masks -------------------------------------------------------------------

    def session_mask(self, user: str, schema: str | None, attributes: Mapping[str, str]) -> int:
        """Rules whose session matchers (user, schema, attributes) accept this session."""
        mask = self._all
        for rule in self._session_rules:
            spec = rule.spec
            if (
                (spec.user is not None and spec.user != user)
                or (spec.schema is not None and (schema or "").lower() != spec.schema.lower())
                or not _pairs_match(rule.attributes, attributes)
            ):
                mask &= ~rule.bit
        return mask

    def _statement_mask(self, shape: bytes, facts: Facts, schema: str | None) -> int:
        """Rules whose kind/tables/tags/digest accept the statement (same for one shape)."""
        mask = self._all
        folded: tuple[str, str] | None = None
        for rule in self._statement_rules:
            ok = True
            if rule.kinds is not None and facts.kind not in rule.kinds:
                ok = False
            elif rule.tables and not _tables_match(rule.tables, facts, schema):
                ok = False
            elif rule.tags and not _pairs_match(rule.tags, facts.tags):
                ok = False
            elif rule.digest is not None:
                if folded is None:
                    text = digest_text(shape.decode("utf-8", "surrogateescape"))
                    folded = (text, hashlib.blake2b(text.encode("utf-8", "surrogateescape"),
                                                    digest_size=8).hexdigest())
                if rule.digest != (folded[0] if rule.digest_is_text else folded[1]):
                    ok = False
            if not ok:
                mask &= ~rule.bit
        return mask

    def _regex_filter(self, sql: bytes, mask: int) -> int:
        """Drop the candidate regex rules whose pattern is not in the statement text."""
        matched = self._regex_cache.get(sql)
        if matched is None:
            matched = 0
            text = sql.decode("utf-8", "surrogateescape")
            for rule in self._regex_rules:
                assert rule.regex is not None
                if rule.regex.search(text) is not None:
                    matched |= rule.bit
            if len(self._regex_cache) >= CACHE_SIZE:
                self._regex_cache.clear()
            self._regex_cache[sql] = matched
        return mask & (~self._regex_mask | matched)

    # -- the decision ------------------------------------------------------------

    def decide(
        self,
        sql: bytes,
        facts: Facts,
        schema: str | None,
        session_mask: int,
        attributes: Mapping[str, str],
    ) -> Decision:
        """What to do with one statement.

        Cached by shape (statements that differ only in literals) and schema,
        then by the rules that matched; only regex rules look at the text.
        """
        key = (facts.shape or sql, schema)
        statement_mask = self._statement_cache.get(key)
        if statement_mask is None:
            statement_mask = self._statement_mask(key[0], facts, schema)
            if len(self._statement_cache) >= CACHE_SIZE:
                self._statement_cache.clear()
            self._statement_cache[key] = statement_mask
        mask = statement_mask & session_mask
        if mask & self._regex_mask:
            mask = self._regex_filter(sql, mask)
        if not mask:
            return NO_DECISION
        if mask & self._percent_mask:
            mask = self._percent(mask, facts, attributes)
            if not mask:
                return NO_DECISION
        if not mask & self._text_mask:
            decision = self._plain_decisions.get(mask)
            if decision is None:
                if len(self._plain_decisions) >= CACHE_SIZE:
                    self._plain_decisions.clear()
                decision = self._plain_decisions[mask] = self._build(sql, mask)
            return decision
        decision_key = (sql, mask)
        decision = self._decisions.get(decision_key)
        if decision is None:
            decision = self._build(sql, mask)
            if len(self._decisions) >= CACHE_SIZE:
                self._decisions.clear()
            self._decisions[decision_key] = decision
        return decision

    def _percent(self, mask: int, facts: Facts, attributes: Mapping[str, str]) -> int:
        for rule in self.rules:
            if not mask & rule.bit & self._percent_mask:
                continue
            spec = rule.spec
            assert rule.threshold is not None
            value = facts.tags.get(spec.key.lower())
            if value is None:
                value = attributes.get(spec.key)
            if value is None or bucket(value, spec.salt) >= rule.threshold:
                mask &= ~rule.bit
        return mask

    def _build(self, sql: bytes, mask: int) -> Decision:
        route: str | None = None
        route_rule: int | None = None
        mirror: str | None = None
        matched: list[int] = []
        text: str | None = None
        comments: list[str] = []
        hints: list[str] = []
        for rule in self.rules:
            if not mask & rule.bit:
                continue
            spec = rule.spec
            matched.append(spec.id)
            if spec.reject is not None:
                return Decision(reject=spec.reject, rules=tuple(matched))
            if spec.rewrite is not None and rule.regex is not None:
                if text is None:
                    text = sql.decode("utf-8", "surrogateescape")
                text = rule.regex.sub(spec.rewrite, text)
            if spec.comment is not None:
                comments.append(spec.comment)
            if spec.hint is not None:
                hints.append(spec.hint)
            if route is None and spec.route is not None:
                route, route_rule = spec.route, spec.id
            if mirror is None and spec.mirror is not None:
                mirror = spec.mirror
            if spec.last:
                break
        new_sql: bytes | None = None
        if text is not None or comments or hints:
            if text is None:
                text = sql.decode("utf-8", "surrogateescape")
            if hints:
                text = inject_hint(text, " ".join(hints))
            if comments:
                text = "".join(f"/* {comment} */ " for comment in comments) + text
            encoded = text.encode("utf-8", "surrogateescape")
            if encoded != sql:
                new_sql = encoded
        return Decision(route=route, sql=new_sql, mirror=mirror, rules=tuple(matched), route_rule=route_rule)

    def count(self, decision: Decision) -> None:
        hits = self.hits
        for rule_id in decision.rules:
            hits[rule_id] += 1


def _pairs_match(wanted: tuple[tuple[str, str], ...], have: Mapping[str, str]) -> bool:
    for key, value in wanted:
        present = have.get(key)
        if present is None:
            return False
        if value != "*" and present != value:
            return False
    return True


def _tables_match(patterns: tuple[tuple[str | None, str], ...], facts: Facts, schema: str | None) -> bool:
    tables = facts.tables
    if tables is None:
        return False  # unknown tables: a table rule does not claim the statement
    default = (schema or "").lower()
    for table_schema, table in tables:
        actual_schema = table_schema or default
        for want_schema, want_table in patterns:
            if want_schema is not None and not _name_match(want_schema, actual_schema):
                continue
            if _name_match(want_table, table):
                return True
    return False


def _name_match(pattern: str, name: str) -> bool:
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def empty_rules() -> RuleSet:
    return RuleSet((), [])


def spec_values(spec: RuleSpec) -> dict[str, object]:
    """A rule's settings as ``make_spec`` takes them (to change some and re-check)."""
    values: dict[str, object] = {}
    for name in FIELDS:
        value = getattr(spec, name)
        if name in ("kinds", "tables"):
            value = list(value)
        elif name in ("tags", "attributes"):
            value = dict(value)
        values[name] = value
    return values


def _check_template(spec: RuleSpec, regex: re.Pattern[str], template: str) -> None:
    """Bad group references in a replacement fail at apply time, not per statement."""
    parser = getattr(re, "_parser", None)  # the template grammar is only exposed privately
    try:
        if parser is not None:
            parser.parse_template(template, regex)
        else:
            regex.sub(template, "")
    except (re.error, IndexError) as error:
        raise RuleError(spec.id, "rewrite", f"invalid replacement {template!r}: {error}") from None


_NAME = r"(?:'[^']*'|\"[^\"]*\"|`[^`]*`|[\w$]+)"
#: exactly one SET NAMES / CHARACTER SET, nothing else (``SET NAMES x, sql_mode = ''`` pins)
_SET_NAMES = re.compile(
    rf"\s*SET\s+(?:NAMES\s+{_NAME}(?:\s+COLLATE\s+{_NAME})?|(?:CHARACTER\s+SET|CHARSET)\s+{_NAME})\s*;?\s*$",
    re.I,
)
_SET_AUTOCOMMIT = re.compile(
    r"\s*SET\s+(?:SESSION\s+|LOCAL\s+|@@(?:SESSION\.|LOCAL\.)?)?autocommit\s*(?:=|:=)\s*\w+\s*;?\s*$", re.I
)
_SET_USER_VARIABLES = re.compile(
    r"\s*SET\s+@[\w$.]+\s*:?=\s*(?:'(?:[^'\\]|\\.|'')*'|-?[\d.]+|NULL|TRUE|FALSE|@[\w$.]+)"
    r"(?:\s*,\s*@[\w$.]+\s*:?=\s*(?:'(?:[^'\\]|\\.|'')*'|-?[\d.]+|NULL|TRUE|FALSE|@[\w$.]+))*\s*;?\s*$",
    re.I,
)
_TEMPORARY = re.compile(r"\bTEMPORARY\b", re.I)
_USER_LOCKS = re.compile(r"\b(?:get_lock|release_lock|release_all_locks)\s*\(", re.I)


def session_effect(sql: str, facts: Facts) -> str | None:
    """Why a statement pins its session to the primary, or None if it does not.

    Conservative: after anything that changes session state other than the
    schema (tracked), ``SET NAMES`` (replayed on replicas), ``SET autocommit``
    (from status flags) and plain user variables (statements reading them
    stay on the primary anyway), the session's reads stay on the primary.
    """
    if facts.multi:
        return "multi-statement"
    keyword = facts.keyword
    if keyword == "SET":
        if _SET_NAMES.match(sql) or _SET_AUTOCOMMIT.match(sql) or _SET_USER_VARIABLES.match(sql):
            return None
        return "SET"
    if keyword in ("USE", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"):
        return None
    if keyword in ("PREPARE", "EXECUTE", "DEALLOCATE", "LOCK", "HANDLER", "CALL", "XA"):
        return keyword
    if facts.kind is Kind.DDL and _TEMPORARY.search(sql):
        return "temporary table"
    if _USER_LOCKS.search(sql):
        return "user lock"
    return None


def is_set_names(sql: str) -> bool:
    return _SET_NAMES.match(sql) is not None


# --------------------------------------------------------------------------- rule sets as documents

#: version of the document layout below; a sidecar refuses a layout it does not know
DOCUMENT_FORMAT = 1
_DEFAULTS = RuleSpec(id=1)


def encode_rules(specs: Iterable[RuleSpec]) -> str:
    """A whole rule set as one JSON document (what the fleet stores per version).

    Only settings that differ from their defaults are written, so a document
    stays readable and an older sidecar reading a newer document meets an
    unknown setting only when the rule really uses it.
    """
    rules: list[dict[str, object]] = []
    defaults = spec_values(_DEFAULTS)
    for spec in sorted(specs, key=lambda item: item.id):
        values = spec_values(spec)
        rules.append({name: value for name, value in values.items()
                      if name == "id" or value != defaults[name]})
    return json.dumps({"format": DOCUMENT_FORMAT, "rules": rules}, sort_keys=True, separators=(",", ":"))


def decode_rules(text: str) -> tuple[RuleSpec, ...]:
    """The rules of a document from ``encode_rules``; raises ``RuleError`` (nothing half-read).

    Each rule is checked on its own here (``make_spec``); ``compile_rules``
    checks the set against this sidecar's backends.
    """
    try:
        document = json.loads(text)
    except ValueError as error:
        raise RuleError(None, "document", f"not valid JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        raise RuleError(None, "document", 'expected {"format": 1, "rules": [...]}')
    layout = document.get("format")
    if layout != DOCUMENT_FORMAT:
        raise RuleError(None, "document", f"format {layout!r} is not one this sidecar reads "
                        f"(it reads format {DOCUMENT_FORMAT}); upgrade it")
    specs: list[RuleSpec] = []
    for item in document["rules"]:
        if not isinstance(item, dict):
            raise RuleError(None, "document", f"expected a rule object, got {item!r}")
        specs.append(make_spec(item))
    return tuple(specs)
