"""aiohttp ingress: routes, auth, problem responses, OpenAPI."""
