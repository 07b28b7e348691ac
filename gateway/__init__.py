"""Gateway: the OpenAI-compatible REST API, admin endpoints and the `pagedserve` command line."""
