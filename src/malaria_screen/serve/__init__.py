"""REST API (FastAPI): ``create_app(predictor, limits)``; run it with ``malaria-screen serve``."""

from malaria_screen.serve.api import ServeLimits, create_app

__all__ = ["ServeLimits", "create_app"]
