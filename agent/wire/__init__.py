"""The heald wire protocol: versioned msgpack messages and their MQTT topics.

Shared with the coordinator, which imports ``agent.wire`` without the rest of the agent: this
package imports only the stdlib, msgspec and :mod:`agent.errors`. See docs/wire.md.
"""

from agent.wire.codec import (
    DEFAULT_MAX_BYTES,
    DELIVERY,
    Delivery,
    decode,
    decode_command,
    decode_json,
    delivery_for,
    encode,
    encode_json,
)
from agent.wire.errors import (
    WireDecodeError,
    WireError,
    WireKindError,
    WireTooLarge,
    WireTopicError,
    WireVersionError,
)
from agent.wire.messages import (
    ANY_TARGET,
    KINDS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Action,
    Birth,
    Command,
    CommandAck,
    Contribution,
    Envelope,
    Event,
    Forecast,
    Message,
    Metrics,
    MetricSample,
    Risk,
    Status,
    kind_of,
)
from agent.wire.topics import (
    ALL,
    FLEET_FILTER,
    ROOT,
    SUFFIX,
    Topic,
    command_matches,
    command_topics,
    parse_topic,
    topic_for,
    topic_of,
)

__all__ = [
    "ALL", "ANY_TARGET", "DEFAULT_MAX_BYTES", "DELIVERY", "FLEET_FILTER", "KINDS", "MESSAGE_TYPES",
    "PROTOCOL_VERSION", "ROOT", "SUFFIX", "SUPPORTED_VERSIONS", "Action", "Birth", "Command",
    "CommandAck", "Contribution", "Delivery", "Envelope", "Event", "Forecast", "Message", "MetricSample",
    "Metrics", "Risk", "Status", "Topic", "WireDecodeError", "WireError", "WireKindError", "WireTooLarge",
    "WireTopicError", "WireVersionError", "command_matches", "command_topics", "decode", "decode_command",
    "decode_json", "delivery_for", "encode", "encode_json", "kind_of", "parse_topic", "topic_for",
    "topic_of",
]
