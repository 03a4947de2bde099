"""Checkpoints: save (with its lock and verification), resume (and its config check), the
distributed optimizer's state, model weights in and out."""
