"""The FastAPI door's HTTP layer: schemas, routes, errors, limits, SSE and metrics (see agent.serving.model_server)."""
