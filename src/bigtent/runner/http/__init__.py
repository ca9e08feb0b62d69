"""The runner's HTTP surface: the FastAPI app, its routes, the guarded uvicorn protocol, TLS."""
