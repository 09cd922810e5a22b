"""Offline web app (Gradio): ``build_app(predictor)`` / ``launch(predictor)``; run it with ``malaria-screen app``."""

from malaria_screen.app.gradio_app import (APP_KEYS_ENV, AnonymousExposureError, AppAccess, AppLimits, build_app,
                                            check_exposure, classify_files, example_fields, is_loopback, launch,
                                            sample_files, screen_field_image, screen_slide_files, sweep_sessions)

__all__ = ["APP_KEYS_ENV", "AnonymousExposureError", "AppAccess", "AppLimits", "build_app", "check_exposure",
           "classify_files", "example_fields", "is_loopback", "launch", "sample_files", "screen_field_image",
           "screen_slide_files", "sweep_sessions"]
