"""Flagella: identity-aware network security for containers."""

__version__ = "0.1.0"
