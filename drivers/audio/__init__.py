"""Audio outputs: the base, the sim and libvlc."""
