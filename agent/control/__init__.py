"""The coordinator -> node direction: signed commands, lease answers, silences, approvals.

Data flows the other way through the rest of the agent (collect -> ... -> report). What the
coordinator sends back arrives on the report stage's MQTT session and is handled here:

- :mod:`agent.control.receiver` decodes messages off the command topics and drops what is
  malformed or meant for another node (counted, logged);
- :mod:`agent.control.dispatcher` verifies each command's signature (:mod:`agent.wire.signing`,
  keys from :mod:`agent.control.keys`), acknowledges it, and acts through the playbook engine:
  ``run``/``approve`` start a run, ``deny`` refuses an approval, ``status`` reports, ``silence``
  holds automatic runs and ``unsilence`` lifts that hold (:mod:`agent.control.silence`);
- :mod:`agent.control.leases` is the engine's lease gate: before a disruptive step it asks the
  coordinator for a share of the fleet's blast-radius budget and waits for the signed answer.

Command names and request-event names are :class:`agent.wire.CommandName` and
:class:`agent.wire.RequestEvent`; acknowledgements and requests leave through the report stage
(:class:`agent.control.outbox.Outbox`).
"""
