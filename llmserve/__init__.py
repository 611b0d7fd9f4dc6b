"""llmserve: an OpenAI-compatible LLM server with a metrics sidecar.

The code lives in the repository's top-level folders; this package links them under one name:
`llmserve.server` (the request path), `llmserve.sidecar` (metrics and logs), `llmserve.shared`
(what both processes import) and `llmserve.bench` (the load client).
"""
