"""The LED/LCD board: content, rendering, previews, the service that drives the board driver."""
