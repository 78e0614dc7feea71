"""Losses as small modules that own their state (centres, normalisation layers)."""
