"""ttcs-agent: the daemon in each commune loudspeaker cabinet and LED information board."""

__version__ = "0.1.0"
