"""Training: the Lightning system (:mod:`.module`) and one run (:mod:`.run`)."""
