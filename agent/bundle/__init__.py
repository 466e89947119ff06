"""Bundles on the node: signed playbook sets from the coordinator, assembled, verified, kept and
switched (:mod:`agent.bundle.store`, :mod:`agent.bundle.control`), and a candidate set evaluated
beside the live one without acting (:mod:`agent.bundle.shadow`)."""
