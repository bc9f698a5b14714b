"""ttcs-ctl: the district controller (keys, signed commands, fleet watch, relay, reports)."""
