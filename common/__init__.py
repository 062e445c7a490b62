"""Shared helpers for the algorithm files: no algorithm logic lives here."""
