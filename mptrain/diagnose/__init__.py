"""Numerics diagnoses without a training run of their own: `mptrain-numerics` (cli.py: an FP32 scan under the
instruments, a per-layer FP16 verdict and a loss scale), `mptrain.check` on any nn.Module and one batch
(check.py), and the FP16 check of a trained checkpoint (fp16_checkpoint.py)."""
