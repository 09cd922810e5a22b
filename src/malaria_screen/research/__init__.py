"""Research tools: feature-layer sweep, LR range test, patient-grouped cross-validation, model
comparison, and multi-class evaluation.

Each module computes and returns values; the ``write_*`` functions write a results folder
(markdown and CSV tables, JSON, PNG plots), called by the ``malaria-screen`` CLI
(``features``, ``lr-find``, ``cv``, ``compare``) and ``benchmarks/bench_model_zoo.py``.

Layering: ``research`` sits beside ``smear`` (it imports data, models, training, evaluation and
inference, and is imported only by ``cli``).
"""

from importlib import import_module

_WHERE = {
    "CompareEntry": "model_comparison", "compare_models": "model_comparison", "default_entries": "model_comparison",
    "CVResult": "cv", "cross_validate": "cv", "fold_split": "cv",
    "FeatureSweep": "features", "feature_sweep": "features", "stage_features": "features", "write_feature_sweep": "features",
    "LRFindResult": "lr_find", "lr_range_test": "lr_find", "write_lr_find": "lr_find",
    "multiclass_metrics": "multiclass",
}


def __getattr__(name: str):
    # Lazy: importing the package does not import torch/Lightning/scikit-learn.
    if name in _WHERE:
        return getattr(import_module(f"malaria_screen.research.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'malaria_screen.research' has no attribute {name!r}")


__all__ = [
    "CompareEntry",
    "compare_models",
    "default_entries",
    "CVResult",
    "cross_validate",
    "fold_split",
    "FeatureSweep",
    "feature_sweep",
    "stage_features",
    "write_feature_sweep",
    "LRFindResult",
    "lr_range_test",
    "write_lr_find",
    "multiclass_metrics",
]
