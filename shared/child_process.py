"""The contract between `llmserve serve` and the sidecar child it runs.

The server marks the child's environment with its own pid, so the child knows it is one and
waits for the server's drain (its stdin from the server is its lifeline) instead of stopping on
a signal to the process group.
"""

__all__ = ["PARENT_PID_ENV"]

PARENT_PID_ENV = "_LLMSERVE_PARENT_PID"
