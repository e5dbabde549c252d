"""Packet payloads: OK/ERR/EOF, handshake v10, handshake response 41, auth switch.

Each type is a frozen dataclass with ``parse`` (payload -> value, raising
``ProtocolError``) and ``encode`` (value -> payload).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.protocol.constants import SQLSTATE, Capability, ErrorCode
from proxy.protocol.wire import ProtocolError, Reader, lenenc_bytes, lenenc_int, u16, u32

OK_HEADER = 0x00
EOF_HEADER = 0xFE
ERR_HEADER = 0xFF
LOCAL_INFILE_HEADER = 0xFB
AUTH_MORE_DATA_HEADER = 0x01


@dataclass(frozen=True, slots=True)
class Ok:
    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = 0
    warnings: int = 0
    info: bytes = b""
    header: int = OK_HEADER

    @classmethod
    def parse(cls, payload: bytes, capabilities: int) -> Ok:
        reader = Reader(payload)
        header = reader.u8()
        if header not in (OK_HEADER, EOF_HEADER):
            raise ProtocolError(f"not an OK packet (header 0x{header:02x})")
        affected = reader.lenenc_int()
        insert_id = reader.lenenc_int()
        status = warnings = 0
        if capabilities & Capability.PROTOCOL_41:
            status = reader.u16()
            warnings = reader.u16()
        elif capabilities & Capability.TRANSACTIONS:
            status = reader.u16()
        return cls(affected, insert_id, status, warnings, reader.rest(), header)

    def encode(self) -> bytes:
        return (
            bytes((self.header,))
            + lenenc_int(self.affected_rows)
            + lenenc_int(self.last_insert_id)
            + u16(self.status)
            + u16(self.warnings)
            + self.info
        )


@dataclass(frozen=True, slots=True)
class Err:
    code: int
    message: str
    sql_state: str = "HY000"

    @classmethod
    def parse(cls, payload: bytes) -> Err:
        reader = Reader(payload)
        if reader.u8() != ERR_HEADER:
            raise ProtocolError("not an ERR packet")
        code = reader.u16()
        sql_state = "HY000"
        if not reader.at_end() and payload[reader.position] == 0x23:  # '#'
            reader.u8()
            sql_state = reader.fixed(5).decode("ascii", "replace")
        return cls(code, reader.rest().decode("utf-8", "replace"), sql_state)

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> Err:
        return cls(int(code), message, SQLSTATE.get(code, "HY000"))

    def encode(self) -> bytes:
        state = (self.sql_state.encode("ascii", "replace") + b"00000")[:5]
        return b"\xff" + u16(self.code) + b"#" + state + self.message.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Eof:
    warnings: int = 0
    status: int = 0

    @classmethod
    def parse(cls, payload: bytes) -> Eof:
        reader = Reader(payload)
        if reader.u8() != EOF_HEADER:
            raise ProtocolError("not an EOF packet")
        if reader.remaining() >= 4:
            return cls(reader.u16(), reader.u16())
        return cls()

    def encode(self) -> bytes:
        return b"\xfe" + u16(self.warnings) + u16(self.status)


@dataclass(frozen=True, slots=True)
class Handshake:
    """Initial handshake packet (protocol version 10) sent by a server."""

    server_version: str
    connection_id: int
    scramble: bytes  # 20 bytes of nonce (part 1 + part 2 without the NUL)
    capabilities: int
    character_set: int
    status: int
    auth_plugin: str = "mysql_native_password"
    extended: bytes = b"\x00" * 10  # the reserved bytes (MariaDB keeps extended caps there)

    @classmethod
    def parse(cls, payload: bytes) -> Handshake:
        reader = Reader(payload)
        version = reader.u8()
        if version == ERR_HEADER:
            raise ProtocolError("server refused the connection: " + Err.parse(payload).message)
        if version != 10:
            raise ProtocolError(f"unsupported handshake protocol version {version}")
        server_version = reader.nul_bytes().decode("utf-8", "replace")
        connection_id = reader.u32()
        scramble = reader.fixed(8)
        reader.u8()  # filler
        capabilities = reader.u16()
        character_set = status = 0
        plugin = "mysql_native_password"
        extended = b"\x00" * 10
        if not reader.at_end():
            character_set = reader.u8()
            status = reader.u16()
            capabilities |= reader.u16() << 16
            auth_length = reader.u8()
            extended = reader.fixed(10)
            if capabilities & Capability.SECURE_CONNECTION:
                part2 = max(13, auth_length - 8)
                scramble += reader.fixed(part2).rstrip(b"\x00")[:12]
            if capabilities & Capability.PLUGIN_AUTH and not reader.at_end():
                tail = reader.rest()
                plugin = tail.split(b"\x00", 1)[0].decode("ascii", "replace")
        return cls(
            server_version,
            connection_id,
            scramble,
            capabilities,
            character_set,
            status,
            plugin,
            extended,
        )

    def encode(self) -> bytes:
        if len(self.scramble) != 20:
            raise ValueError("scramble must be 20 bytes")
        caps = self.capabilities
        return (
            b"\x0a"
            + self.server_version.encode("utf-8")
            + b"\x00"
            + u32(self.connection_id)
            + self.scramble[:8]
            + b"\x00"
            + u16(caps & 0xFFFF)
            + bytes((self.character_set,))
            + u16(self.status)
            + u16((caps >> 16) & 0xFFFF)
            + bytes((21,))
            + self.extended
            + self.scramble[8:]
            + b"\x00"
            + self.auth_plugin.encode("ascii")
            + b"\x00"
        )


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """HandshakeResponse41 sent by a client (or by us to a backend)."""

    capabilities: int
    max_packet: int
    character_set: int
    username: str
    auth_response: bytes
    database: str | None = None
    auth_plugin: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def is_ssl_request(payload: bytes) -> bool:
        if len(payload) != 32:
            return False
        capabilities = int.from_bytes(payload[:4], "little")
        return bool(capabilities & Capability.SSL)

    @classmethod
    def parse(cls, payload: bytes) -> HandshakeResponse:
        reader = Reader(payload)
        capabilities = reader.u32()
        if not capabilities & Capability.PROTOCOL_41:
            raise ProtocolError("client does not speak protocol 4.1 (HandshakeResponse320)")
        max_packet = reader.u32()
        character_set = reader.u8()
        reader.fixed(23)
        username = reader.nul_bytes().decode("utf-8", "replace")
        if capabilities & Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA:
            auth_response = reader.lenenc_bytes()
        elif capabilities & Capability.SECURE_CONNECTION:
            auth_response = reader.fixed(reader.u8())
        else:
            auth_response = reader.nul_bytes()
        database = None
        if capabilities & Capability.CONNECT_WITH_DB and not reader.at_end():
            database = reader.nul_bytes().decode("utf-8", "replace") or None
        plugin = None
        if capabilities & Capability.PLUGIN_AUTH and not reader.at_end():
            plugin = reader.nul_bytes().decode("ascii", "replace")
        attributes: dict[str, str] = {}
        if capabilities & Capability.CONNECT_ATTRS and not reader.at_end():
            block = Reader(reader.lenenc_bytes())
            while not block.at_end():
                key = block.lenenc_bytes().decode("utf-8", "replace")
                attributes[key] = block.lenenc_bytes().decode("utf-8", "replace")
        return cls(
            capabilities,
            max_packet,
            character_set,
            username,
            auth_response,
            database,
            plugin,
            attributes,
        )

    def encode(self) -> bytes:
        caps = self.capabilities
        out = bytearray()
        out += u32(caps)
        out += u32(self.max_packet)
        out.append(self.character_set)
        out += b"\x00" * 23
        out += self.username.encode("utf-8") + b"\x00"
        if caps & Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out += lenenc_bytes(self.auth_response)
        elif caps & Capability.SECURE_CONNECTION:
            out.append(len(self.auth_response))
            out += self.auth_response
        else:
            out += self.auth_response + b"\x00"
        if caps & Capability.CONNECT_WITH_DB:
            out += (self.database or "").encode("utf-8") + b"\x00"
        if caps & Capability.PLUGIN_AUTH:
            out += (self.auth_plugin or "").encode("ascii") + b"\x00"
        if caps & Capability.CONNECT_ATTRS:
            block = b"".join(
                lenenc_bytes(k.encode("utf-8")) + lenenc_bytes(v.encode("utf-8"))
                for k, v in self.attributes.items()
            )
            out += lenenc_bytes(block)
        return bytes(out)


def ssl_request(capabilities: int, max_packet: int, character_set: int) -> bytes:
    return u32(capabilities | Capability.SSL) + u32(max_packet) + bytes((character_set,)) + b"\x00" * 23


@dataclass(frozen=True, slots=True)
class AuthSwitch:
    plugin: str
    data: bytes

    @classmethod
    def parse(cls, payload: bytes) -> AuthSwitch:
        reader = Reader(payload)
        if reader.u8() != EOF_HEADER:
            raise ProtocolError("not an auth switch request")
        if reader.at_end():  # old-password switch request: no plugin name
            return cls("mysql_old_password", b"")
        plugin = reader.nul_bytes().decode("ascii", "replace")
        return cls(plugin, reader.rest())

    def encode(self) -> bytes:
        return b"\xfe" + self.plugin.encode("ascii") + b"\x00" + self.data


def auth_more_data(data: bytes) -> bytes:
    return b"\x01" + data


@dataclass(frozen=True, slots=True)
class Column:
    """A column definition (protocol 4.1); only what the proxy's own client needs."""

    schema: str
    table: str
    name: str
    character_set: int
    length: int
    type: int
    flags: int
    decimals: int

    @classmethod
    def parse(cls, payload: bytes) -> Column:
        reader = Reader(payload)
        reader.lenenc_bytes()  # catalog
        schema = reader.lenenc_bytes().decode("utf-8", "replace")
        table = reader.lenenc_bytes().decode("utf-8", "replace")
        reader.lenenc_bytes()  # org_table
        name = reader.lenenc_bytes().decode("utf-8", "replace")
        reader.lenenc_bytes()  # org_name
        reader.lenenc_int()  # length of fixed fields (0x0c)
        character_set = reader.u16()
        length = reader.u32()
        column_type = reader.u8()
        flags = reader.u16()
        decimals = reader.u8()
        return cls(schema, table, name, character_set, length, column_type, flags, decimals)


def parse_text_row(payload: bytes, columns: int) -> tuple[bytes | None, ...]:
    reader = Reader(payload)
    values: list[bytes | None] = []
    for _ in range(columns):
        if not reader.at_end() and payload[reader.position] == 0xFB:
            reader.u8()
            values.append(None)
        else:
            values.append(reader.lenenc_bytes())
    if not reader.at_end():
        raise ProtocolError("text row has trailing bytes")
    return tuple(values)
