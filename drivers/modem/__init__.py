"""3G/4G modems: status over the AT port."""
