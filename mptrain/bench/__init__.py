"""`mptrain-bench`: steady-state speed and peak memory of each precision mode through mptrain's
Trainer, beside a bare PyTorch loop on the same model and data, measured in one process."""
