"""Protocol numbers: capability and status flags, commands, error codes."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Capability(IntFlag):
    LONG_PASSWORD = 1 << 0  # "CLIENT_MYSQL" for MariaDB: no MariaDB extended caps
    FOUND_ROWS = 1 << 1
    LONG_FLAG = 1 << 2
    CONNECT_WITH_DB = 1 << 3
    NO_SCHEMA = 1 << 4
    COMPRESS = 1 << 5
    ODBC = 1 << 6
    LOCAL_FILES = 1 << 7
    IGNORE_SPACE = 1 << 8
    PROTOCOL_41 = 1 << 9
    INTERACTIVE = 1 << 10
    SSL = 1 << 11
    IGNORE_SIGPIPE = 1 << 12
    TRANSACTIONS = 1 << 13
    RESERVED = 1 << 14
    SECURE_CONNECTION = 1 << 15
    MULTI_STATEMENTS = 1 << 16
    MULTI_RESULTS = 1 << 17
    PS_MULTI_RESULTS = 1 << 18
    PLUGIN_AUTH = 1 << 19
    CONNECT_ATTRS = 1 << 20
    PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
    CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
    SESSION_TRACK = 1 << 23
    DEPRECATE_EOF = 1 << 24
    OPTIONAL_RESULTSET_METADATA = 1 << 25
    ZSTD_COMPRESSION = 1 << 26
    QUERY_ATTRIBUTES = 1 << 27
    MULTI_FACTOR_AUTHENTICATION = 1 << 28
    CAPABILITY_EXTENSION = 1 << 29
    SSL_VERIFY_SERVER_CERT = 1 << 30
    REMEMBER_OPTIONS = 1 << 31


#: What the relay can pass through faithfully.  Compression, optional
#: metadata, query attributes and MariaDB's extended capabilities change
#: packet shapes we would have to rewrite, so they are never offered.
RELAYABLE = (
    Capability.LONG_PASSWORD
    | Capability.FOUND_ROWS
    | Capability.LONG_FLAG
    | Capability.CONNECT_WITH_DB
    | Capability.NO_SCHEMA
    | Capability.ODBC
    | Capability.LOCAL_FILES
    | Capability.IGNORE_SPACE
    | Capability.PROTOCOL_41
    | Capability.INTERACTIVE
    | Capability.IGNORE_SIGPIPE
    | Capability.TRANSACTIONS
    | Capability.RESERVED
    | Capability.SECURE_CONNECTION
    | Capability.MULTI_STATEMENTS
    | Capability.MULTI_RESULTS
    | Capability.PS_MULTI_RESULTS
    | Capability.PLUGIN_AUTH
    | Capability.CONNECT_ATTRS
    | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | Capability.CAN_HANDLE_EXPIRED_PASSWORDS
    | Capability.SESSION_TRACK
    | Capability.DEPRECATE_EOF
)


class Status(IntFlag):
    IN_TRANS = 0x0001
    AUTOCOMMIT = 0x0002
    MORE_RESULTS_EXISTS = 0x0008
    NO_GOOD_INDEX_USED = 0x0010
    NO_INDEX_USED = 0x0020
    CURSOR_EXISTS = 0x0040
    LAST_ROW_SENT = 0x0080
    DB_DROPPED = 0x0100
    NO_BACKSLASH_ESCAPES = 0x0200
    METADATA_CHANGED = 0x0400
    QUERY_WAS_SLOW = 0x0800
    PS_OUT_PARAMS = 0x1000
    IN_TRANS_READONLY = 0x2000
    SESSION_STATE_CHANGED = 0x4000


class Command(IntEnum):
    SLEEP = 0x00
    QUIT = 0x01
    INIT_DB = 0x02
    QUERY = 0x03
    FIELD_LIST = 0x04
    CREATE_DB = 0x05
    DROP_DB = 0x06
    REFRESH = 0x07
    SHUTDOWN = 0x08
    STATISTICS = 0x09
    PROCESS_INFO = 0x0A
    CONNECT = 0x0B
    PROCESS_KILL = 0x0C
    DEBUG = 0x0D
    PING = 0x0E
    TIME = 0x0F
    DELAYED_INSERT = 0x10
    CHANGE_USER = 0x11
    BINLOG_DUMP = 0x12
    TABLE_DUMP = 0x13
    CONNECT_OUT = 0x14
    REGISTER_SLAVE = 0x15
    STMT_PREPARE = 0x16
    STMT_EXECUTE = 0x17
    STMT_SEND_LONG_DATA = 0x18
    STMT_CLOSE = 0x19
    STMT_RESET = 0x1A
    SET_OPTION = 0x1B
    STMT_FETCH = 0x1C
    DAEMON = 0x1D
    BINLOG_DUMP_GTID = 0x1E
    RESET_CONNECTION = 0x1F


#: Commands the server answers with nothing at all.
NO_RESPONSE = frozenset({Command.QUIT, Command.STMT_SEND_LONG_DATA, Command.STMT_CLOSE})

#: Commands a proxy must not relay: replication streams, internal commands.
UNSUPPORTED = frozenset(
    {
        Command.SLEEP,
        Command.CONNECT,
        Command.TIME,
        Command.DELAYED_INSERT,
        Command.BINLOG_DUMP,
        Command.TABLE_DUMP,
        Command.CONNECT_OUT,
        Command.REGISTER_SLAVE,
        Command.DAEMON,
        Command.BINLOG_DUMP_GTID,
    }
)


class ErrorCode(IntEnum):
    """Server error codes the proxy itself sends (see docs/errors.md)."""

    CON_COUNT_ERROR = 1040  # too many connections
    HANDSHAKE_ERROR = 1043  # bad handshake
    ACCESS_DENIED = 1045
    NO_DB_ERROR = 1046
    UNKNOWN_COM_ERROR = 1047
    SERVER_SHUTDOWN = 1053
    NOT_ALLOWED_COMMAND = 1148  # a routing rule rejected the statement
    NET_PACKET_TOO_LARGE = 1153
    NET_READ_ERROR = 1158
    NET_PACKETS_OUT_OF_ORDER = 1156
    NET_READ_INTERRUPTED = 1159
    NOT_SUPPORTED_AUTH_MODE = 1251
    TOO_MANY_CONCURRENT_TRXS = 1637  # lag backpressure: "too many requests", retry later
    SECURE_TRANSPORT_REQUIRED = 3159
    CONNECTION_ERROR = 2003  # cannot connect to the backend
    SERVER_LOST = 2013  # backend lost mid-command


SQLSTATE = {
    ErrorCode.CON_COUNT_ERROR: "08004",
    ErrorCode.HANDSHAKE_ERROR: "08S01",
    ErrorCode.ACCESS_DENIED: "28000",
    ErrorCode.NO_DB_ERROR: "3D000",
    ErrorCode.UNKNOWN_COM_ERROR: "08S01",
    ErrorCode.SERVER_SHUTDOWN: "08S01",
    ErrorCode.NOT_ALLOWED_COMMAND: "42000",
    ErrorCode.TOO_MANY_CONCURRENT_TRXS: "HY000",
    ErrorCode.NET_PACKET_TOO_LARGE: "08S01",
    ErrorCode.NET_READ_ERROR: "08S01",
    ErrorCode.NET_PACKETS_OUT_OF_ORDER: "08S01",
    ErrorCode.NET_READ_INTERRUPTED: "08S01",
    ErrorCode.NOT_SUPPORTED_AUTH_MODE: "08004",
    ErrorCode.SECURE_TRANSPORT_REQUIRED: "HY000",
    ErrorCode.CONNECTION_ERROR: "HY000",
    ErrorCode.SERVER_LOST: "HY000",
}

MAX_PACKET_PAYLOAD = 0xFFFFFF
UTF8MB4_GENERAL_CI = 45
