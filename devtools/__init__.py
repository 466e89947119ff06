"""Developer and test tools: not part of the product, never shipped in the wheel.

Used by ``tests/`` and ``bench/`` (the repository root is on their import path); nothing in
``agent/`` or ``coordinator/`` imports from here (tests/test_architecture.py checks it).
"""
