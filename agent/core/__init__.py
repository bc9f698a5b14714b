"""The core: one thread that owns the state; the MQTT link, store, outbox, clock, alerts."""
