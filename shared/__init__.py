"""What the server and the sidecar both import: the event protocol and its sender, JSON
logging, systemd notification, and the contract between `llmserve serve` and its sidecar child.

The server imports this, never the sidecar's process code; the sidecar never imports the server.
"""
