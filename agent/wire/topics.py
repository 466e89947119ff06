"""MQTT topics of the heald protocol.

``heald/v1/<site>/<node>/<suffix>`` where ``<suffix>`` is the kind (``cmd`` for commands,
``cmd_ack`` for their acknowledgements). Fleet-wide commands go to ``heald/v1/<site>/_all/cmd``
(every node of a site) and ``heald/v1/_all/_all/cmd`` (every node of every site). ``_all`` can
never be a node or site id (ids start with a letter or digit), so the names cannot collide.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from agent.wire.errors import WireTopicError
from agent.wire.messages import ANY_TARGET, ID_PATTERN, KINDS, Command, Envelope, kind_of

ROOT: Final = "heald/v1"
ALL: Final = "_all"

#: kind -> last topic level
SUFFIX: Final[dict[str, str]] = {kind: kind for kind in KINDS} | {"command": "cmd", "command_ack": "cmd_ack"}
_KIND_OF_SUFFIX: Final[dict[str, str]] = {suffix: kind for kind, suffix in SUFFIX.items()}
_ID = re.compile(ID_PATTERN)

#: What a coordinator subscribes to: every report of every node (commands excluded by kind).
FLEET_FILTER: Final = f"{ROOT}/+/+/+"


class Topic(NamedTuple):
    site: str  # an id, or ALL
    node: str  # an id, or ALL
    kind: str  # message kind ("command", not "cmd")


def _check_id(value: str, what: str, *, allow_all: bool) -> None:
    if allow_all and value == ALL:
        return
    if not _ID.match(value):
        raise WireTopicError(f"invalid {what} {value!r} for a topic (must match {ID_PATTERN})")


def topic_for(site: str, node: str, kind: str) -> str:
    """The topic for a message of ``kind`` from (or, for commands, to) ``node`` at ``site``.

    ``node``/``site`` may be :data:`ALL` (or ``*``) only for commands; ``site`` ALL needs node ALL.
    """
    if kind not in SUFFIX:
        raise WireTopicError(f"unknown message kind {kind!r}")
    is_cmd = kind == "command"
    site = ALL if is_cmd and site == ANY_TARGET else site
    node = ALL if is_cmd and node == ANY_TARGET else node
    _check_id(site, "site", allow_all=is_cmd)
    _check_id(node, "node", allow_all=is_cmd)
    if site == ALL and node != ALL:
        raise WireTopicError("a command to every site must also target every node")
    return f"{ROOT}/{site}/{node}/{SUFFIX[kind]}"


def topic_of(message: Envelope) -> str:
    """The topic a message is published on (for a command: its target)."""
    return topic_for(message.site, message.node, kind_of(message))


def parse_topic(topic: str) -> Topic:
    """Inverse of :func:`topic_for`. Raises :class:`WireTopicError`."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != ROOT:
        raise WireTopicError(f"not a heald v1 topic: {topic!r} (expected {ROOT}/<site>/<node>/<kind>)")
    site, node, suffix = parts[2], parts[3], parts[4]
    kind = _KIND_OF_SUFFIX.get(suffix)
    if kind is None:
        raise WireTopicError(f"unknown topic kind {suffix!r} in {topic!r}")
    is_cmd = kind == "command"
    _check_id(site, "site", allow_all=is_cmd)
    _check_id(node, "node", allow_all=is_cmd)
    if site == ALL and node != ALL:
        raise WireTopicError(f"{topic!r}: a command to every site must also target every node")
    return Topic(site, node, kind)


def command_topics(site: str, node: str) -> tuple[str, str, str]:
    """The three topics a node subscribes to for commands: its own, its site's, the fleet's."""
    return (topic_for(site, node, "command"), topic_for(site, ALL, "command"), topic_for(ALL, ALL, "command"))


def command_matches(command: Command, site: str, node: str) -> bool:
    """Whether a command targets ``node`` at ``site``."""
    return command.site in (site, ANY_TARGET) and command.node in (node, ANY_TARGET)
