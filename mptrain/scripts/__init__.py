"""Scripts that produce the committed results: `python -m mptrain.scripts.<name>` (and gpu_check.sh)."""
