"""Where a command's response ends, observed without copying it.

A relay forwards every backend chunk to the client as soon as it arrives and
feeds the same bytes to a ``ResponseTracker``.  The tracker walks frame
headers, looks at the first bytes of each logical packet, and says when the
response to one command is complete, with the final status flags (in
transaction? autocommit? more results?), the error code if any, and for
``COM_STMT_PREPARE`` the new statement id.  Row payloads are skipped, never
copied, so a 1 GiB result costs a few header peeks per packet.

The kind of each packet depends only on the command, the state and the
negotiated capabilities (``DEPRECATE_EOF``), never on guessing.
"""

from __future__ import annotations

from enum import IntEnum

from proxy.protocol.constants import MAX_PACKET_PAYLOAD, Capability, Command, Status
from proxy.protocol.wire import ProtocolError, Reader

# Plain ints on the hot path: IntFlag arithmetic builds enum objects (~1 us each).
_DEPRECATE_EOF = int(Capability.DEPRECATE_EOF)
_MORE_RESULTS = int(Status.MORE_RESULTS_EXISTS)
_CURSOR_EXISTS = int(Status.CURSOR_EXISTS)
_QUERY = int(Command.QUERY)
_EXECUTE = int(Command.STMT_EXECUTE)
_CHANGE_USER = int(Command.CHANGE_USER)

#: Bytes of each logical packet the tracker looks at: enough for an OK
#: packet's header, two 9-byte length-encoded integers and the status flags,
#: and for a prepare-OK packet.
PEEK = 24


class State(IntEnum):
    FIRST = 0  # first packet of a (next) result: OK / ERR / LOCAL INFILE / column count
    COLUMNS = 1
    COLUMNS_EOF = 2
    ROWS = 3
    PREPARE_FIRST = 4
    PREPARE_PARAMS = 5
    PREPARE_PARAMS_EOF = 6
    PREPARE_COLUMNS = 7
    PREPARE_COLUMNS_EOF = 8
    GENERIC = 9  # one OK / EOF / ERR packet
    SINGLE = 10  # any one packet (COM_STATISTICS)
    INFILE = 11  # paused: the client is sending a LOCAL INFILE
    DONE = 12


_RESULT_COMMANDS = frozenset({Command.QUERY, Command.STMT_EXECUTE, Command.PROCESS_INFO})
_ROWS_COMMANDS = frozenset({Command.STMT_FETCH, Command.FIELD_LIST})


class ResponseTracker:
    """Incremental observer of one command's response."""

    __slots__ = (
        "_continuation",
        "_deprecate_eof",
        "_finishing",
        "_infile_pending",
        "_partial",
        "_remaining",
        "_skip",
        "command",
        "error_code",
        "last_sequence",
        "prepared",
        "results",
        "state",
        "status",
        "status_known",
    )

    def __init__(self, command: int, capabilities: int) -> None:
        self.command = command
        self._deprecate_eof = bool(capabilities & _DEPRECATE_EOF)
        self.status = 0
        #: whether a packet of this response carried status flags (0 is a real value)
        self.status_known = False
        self.error_code = 0
        self.last_sequence = -1
        #: (statement id, columns, params) after a successful COM_STMT_PREPARE
        self.prepared: tuple[int, int, int] | None = None
        self.results = 0
        self._skip = 0
        self._remaining = 0
        self._finishing = False
        self._infile_pending = False
        self._continuation = False
        self._partial = b""
        if command in _RESULT_COMMANDS:
            self.state = State.FIRST
        elif command in _ROWS_COMMANDS:
            self.state = State.ROWS
        elif command == Command.STMT_PREPARE:
            self.state = State.PREPARE_FIRST
        elif command == Command.STATISTICS:
            self.state = State.SINGLE
        else:
            self.state = State.GENERIC

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def infile_requested(self) -> bool:
        return self.state is State.INFILE

    def resume_after_infile(self) -> None:
        """The client finished its LOCAL INFILE data; the server answers next."""
        if self.state is not State.INFILE:
            raise ProtocolError("no LOCAL INFILE request is pending")
        self.state = State.FIRST

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Observe bytes.  Returns -1 while the response goes on, otherwise the
        offset in ``data`` just past the response's last packet (or past the
        LOCAL INFILE request, see ``infile_requested``)."""
        if self.state is State.DONE or self.state is State.INFILE:
            raise ProtocolError("bytes arrived after the response ended")
        shift = len(self._partial)
        if shift:
            buffer = self._partial + bytes(data)
            self._partial = b""
        else:
            buffer = data if isinstance(data, bytes) else bytes(data)
        size = len(buffer)
        position = 0
        while position < size:
            skip = self._skip
            if skip:
                available = size - position
                if skip > available:
                    self._skip = skip - available
                    return -1
                position += skip
                self._skip = 0
                if self._finishing and not self._continuation:
                    self._finish()
                    return position - shift
                continue
            if size - position < 4:
                self._partial = buffer[position:]
                return -1
            length = buffer[position] | (buffer[position + 1] << 8) | (buffer[position + 2] << 16)
            need = length if length < PEEK else PEEK
            if size - position - 4 < need:
                self._partial = buffer[position:]
                return -1
            self.last_sequence = buffer[position + 3]
            start = position + 4
            if self._continuation:
                # A frame that continues a >16 MiB logical packet: nothing to see.
                self._continuation = length == MAX_PACKET_PAYLOAD
            else:
                self._continuation = length == MAX_PACKET_PAYLOAD
                self._packet(buffer, start, length)
            position = start
            self._skip = length
            if length == 0 and self._finishing and not self._continuation:
                self._finish()
                return position - shift
        return -1

    def _finish(self) -> None:
        # A LOCAL INFILE request pauses the response instead of ending it; the
        # pause starts only once the whole request packet has been seen.
        self._finishing = False
        if self._infile_pending:
            self._infile_pending = False
            self.state = State.INFILE
        else:
            self.state = State.DONE

    # -- one logical packet ---------------------------------------------

    def _status_from_ok(self, buffer: bytes, start: int, length: int) -> None:
        reader = Reader(buffer[start : start + min(length, PEEK)])
        reader.u8()
        reader.lenenc_int()
        reader.lenenc_int()
        self.status = reader.u16()
        self.status_known = True

    def _status_from_eof(self, buffer: bytes, start: int, length: int) -> None:
        if length >= 5:
            self.status = buffer[start + 3] | (buffer[start + 4] << 8)
            self.status_known = True

    def _terminator(self, buffer: bytes, start: int, length: int) -> bool:
        """Is this 0xFE packet the end of rows (not a row or column)?"""
        if self._deprecate_eof:
            if length >= MAX_PACKET_PAYLOAD:
                return False
            self._status_from_ok(buffer, start, length)
        else:
            if length >= 9:
                return False
            self._status_from_eof(buffer, start, length)
        return True

    def _end_of_result(self) -> None:
        self.results += 1
        if self.status & _MORE_RESULTS:
            self.state = State.FIRST
        else:
            self._finishing = True

    def _error(self, buffer: bytes, start: int, length: int) -> None:
        # An ERR ends the whole response, even after results that announced more.
        self.status &= ~_MORE_RESULTS
        if length >= 3:
            self.error_code = buffer[start + 1] | (buffer[start + 2] << 8)
        else:
            raise ProtocolError("truncated ERR packet")
        self._finishing = True

    def _packet(self, buffer: bytes, start: int, length: int) -> None:
        state = self.state
        if length == 0:
            if state is State.SINGLE:
                self._finishing = True
                return
            raise ProtocolError(f"empty packet in response state {state.name}")
        first = buffer[start]
        if state is State.ROWS:
            if first == 0xFE and self._terminator(buffer, start, length):
                if self.command == _EXECUTE and self.status & _CURSOR_EXISTS:
                    self.results += 1
                    self._finishing = True
                else:
                    self._end_of_result()
            elif first == 0xFF:
                self._error(buffer, start, length)
            return
        if state is State.COLUMNS:
            self._remaining -= 1
            if self._remaining == 0:
                self.state = State.ROWS if self._deprecate_eof else State.COLUMNS_EOF
            return
        if state is State.FIRST:
            if first == 0x00:
                self._status_from_ok(buffer, start, length)
                self._end_of_result()
            elif first == 0xFF:
                self._error(buffer, start, length)
            elif first == 0xFB:
                if self.command != _QUERY:
                    raise ProtocolError("LOCAL INFILE request outside COM_QUERY")
                self._infile_pending = True
                self._finishing = True
            else:
                count = Reader(buffer[start : start + min(length, PEEK)]).lenenc_int()
                if count == 0:
                    raise ProtocolError("result set with zero columns")
                self._remaining = count
                self.state = State.COLUMNS
            return
        if state is State.COLUMNS_EOF:
            if first == 0xFF:
                self._error(buffer, start, length)
                return
            if first != 0xFE:
                raise ProtocolError("expected EOF after column definitions")
            self._status_from_eof(buffer, start, length)
            if self.command == _EXECUTE and self.status & _CURSOR_EXISTS:
                self.results += 1
                self._finishing = True
            else:
                self.state = State.ROWS
            return
        if state is State.GENERIC:
            if self.command == _CHANGE_USER and first in (0xFE, 0x01):
                # An auth exchange, not a response: the relay terminates
                # COM_CHANGE_USER itself and never relays it.
                raise ProtocolError("COM_CHANGE_USER answered with an auth exchange")
            if first == 0x00:
                self._status_from_ok(buffer, start, length)
            elif first == 0xFE:
                if length >= 7 and self._deprecate_eof:
                    self._status_from_ok(buffer, start, length)
                else:
                    self._status_from_eof(buffer, start, length)
            elif first == 0xFF:
                self._error(buffer, start, length)
                return
            else:
                raise ProtocolError(f"unexpected packet 0x{first:02x} for command 0x{self.command:02x}")
            self._finishing = True
            return
        if state is State.SINGLE:
            if first == 0xFF:
                self._error(buffer, start, length)
            else:
                self._finishing = True
            return
        if state is State.PREPARE_FIRST:
            if first == 0xFF:
                self._error(buffer, start, length)
                return
            if first != 0x00 or length < 12:
                raise ProtocolError("malformed COM_STMT_PREPARE response")
            reader = Reader(buffer[start + 1 : start + 12])
            statement = reader.u32()
            columns = reader.u16()
            params = reader.u16()
            self.prepared = (statement, columns, params)
            self._prepare_next(params, columns)
            return
        if state is State.PREPARE_PARAMS:
            self._remaining -= 1
            if self._remaining == 0:
                if self._deprecate_eof:
                    self._after_params()
                else:
                    self.state = State.PREPARE_PARAMS_EOF
            return
        if state is State.PREPARE_PARAMS_EOF:
            if first != 0xFE:
                raise ProtocolError("expected EOF after parameter definitions")
            self._after_params()
            return
        if state is State.PREPARE_COLUMNS:
            self._remaining -= 1
            if self._remaining == 0:
                if self._deprecate_eof:
                    self._finishing = True
                else:
                    self.state = State.PREPARE_COLUMNS_EOF
            return
        if state is State.PREPARE_COLUMNS_EOF:
            if first != 0xFE:
                raise ProtocolError("expected EOF after prepared column definitions")
            self._finishing = True
            return
        raise ProtocolError(f"packet in state {state.name}")

    def _prepare_next(self, params: int, columns: int) -> None:
        if params:
            self._remaining = params
            self.state = State.PREPARE_PARAMS
        elif columns:
            self._remaining = columns
            self.state = State.PREPARE_COLUMNS
        else:
            self._finishing = True

    def _after_params(self) -> None:
        assert self.prepared is not None
        columns = self.prepared[1]
        if columns:
            self._remaining = columns
            self.state = State.PREPARE_COLUMNS
        else:
            self._finishing = True
