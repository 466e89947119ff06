"""The control vocabulary: command names (coordinator -> node), request events (node -> coordinator)
and acknowledgement statuses.

A command's ``name`` stays a plain string on the wire (an unknown name decodes, and the node
answers it ``failed: unknown command``), so these are :class:`enum.StrEnum` members that compare
equal to the strings both sides send. Both the agent's control stage and the coordinator import
them from here; nothing else spells these names.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal


class CommandName(StrEnum):
    """``Command.name``: what the coordinator asks a node to do."""

    RUN = "run"  # run a playbook now (manual run); ``args.playbook``
    RUN_PLAYBOOK = "run_playbook"  # the same, as the coordinator's API sends it
    APPROVE = "approve"  # approve a pending approval: the playbook runs; ``args.playbook``
    DENY = "deny"  # deny a pending approval; ``args.playbook``
    SILENCE = "silence"  # hold automatic playbook runs; ``args.until`` or ``args.duration_s``
    UNSILENCE = "unsilence"  # lift a silence: automatic playbook runs resume at once
    STATUS = "status"  # report playbook state and pending approvals in the ack's result
    LEASE_GRANT = "lease_grant"  # fleet blast-radius lease granted; ``args.request_id``, ``lease_id``
    LEASE_DENY = "lease_deny"  # lease refused; ``args.request_id``, ``reason``
    LEASE_REVOKE = "lease_revoke"  # a granted lease taken back; ``args.lease_id``
    BUNDLE_CHUNK = "bundle_chunk"  # a piece of a signed bundle (agent.wire.bundles); ``args.index``
    BUNDLE_ACTIVATE = "bundle_activate"  # switch a role (``live``/``shadow``) to ``args.bundle`` ("" = none)


#: Commands that start a playbook run on the node.
RUN_COMMANDS: Final = frozenset({CommandName.RUN, CommandName.RUN_PLAYBOOK, CommandName.APPROVE})
#: Commands that answer a node's lease request (handled at once, never queued).
LEASE_ANSWERS: Final = frozenset({CommandName.LEASE_GRANT, CommandName.LEASE_DENY, CommandName.LEASE_REVOKE})


class RequestEvent(StrEnum):
    """``Event.name`` of the events a node sends to ask the coordinator for something."""

    LEASE_REQUEST = "lease_request"  # before a disruptive step; ``labels.request_id``, ``value`` = ttl
    LEASE_RELEASE = "lease_release"  # the step is over; ``labels.lease_id``
    APPROVAL_REQUEST = "approval_request"  # a playbook waits for an operator; ``labels.request_id``


#: ``CommandAck.status``.
AckStatus = Literal["accepted", "rejected", "done", "failed", "expired"]
