"""`minifd serve`: an OpenAI-compatible HTTP server over the engine (`pip install 'minifd[serve]'`).

protocol.py turns request bodies into checked requests and the engine's text into OpenAI's response
objects and server-sent events; metrics.py keeps the counters `/metrics` shows. Neither imports a web
framework, so both are tested without a server; the HTTP app only joins them to the engine.
"""
