"""Schedules and boards (filled in below)."""

ROUTES: list = []
