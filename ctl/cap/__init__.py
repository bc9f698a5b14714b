"""CAP 1.2 alerts in (docs/CAP.md): ttcs-ctl cap ingest|watch|status."""
