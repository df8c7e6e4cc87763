"""Distillation of one-step students (``sr1step distill``): data, degradations, losses and the trainer."""
