"""Shared fixtures. Keep this file tiny: fixtures live in their own modules and are registered here."""

from broker import mosquitto, mosquitto_factory, tls_certs

__all__ = ["mosquitto", "mosquitto_factory", "tls_certs"]
