"""Health: system samples, cabinet inputs, the service that reports them."""
