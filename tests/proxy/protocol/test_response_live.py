"""ResponseTracker against real MariaDB bytes, in every capability variant.

Each test sends commands on a raw connection, captures the response until a
live tracker says it is over (``exchange`` then proves the stream is still
aligned), checks the tracker's facts against a reference decoding of whole
packets, and replays the capture whole, byte by byte and in random splits.
"""

from __future__ import annotations

import pytest
import trio
from mysql_capture import (
    CURSOR_TYPE_READ_ONLY,
    VARIANTS,
    Capture,
    Result,
    assert_aligned,
    binary_rows,
    check_replays,
    completed,
    decode,
    exchange,
    execute_payload,
    fetch_payload,
    open_connection,
    query,
    read_packets,
    result_statuses,
    statement_payload,
    text_rows,
)

from proxy import sandbox
from proxy.backends import BackendConnection
from proxy.protocol.constants import Capability, Command, Status
from proxy.protocol.framing import frame
from proxy.protocol.packets import Err, Ok

pytestmark = pytest.mark.slow

AUTOCOMMIT = int(Status.AUTOCOMMIT)
IN_TRANS = int(Status.IN_TRANS)
MORE = int(Status.MORE_RESULTS_EXISTS)

ER_NO_SUCH_TABLE = 1146
ER_BAD_DB_ERROR = 1049
ER_PARSE_ERROR = 1064
ER_UNKNOWN_STMT_HANDLER = 1243
ER_SUBQUERY_NO_1_ROW = 1242
ER_SIGNAL_EXCEPTION = 1644
ER_LOAD_INFILE_CAPABILITY_DISABLED = 4166
ER_NO_SUCH_THREAD = 1094
ER_SP_NOT_EXIST = 1305
ER_NO_OPEN_CURSOR = 1421
ER_BAD_NULL_ERROR = 1048


def verified(capture: Capture) -> Capture:
    """The facts agree with a reference decoding; every chunking agrees."""
    if capture.command in (
        Command.QUERY,
        Command.STMT_EXECUTE,
        Command.STMT_FETCH,
        Command.FIELD_LIST,
    ):
        results = decode(capture)
        assert capture.facts.results == completed(results), results
        errors = [r.err for r in results if r.err is not None]
        assert capture.facts.error_code == (errors[-1].code if errors else 0)
        if not errors:
            assert capture.facts.status == results[-1].status
    check_replays(capture)
    return capture


async def run(connection: BackendConnection, sql: str, **kwargs: object) -> Capture:
    return verified(await query(connection, sql, **kwargs))


async def setup_table(connection: BackendConnection) -> None:
    await run(
        connection,
        "CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(20) NOT NULL,"
        " note TEXT NULL) ENGINE=InnoDB",
    )
    await run(connection, "INSERT INTO t (name, note) VALUES ('a', 'x'), ('b', NULL), ('c', '')")


# -- COM_QUERY ----------------------------------------------------------------


async def test_query_ok(connection: BackendConnection) -> None:
    capture = await run(connection, "CREATE TABLE t (id INT PRIMARY KEY AUTO_INCREMENT, v INT)")
    assert (capture.facts.results, capture.facts.error_code) == (1, 0)
    assert capture.facts.status & AUTOCOMMIT
    assert not capture.facts.status & (IN_TRANS | MORE)
    assert capture.facts.last_sequence == 1

    capture = await run(connection, "INSERT INTO t (v) VALUES (1), (2), (3)")
    (result,) = decode(capture)
    assert result.ok is not None
    assert (result.ok.affected_rows, result.ok.last_insert_id) == (3, 1)
    assert capture.facts.results == 1


async def test_query_result_set_with_nulls(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = await run(connection, "SELECT id, name, note, NULL AS n FROM t ORDER BY id")
    (result,) = decode(capture)
    assert [c.name for c in result.columns] == ["id", "name", "note", "n"]
    assert text_rows(result) == [
        (b"1", b"a", b"x", None),
        (b"2", b"b", None, None),
        (b"3", b"c", b"", None),
    ]
    assert capture.facts.results == 1
    assert capture.facts.status & AUTOCOMMIT and not capture.facts.status & MORE
    # column count + 4 columns (+ EOF) + 3 rows + terminator
    assert len(capture.packets) == (9 if capture.deprecate_eof else 10)
    assert capture.facts.last_sequence == len(capture.packets)


async def test_query_zero_rows(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = await run(connection, "SELECT id, name FROM t WHERE id < 0")
    (result,) = decode(capture)
    assert result.kind == "rows" and result.rows == [] and len(result.columns) == 2
    assert capture.facts.results == 1


async def test_query_first_column_null_and_empty(connection: BackendConnection) -> None:
    # A row starting with 0xfb (NULL) and one whose only value is empty.
    capture = await run(connection, "SELECT NULL UNION ALL SELECT '' UNION ALL SELECT NULL")
    (result,) = decode(capture)
    assert text_rows(result) == [(None,), (b"",), (None,)]


async def test_query_error(connection: BackendConnection) -> None:
    capture = await run(connection, "SELECT * FROM nope")
    assert capture.facts.error_code == ER_NO_SUCH_TABLE
    assert capture.facts.results == 0
    (packet,) = capture.packets
    assert Err.parse(packet.payload).sql_state == "42S02"
    capture = await run(connection, "SELEKT 1")
    assert capture.facts.error_code == ER_PARSE_ERROR


async def test_query_error_after_rows(connection: BackendConnection) -> None:
    # The subquery fails on the third row: ERR arrives in the middle of the rows.
    await setup_table(connection)
    await run(connection, "CREATE TABLE d (k INT)")
    await run(connection, "INSERT INTO d VALUES (1), (2), (3), (3)")
    capture = await run(
        connection, "SELECT id, (SELECT k FROM d WHERE k = t.id) FROM t ORDER BY id"
    )
    (result,) = decode(capture)
    assert len(result.rows) == 2
    assert result.err is not None and result.err.code == ER_SUBQUERY_NO_1_ROW
    assert capture.facts.error_code == ER_SUBQUERY_NO_1_ROW
    assert capture.facts.results == 0


async def test_multi_statement(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = await run(
        connection, "SELECT 1; SELECT id, note FROM t WHERE id = 2; UPDATE t SET note = 'y'; DO 1"
    )
    results = decode(capture)
    assert [r.kind for r in results] == ["rows", "rows", "ok", "ok"]
    assert text_rows(results[1]) == [(b"2", None)]
    assert capture.facts.results == 4
    assert result_statuses(capture)[:3] == [
        s | MORE for s in result_statuses(capture)[:3]
    ]  # every result but the last says more follow
    assert not capture.facts.status & MORE
    assert capture.facts.error_code == 0


async def test_multi_statement_error_in_the_middle(connection: BackendConnection) -> None:
    capture = await run(connection, "SELECT 1; SELECT * FROM nope; SELECT 2")
    results = decode(capture)
    assert [r.kind for r in results] == ["rows", "err"]  # the server stops at the error
    assert capture.facts.results == 1
    assert capture.facts.error_code == ER_NO_SUCH_TABLE
    capture = await run(connection, "SELECT 3")  # and the connection is usable
    assert capture.facts.error_code == 0


async def test_call_procedure_with_two_result_sets(connection: BackendConnection) -> None:
    await setup_table(connection)
    await run(
        connection,
        "CREATE PROCEDURE p() BEGIN SELECT id FROM t ORDER BY id; SELECT 'x' AS b, NULL AS c; END",
    )
    capture = await run(connection, "CALL p()")
    results = decode(capture)
    assert [r.kind for r in results] == ["rows", "rows", "ok"]
    assert text_rows(results[0]) == [(b"1",), (b"2",), (b"3",)]
    assert text_rows(results[1]) == [(b"x", None)]
    statuses = result_statuses(capture)
    assert [bool(s & MORE) for s in statuses] == [True, True, False]
    assert capture.facts.results == 3
    assert capture.facts.status & AUTOCOMMIT and not capture.facts.status & MORE

    capture = await run(connection, "CALL nope()")
    assert capture.facts.error_code == ER_SP_NOT_EXIST


async def test_transaction_status_flags(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = await run(connection, "BEGIN")
    assert capture.facts.status & IN_TRANS and capture.facts.status & AUTOCOMMIT
    capture = await run(connection, "INSERT INTO t (name) VALUES ('d')")
    assert capture.facts.status & IN_TRANS
    capture = await run(connection, "SELECT COUNT(*) FROM t")  # status from the rows terminator
    assert capture.facts.status & IN_TRANS
    assert text_rows(decode(capture)[0]) == [(b"4",)]
    capture = await run(connection, "COMMIT")
    assert not capture.facts.status & IN_TRANS and capture.facts.status & AUTOCOMMIT

    capture = await run(connection, "SET autocommit = 0")
    assert not capture.facts.status & (AUTOCOMMIT | IN_TRANS)
    capture = await run(connection, "SELECT name FROM t WHERE id = 1")
    assert capture.facts.status & IN_TRANS and not capture.facts.status & AUTOCOMMIT
    capture = await run(connection, "ROLLBACK")
    assert not capture.facts.status & (AUTOCOMMIT | IN_TRANS)
    capture = await run(connection, "SET autocommit = 1")
    assert capture.facts.status & AUTOCOMMIT

    # A multi-statement transaction: the final status is the last result's.
    capture = await run(connection, "BEGIN; SELECT 1; COMMIT")
    assert [bool(s & IN_TRANS) for s in result_statuses(capture)] == [True, True, False]


async def test_show_and_explain(connection: BackendConnection) -> None:
    await setup_table(connection)
    for sql in (
        "SHOW VARIABLES LIKE 'max_allowed_packet'",
        "EXPLAIN SELECT * FROM t",
        "SHOW WARNINGS",
    ):
        capture = await run(connection, sql)
        assert capture.facts.results == 1 and capture.facts.error_code == 0


# -- other text-protocol commands ---------------------------------------------


async def test_init_db(connection: BackendConnection, database: str) -> None:
    capture = verified(await exchange(connection, bytes((Command.INIT_DB,)) + database.encode()))
    assert (capture.facts.error_code, capture.facts.results) == (0, 0)
    assert capture.facts.status & AUTOCOMMIT
    capture = verified(await exchange(connection, bytes((Command.INIT_DB,)) + b"no_such_db"))
    assert capture.facts.error_code == ER_BAD_DB_ERROR


async def test_ping(connection: BackendConnection) -> None:
    capture = verified(await exchange(connection, bytes((Command.PING,))))
    assert capture.facts.error_code == 0 and capture.facts.status & AUTOCOMMIT
    assert capture.facts.done and capture.facts.last_sequence == 1


async def test_statistics(connection: BackendConnection) -> None:
    capture = verified(await exchange(connection, bytes((Command.STATISTICS,))))
    (packet,) = capture.packets
    assert packet.payload.startswith(b"Uptime: ")  # a bare string, not an OK packet
    assert capture.facts.error_code == 0 and capture.facts.done


async def test_field_list(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = verified(await exchange(connection, bytes((Command.FIELD_LIST,)) + b"t\x00"))
    (result,) = decode(capture)
    assert [c.name for c in result.columns] == ["id", "name", "note"]
    assert capture.facts.results == 1 and capture.facts.error_code == 0
    capture = verified(await exchange(connection, bytes((Command.FIELD_LIST,)) + b"t\x00n%"))
    assert [c.name for c in decode(capture)[0].columns] == [
        "name",
        "note",
    ]
    capture = verified(await exchange(connection, bytes((Command.FIELD_LIST,)) + b"nope\x00"))
    assert capture.facts.error_code == ER_NO_SUCH_TABLE


async def test_set_option(connection: BackendConnection) -> None:
    off = verified(await exchange(connection, bytes((Command.SET_OPTION,)) + b"\x01\x00"))
    (packet,) = off.packets
    assert packet.first == 0xFE  # EOF, or an OK with the EOF header under DEPRECATE_EOF
    assert off.facts.error_code == 0 and off.facts.status & AUTOCOMMIT
    capture = await run(connection, "SELECT 1; SELECT 2")
    assert capture.facts.error_code == ER_PARSE_ERROR
    verified(await exchange(connection, bytes((Command.SET_OPTION,)) + b"\x00\x00"))
    capture = await run(connection, "SELECT 1; SELECT 2")
    assert capture.facts.results == 2
    bad = verified(await exchange(connection, bytes((Command.SET_OPTION,)) + b"\x07\x00"))
    assert bad.facts.error_code != 0


async def test_reset_connection(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = await run(connection, "BEGIN")
    assert capture.facts.status & IN_TRANS
    capture = verified(await exchange(connection, bytes((Command.RESET_CONNECTION,))))
    assert capture.facts.error_code == 0
    assert capture.facts.status & AUTOCOMMIT and not capture.facts.status & IN_TRANS


async def test_process_info_and_kill(connection: BackendConnection) -> None:
    capture = verified(await exchange(connection, bytes((Command.PROCESS_INFO,))))
    (result,) = decode(capture)
    assert "Command" in [c.name for c in result.columns] and result.rows
    capture = verified(
        await exchange(connection, bytes((Command.PROCESS_KILL,)) + (999_999).to_bytes(4, "little"))
    )
    assert capture.facts.error_code == ER_NO_SUCH_THREAD


# -- prepared statements --------------------------------------------------------


async def prepare(connection: BackendConnection, sql: str) -> Capture:
    return verified(await exchange(connection, bytes((Command.STMT_PREPARE,)) + sql.encode()))


async def test_stmt_prepare(connection: BackendConnection) -> None:
    await setup_table(connection)
    capture = await prepare(connection, "SELECT id, name, note FROM t WHERE id > ? AND name <> ?")
    assert capture.facts.prepared is not None
    statement, columns, params = capture.facts.prepared
    assert (columns, params) == (3, 2) and statement > 0
    eofs = 0 if capture.deprecate_eof else 2
    assert len(capture.packets) == 1 + params + columns + eofs
    assert capture.facts.error_code == 0 and capture.facts.results == 0

    shapes = {
        "INSERT INTO t (name) VALUES (?)": (0, 1),
        "SELECT 1, 2": (2, 0),
        "DO 1": (0, 0),
        "SELECT ?": (1, 1),
    }
    for sql, shape in shapes.items():
        capture = await prepare(connection, sql)
        assert capture.facts.prepared is not None and capture.facts.prepared[1:] == shape, sql
        assert capture.facts.prepared[0] != statement

    capture = await prepare(connection, "SELECT * FROM nope WHERE id = ?")
    assert capture.facts.prepared is None and capture.facts.error_code == ER_NO_SUCH_TABLE
    capture = await prepare(connection, "SELEKT ?")
    assert capture.facts.error_code == ER_PARSE_ERROR


async def test_stmt_execute_binary_rows(connection: BackendConnection) -> None:
    await setup_table(connection)
    prepared = (
        await prepare(
            connection, "SELECT id, name, note FROM t WHERE id > ? AND name <> ? ORDER BY id"
        )
    ).facts.prepared
    assert prepared is not None
    capture = verified(await exchange(connection, execute_payload(prepared[0], (1, "zzz"))))
    (result,) = decode(capture)
    assert binary_rows(result) == [(2, b"b", None), (3, b"c", b"")]
    assert capture.facts.results == 1 and capture.facts.status & AUTOCOMMIT
    assert not capture.facts.status & Status.CURSOR_EXISTS

    capture = verified(await exchange(connection, execute_payload(prepared[0], (1, None))))
    assert binary_rows(decode(capture)[0]) == []  # name <> NULL matches nothing

    insert = (await prepare(connection, "INSERT INTO t (name, note) VALUES (?, ?)")).facts.prepared
    assert insert is not None
    capture = verified(await exchange(connection, execute_payload(insert[0], ("e", None))))
    (result,) = decode(capture)
    assert result.ok is not None and (result.ok.affected_rows, result.ok.last_insert_id) == (1, 4)
    capture = verified(await exchange(connection, execute_payload(insert[0], (None, None))))
    assert capture.facts.error_code == ER_BAD_NULL_ERROR

    capture = verified(await exchange(connection, execute_payload(987_654, ())))
    assert capture.facts.error_code == ER_UNKNOWN_STMT_HANDLER


async def test_stmt_execute_call_with_result_sets(connection: BackendConnection) -> None:
    await setup_table(connection)
    await run(
        connection,
        "CREATE PROCEDURE p(IN lim INT) BEGIN SELECT id FROM t WHERE id <= lim; SELECT 'z'; END",
    )
    prepared = (await prepare(connection, "CALL p(?)")).facts.prepared
    assert prepared is not None
    capture = verified(await exchange(connection, execute_payload(prepared[0], (2,))))
    results = decode(capture)
    assert [r.kind for r in results] == ["rows", "rows", "ok"]
    assert binary_rows(results[0]) == [(1,), (2,)]
    assert capture.facts.results == 3 and not capture.facts.status & MORE


async def test_stmt_cursor_fetch_reset(connection: BackendConnection) -> None:
    await setup_table(connection)
    await run(connection, "INSERT INTO t (name) VALUES ('d'), ('e')")
    prepared = (await prepare(connection, "SELECT id, name FROM t ORDER BY id")).facts.prepared
    assert prepared is not None
    statement = prepared[0]

    opened = verified(
        await exchange(
            connection, execute_payload(statement, (), flags=CURSOR_TYPE_READ_ONLY), "cursor"
        )
    )
    # The response ends after the column definitions: no rows yet.
    (result,) = decode(opened)
    assert [c.name for c in result.columns] == ["id", "name"] and result.rows == []
    assert opened.facts.status & Status.CURSOR_EXISTS
    assert opened.facts.results == 1
    assert len(opened.packets) == 1 + 2 + 1

    first = verified(await exchange(connection, fetch_payload(statement, 2), "fetch 2"))
    assert fetched_rows(first, opened) == [(1, b"a"), (2, b"b")]
    assert first.facts.status & Status.CURSOR_EXISTS
    assert not first.facts.status & Status.LAST_ROW_SENT
    assert first.facts.results == 1

    rest = verified(await exchange(connection, fetch_payload(statement, 100), "fetch rest"))
    assert fetched_rows(rest, opened) == [(3, b"c"), (4, b"d"), (5, b"e")]
    assert rest.facts.status & Status.LAST_ROW_SENT

    # Reset closes the cursor; fetching from it is then an error.
    reset = verified(await exchange(connection, statement_payload(Command.STMT_RESET, statement)))
    assert reset.facts.error_code == 0 and reset.facts.status & AUTOCOMMIT
    after = verified(await exchange(connection, fetch_payload(statement, 1), "fetch closed"))
    assert after.facts.error_code == ER_NO_OPEN_CURSOR

    # Reopen, fetch exactly all rows, then once more.
    verified(
        await exchange(connection, execute_payload(statement, (), flags=CURSOR_TYPE_READ_ONLY))
    )
    exact = verified(await exchange(connection, fetch_payload(statement, 5)))
    assert len(fetched_rows(exact, opened)) == 5
    if not exact.facts.status & Status.LAST_ROW_SENT:
        final = verified(await exchange(connection, fetch_payload(statement, 5)))
        assert fetched_rows(final, opened) == []
        assert final.facts.status & Status.LAST_ROW_SENT

    bad = verified(await exchange(connection, statement_payload(Command.STMT_RESET, 424_242)))
    assert bad.facts.error_code == ER_UNKNOWN_STMT_HANDLER

    # COM_STMT_CLOSE has no response; the next command's bytes are its own.
    await connection.send_all(frame_command(statement_payload(Command.STMT_CLOSE, statement)))
    gone = verified(await exchange(connection, execute_payload(statement)))
    assert gone.facts.error_code == ER_UNKNOWN_STMT_HANDLER


async def test_stmt_cursor_on_statement_without_result_set(connection: BackendConnection) -> None:
    await setup_table(connection)
    prepared = (await prepare(connection, "UPDATE t SET note = ? WHERE id = 1")).facts.prepared
    assert prepared is not None
    capture = verified(
        await exchange(
            connection, execute_payload(prepared[0], ("q",), flags=CURSOR_TYPE_READ_ONLY)
        )
    )
    (result,) = decode(capture)
    assert result.kind == "ok" and not capture.facts.status & Status.CURSOR_EXISTS


def frame_command(payload: bytes) -> bytes:
    return frame(payload, 0)[0]


def fetched_rows(fetch: Capture, opened: Capture) -> list[tuple[object, ...]]:
    """COM_STMT_FETCH rows, decoded with the columns from the cursor's execute."""
    (result,) = decode(fetch)
    assert result.err is None
    return binary_rows(Result("rows", columns=decode(opened)[0].columns, rows=result.rows))


# -- LOCAL INFILE ----------------------------------------------------------------


async def test_local_infile(primary: sandbox.Instance, database: str, variant: str) -> None:
    connection = await open_connection(primary.port, database, VARIANTS[variant], local_files=True)
    try:
        await setup_table(connection)
        sql = "LOAD DATA LOCAL INFILE 'rows.csv' INTO TABLE t FIELDS TERMINATED BY ',' (name, note)"
        capture = await run(connection, sql, infile=[b"f,one\ng,", b"two\n"])
        assert len(capture.segments) == 2
        request, answer = capture.packets
        assert request.payload == b"\xfbrows.csv"
        assert answer.sequence == request.sequence + 4  # after two data packets and the empty one
        ok = Ok.parse(answer.payload, capture.capabilities)
        assert ok.affected_rows == 2
        assert capture.facts.results == 1 and capture.facts.error_code == 0
        assert capture.facts.ends == tuple(len(s) for s in capture.segments)

        capture = await run(connection, sql)  # an empty file
        assert Ok.parse(capture.packets[-1].payload, capture.capabilities).affected_rows == 0

        # A request longer than the tracker's peek window (24 bytes), which
        # the byte-by-byte replay splits after the peek.
        long_name = "/var/lib/app/imports/orders-2024-11-25.csv"
        capture = await run(
            connection,
            f"LOAD DATA LOCAL INFILE '{long_name}' INTO TABLE t FIELDS TERMINATED BY ',' (name)",
            infile=[b"i\n"],
        )
        assert capture.packets[0].payload == b"\xfb" + long_name.encode()
        assert Ok.parse(capture.packets[-1].payload, capture.capabilities).affected_rows == 1

        # The server answers the upload with an error.
        await run(connection, "CREATE TABLE guarded (v INT)")
        await run(
            connection,
            "CREATE TRIGGER no_rows BEFORE INSERT ON guarded FOR EACH ROW "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused'",
        )
        capture = await run(
            connection, "LOAD DATA LOCAL INFILE 'x' INTO TABLE guarded", infile=[b"1\n"]
        )
        assert len(capture.segments) == 2
        assert capture.facts.error_code == ER_SIGNAL_EXCEPTION

        # A LOCAL INFILE in the middle of a multi-statement.
        capture = await run(connection, f"SELECT 1; {sql}; SELECT 2", infile=[b"h,\n"])
        assert [r.kind for r in decode(capture)] == ["rows", "infile", "ok", "rows"]
        assert capture.facts.results == 3

        # Refused before any request when the table is missing.
        capture = await run(connection, "LOAD DATA LOCAL INFILE 'x' INTO TABLE nope")
        assert len(capture.segments) == 1 and capture.facts.error_code == ER_NO_SUCH_TABLE
    finally:
        await connection.aclose()


async def test_local_infile_refused_without_capability(connection: BackendConnection) -> None:
    assert not connection.capabilities & Capability.LOCAL_FILES
    await setup_table(connection)
    capture = await run(connection, "LOAD DATA LOCAL INFILE 'x' INTO TABLE t (name)")
    assert len(capture.segments) == 1
    assert capture.facts.error_code == ER_LOAD_INFILE_CAPABILITY_DISABLED


# -- rows larger than 16 MiB ------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        17 * 1024 * 1024,  # lenenc 0xfe prefix: the row starts like an EOF packet
        0xFFFFFF - 4,  # payload exactly 0xffffff: an empty continuation frame follows
        0xFFFFFF - 5,  # one frame of 0xfffffe
    ],
)
async def test_rows_larger_than_16_mib(primary: sandbox.Instance, database: str, size: int) -> None:
    for extra in (0, int(Capability.DEPRECATE_EOF)):
        connection = await open_connection(primary.port, database, extra)
        try:
            capture = await run(connection, f"SELECT REPEAT('x', {size}) AS big, 7 AS small")
            (result,) = decode(capture)
            assert text_rows(result) == [(b"x" * size, b"7")]
            assert capture.facts.results == 1 and capture.facts.error_code == 0

            prepared = (await prepare(connection, "SELECT REPEAT('y', ?), NULL")).facts.prepared
            assert prepared is not None
            capture = verified(await exchange(connection, execute_payload(prepared[0], (size,))))
            assert binary_rows(decode(capture)[0]) == [(b"y" * size, None)]
        finally:
            await connection.aclose()


# -- shapes that stretch the tracker ------------------------------------------------


async def test_wide_and_long_results_wrap_the_sequence(connection: BackendConnection) -> None:
    # 300 columns: a 0xfc column count and more than 256 packets per response.
    columns = ", ".join(f"{i} AS c{i}" for i in range(300))
    capture = await run(connection, f"SELECT {columns}")
    assert capture.packets[0].payload == b"\xfc\x2c\x01"
    (result,) = decode(capture)
    assert len(result.columns) == 300
    assert text_rows(result) == [tuple(str(i).encode() for i in range(300))]
    assert capture.facts.last_sequence == len(capture.packets) % 256

    capture = await run(connection, "SELECT seq, NULL FROM seq_1_to_700")
    (result,) = decode(capture)
    assert len(result.rows) == 700
    assert capture.facts.last_sequence == len(capture.packets) % 256


async def test_ok_with_long_length_encoded_integers(connection: BackendConnection) -> None:
    # 9-byte affected-rows and insert-id fields put the status at its
    # furthest offset from the header.
    await run(
        connection,
        "CREATE TABLE big (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, v INT)"
        " AUTO_INCREMENT = 18446744073709551000",
    )
    await run(connection, "BEGIN")
    capture = await run(connection, "INSERT INTO big (v) SELECT seq FROM seq_1_to_300")
    (result,) = decode(capture)
    assert result.ok is not None
    assert (result.ok.affected_rows, result.ok.last_insert_id) == (300, 18446744073709551000)
    assert capture.packets[0].payload[1:4] == b"\xfc\x2c\x01"
    assert capture.packets[0].payload[4] == 0xFE
    assert capture.facts.status & IN_TRANS
    capture = await run(connection, "COMMIT")
    assert not capture.facts.status & IN_TRANS


async def test_call_error_after_a_result_set(connection: BackendConnection) -> None:
    await run(
        connection,
        "CREATE PROCEDURE p() BEGIN SELECT 1; SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'stop'; END",
    )
    capture = await run(connection, "CALL p()")
    assert [r.kind for r in decode(capture)] == ["rows", "err"]
    assert capture.facts.error_code == ER_SIGNAL_EXCEPTION
    assert capture.facts.results == 1


async def test_status_after_error_ending_a_multi_result_response(
    connection: BackendConnection,
) -> None:
    capture = await run(connection, "SELECT 1; SELECT * FROM nope; SELECT 2")
    assert capture.facts.done and capture.facts.error_code == ER_NO_SUCH_TABLE
    assert not capture.facts.status & MORE


async def test_stmt_execute_out_parameters(connection: BackendConnection) -> None:
    await run(
        connection, "CREATE PROCEDURE p(IN a INT, OUT b INT) BEGIN SELECT a; SET b = a * 2; END"
    )
    prepared = (await prepare(connection, "CALL p(?, ?)")).facts.prepared
    assert prepared is not None
    capture = verified(await exchange(connection, execute_payload(prepared[0], (21, None))))
    results = decode(capture)
    assert [r.kind for r in results] == ["rows", "rows", "ok"]
    assert binary_rows(results[0]) == [(21,)]
    assert binary_rows(results[1]) == [(42,)]  # the OUT parameters
    assert result_statuses(capture)[1] & Status.PS_OUT_PARAMS
    assert capture.facts.results == 3


async def test_stmt_send_long_data_has_no_response(connection: BackendConnection) -> None:
    prepared = (await prepare(connection, "SELECT ?, LENGTH(?)")).facts.prepared
    assert prepared is not None
    statement = prepared[0]
    for param in (0, 1):
        for part in (b"ab" * 1000, b"cd"):
            long_data = (
                statement_payload(Command.STMT_SEND_LONG_DATA, statement)
                + param.to_bytes(2, "little")
                + part
            )
            await connection.send_all(frame(long_data, 0)[0])
    # The long data fills both parameters; the execute sends only their types.
    payload = execute_payload(statement, ("", ""))
    capture = verified(await exchange(connection, payload))
    assert binary_rows(decode(capture)[0]) == [(b"ab" * 1000 + b"cd", 2002)]


async def test_session_track_ok_packets(connection: BackendConnection, variant: str) -> None:
    await setup_table(connection)
    for sql in (
        "SET SESSION session_track_state_change = ON",
        "SET SESSION session_track_transaction_info = CHARACTERISTICS",
        "SET SESSION session_track_system_variables = '*'",
    ):
        await run(connection, sql)
    for sql, flags in (
        ("START TRANSACTION READ ONLY", IN_TRANS),
        ("SELECT name FROM t WHERE id = 1", IN_TRANS),
        ("COMMIT", 0),
        ("SET SESSION sql_mode = 'ANSI_QUOTES'", 0),
        ("USE mysql", 0),
    ):
        capture = await run(connection, sql)
        assert capture.facts.status & IN_TRANS == flags, sql
        assert capture.facts.status & AUTOCOMMIT
        if "session_track" in variant and not sql.startswith("SELECT"):
            assert capture.facts.status & Status.SESSION_STATE_CHANGED, sql
            ok = Ok.parse(capture.packets[-1].payload, capture.capabilities)
            assert len(ok.info) > 1  # lenenc info + session state changes


async def test_change_user_auth_switch(connection: BackendConnection) -> None:
    """MariaDB answers every COM_CHANGE_USER with an AuthSwitch request."""
    from proxy.protocol import auth
    from proxy.protocol.packets import AuthSwitch
    from proxy.protocol.response import ResponseTracker
    from proxy.protocol.wire import ProtocolError, lenenc_int

    token = auth.native_token(auth.native_stage1("root"), connection.handshake.scramble)
    payload = (
        bytes((Command.CHANGE_USER,))
        + b"root\x00"
        + bytes((len(token),))
        + token
        + b"\x00"  # no database
        + (45).to_bytes(2, "little")
        + b"mysql_native_password\x00"
        + lenenc_int(0)  # no connection attributes
    )
    await connection.send_all(frame(payload, 0)[0])
    with trio.fail_after(10):
        (switch,) = await read_packets(connection, 1)
        request = AuthSwitch.parse(switch.payload)
        assert request.plugin == "mysql_native_password"
        answer = auth.native_token(auth.native_stage1("root"), request.data)
        await connection.send_all(frame(answer, switch.sequence + 1)[0])
        (ok,) = await read_packets(connection, 1)
    assert ok.first == 0x00 and ok.sequence == switch.sequence + 2
    await assert_aligned(connection)

    # The tracker refuses the auth exchange (the relay terminates
    # COM_CHANGE_USER itself) instead of calling the AuthSwitch the end.
    tracker = ResponseTracker(Command.CHANGE_USER, connection.capabilities)
    with pytest.raises(ProtocolError):
        tracker.feed(switch.raw)
    tracker = ResponseTracker(Command.CHANGE_USER, connection.capabilities)
    with pytest.raises(ProtocolError):  # also when it arrives a byte at a time
        for index in range(len(switch.raw)):
            tracker.feed(switch.raw[index : index + 1])
    # A server that accepts at once sends one OK, which is tracked normally.
    tracker = ResponseTracker(Command.CHANGE_USER, connection.capabilities)
    assert tracker.feed(ok.raw) == len(ok.raw) and tracker.done
