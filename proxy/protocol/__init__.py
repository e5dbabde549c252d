"""Sans-I/O MySQL client/server protocol: framing, handshake, auth, responses.

Standard library only; no sockets, no trio, no clock.  Every malformed input
ends as ``ProtocolError``.
"""

from proxy.protocol.wire import ProtocolError

__all__ = ["ProtocolError"]
