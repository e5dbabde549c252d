"""Statement facts: kinds, tables (safe for the gate), tags, locking reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.classify import Classifier, Kind, classify_text


@pytest.mark.parametrize(
    ("sql", "kind", "tables"),
    [
        ("SELECT * FROM t WHERE id = 1", Kind.READ, {"s.t"}),
        ("select a from `Shop`.`Orders` o join items i on o.id=i.oid", Kind.READ, {"shop.orders", "s.items"}),
        ("SELECT 1", Kind.READ, set()),
        ("SELECT * FROM a, b AS bb, c cc WHERE 1", Kind.READ, {"s.a", "s.b", "s.c"}),
        ("SELECT * FROM (SELECT id FROM inner_t) x JOIN y USING (id)", Kind.READ, {"s.inner_t", "s.y"}),
        ("INSERT INTO t (a, b) VALUES (1, 'x')", Kind.WRITE, {"s.t"}),
        ("INSERT IGNORE INTO db.t SELECT * FROM u", Kind.WRITE, {"db.t", "s.u"}),
        ("insert t values (1)", Kind.WRITE, {"s.t"}),
        ("REPLACE INTO t VALUES (1)", Kind.WRITE, {"s.t"}),
        ("UPDATE t SET a = 1 WHERE id IN (SELECT id FROM u)", Kind.WRITE, {"s.t", "s.u"}),
        ("UPDATE a JOIN b ON a.id=b.id SET a.x=b.x", Kind.WRITE, {"s.a", "s.b"}),
        ("DELETE FROM t WHERE id = 3", Kind.WRITE, {"s.t"}),
        ("DELETE t1 FROM t1 JOIN t2 ON t1.id = t2.id", Kind.WRITE, {"s.t1", "s.t2"}),
        ("ALTER TABLE t ADD COLUMN c INT", Kind.DDL, {"s.t"}),
        ("TRUNCATE TABLE t", Kind.DDL, {"s.t"}),
        ("TRUNCATE t", Kind.DDL, {"s.t"}),
        ("RENAME TABLE a TO b, c TO d", Kind.DDL, {"s.a", "s.b", "s.c", "s.d"}),
        ("DROP TABLE IF EXISTS a, b", Kind.DDL, {"s.a", "s.b"}),
        ("LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t", Kind.WRITE, {"s.t"}),
        ("LOCK TABLES t WRITE, u READ", Kind.TRANSACTION, {"s.t", "s.u"}),
        ("BEGIN", Kind.TRANSACTION, set()),
        ("SET autocommit = 0", Kind.SESSION, set()),
        ("SELECT 'FROM x' FROM t", Kind.READ, {"s.t"}),
        ("SELECT `from` FROM t -- FROM hidden\n", Kind.READ, {"s.t"}),
        ("/*!40101 SELECT * FROM t */", Kind.READ, {"s.t"}),
        ("SELECT * FROM t WHERE a = 'it''s' AND b = \"q\\\"\"", Kind.READ, {"s.t"}),
        ("WITH x AS (SELECT * FROM t) SELECT * FROM x", Kind.READ, {"s.t", "s.x"}),
        ("SELECT a INTO @v FROM t", Kind.READ, {"s.t"}),
    ],
)
def test_kinds_and_tables(sql: str, kind: Kind, tables: set[str]) -> None:
    facts = classify_text(sql)
    assert facts.kind is kind
    resolved = facts.resolved("s")
    assert resolved is not None and set(resolved) >= tables
    # never misses a table; extra names only cost an unneeded wait
    assert tables <= set(resolved)


@pytest.mark.parametrize("sql", ["CALL proc(1)", "EXECUTE stmt USING @a", "CREATE VIEW v AS SELECT 1",
                                 "SELECT 'unterminated", "HANDLER t READ FIRST"])
def test_unknown_tables_are_none(sql: str) -> None:
    assert classify_text(sql).tables is None


def test_multi_statement_unions_tables() -> None:
    facts = classify_text("INSERT INTO a VALUES (1); UPDATE b SET x=1; SELECT 1")
    assert facts.multi and facts.primary_only
    assert facts.resolved("s") == {"s.a", "s.b"}
    assert classify_text("SELECT 1; CALL p()").tables is None


def test_tags_and_locking() -> None:
    facts = classify_text(
        "/* tidegate:gray uid=123 */ SELECT * FROM t FOR UPDATE "
        "/*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',route='x'*/"
    )
    assert facts.tags["tidegate"] == "gray"
    assert facts.tags["uid"] == "123"
    assert facts.tags["traceparent"].startswith("00-4bf9")
    assert facts.locking and facts.primary_only
    assert classify_text("SELECT * FROM t LOCK IN SHARE MODE").locking
    assert not classify_text("SELECT * FROM t").primary_only
    assert classify_text("SELECT LAST_INSERT_ID()").primary_only
    assert classify_text("SELECT GET_LOCK('x', 1)").primary_only


def test_cache() -> None:
    classifier = Classifier(size=2)
    first = classifier.classify(b"SELECT * FROM t")
    assert classifier.classify(b"SELECT * FROM t") is first
    assert classifier.hits == 1
    classifier.classify(b"SELECT 2")
    classifier.classify(b"SELECT 3")  # over the bound: cache cleared, still correct
    assert classifier.classify(b"SELECT * FROM t").tables == ((None, "t"),)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_never_raises(text: str) -> None:
    classify_text(text)


@pytest.mark.parametrize(
    ("sql", "reach"),
    [
        ("SELECT order_count()", {"shop.order_count"}),
        ("SELECT other.f(id) FROM t", {"other.f", "shop.t"}),
        ("SELECT `my fn` (1); SELECT g(2) FROM u", {"shop.my fn", "shop.g", "shop.u"}),
        ("SELECT 'f(1)' FROM t /* g(2) */", {"shop.t"}),  # not in strings or comments
        ("CALL p()", None),
    ],
)
def test_function_calls_reach_for_the_gate(sql: str, reach: set[str] | None) -> None:
    facts = Classifier().classify(sql.encode())
    found = facts.reach("shop")
    if reach is None:
        assert found is None
    else:
        assert found is not None and reach <= found
        assert facts.resolved("shop") == frozenset(t for t in reach if t in ("shop.t", "shop.u"))
