"""llmserve's metrics sidecar: turns the server's per-request events into metrics and logs."""
