"""Records from a message broker (Redis Streams): the wire format and :func:`publish` (:mod:`.wire`), a consumer
with explicit acknowledgement (:mod:`.reader`), the committed-range ledger and fault points (:mod:`.ledger`), a
local server for tests (:mod:`.server`). No Beam here: :mod:`vaestream.beam.broker_source` builds the
streaming sources on this, and :class:`vaestream.online.OnlineLearner` follows a stream with it."""

from vaestream.broker.ledger import Ledger, fault
from vaestream.broker.reader import Acker, BrokerReader
from vaestream.broker.wire import BrokerError, BrokerURL, Message, WireError, decode, encode, publish

__all__ = ["Acker", "BrokerError", "BrokerReader", "BrokerURL", "Ledger", "Message", "WireError", "decode",
           "encode", "fault", "publish"]
