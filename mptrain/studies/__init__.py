"""Precision studies: will a model train in FP16, BF16, FP8 (study.py: the numerics scan, one run per mode and
seed, the report), which Linear layers must stay in BF16 under a block format (layers.py), and `mptrain-study`
(cli.py)."""
