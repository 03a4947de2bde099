"""Launch-side checks: validate a training configuration for a cluster before anything starts.

``python -m megatron_pr2.preflight.validate`` is the CLI (the recipe's ``--dry-run``).
"""
