"""Models, built by name: ``build_model("cellnet")``; ``list_models()`` lists them."""

from malaria_screen.models.registry import build_model, count_flops, count_parameters, default_input_size, list_models, register_model

__all__ = ["build_model", "count_flops", "count_parameters", "default_input_size", "list_models", "register_model"]
