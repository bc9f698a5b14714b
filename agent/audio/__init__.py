"""Audio: commands to items, the arbiter, media cache, text-to-speech, stream failover,
the amplifier."""
