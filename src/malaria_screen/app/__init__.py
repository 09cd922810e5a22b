"""Offline web app (Gradio): ``build_app(predictor)`` / ``launch(predictor)``; run it with ``malaria-screen app``."""

from malaria_screen.app.gradio_app import (AppLimits, build_app, classify_files, example_fields, launch, sample_files,
                                            screen_field_image, screen_slide_files)

__all__ = ["AppLimits", "build_app", "classify_files", "example_fields", "launch", "sample_files", "screen_field_image",
           "screen_slide_files"]
