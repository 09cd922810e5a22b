"""REST API (FastAPI): ``create_app(predictor, limits, security=...)``; run it with ``malaria-screen serve``."""

from malaria_screen.serve.api import create_app, model_identity
from malaria_screen.serve.limits import ServeLimits, ServeSecurity, load_api_keys

__all__ = ["ServeLimits", "ServeSecurity", "create_app", "load_api_keys", "model_identity"]
