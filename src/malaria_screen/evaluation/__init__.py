"""Evaluation by patient: metrics with patient-bootstrap confidence intervals (:mod:`.metrics`)."""
