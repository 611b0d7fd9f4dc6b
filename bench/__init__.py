"""`llmserve bench`: a load client for any OpenAI-compatible streaming endpoint.

It lives beside the server, not in it: it imports nothing from `server/` or `sidecar/`, so the
same measurement runs against llmserve and against the servers it is compared with.
"""
