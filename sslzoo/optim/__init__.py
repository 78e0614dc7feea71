"""Optimizers (SGD, AdamW, the two LARS forms), parameter groups, and schedules as functions
of the step."""
