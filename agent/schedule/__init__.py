"""Schedules: the model and planner, the persisted documents and slot log, the service."""
