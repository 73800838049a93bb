"""What a run measures and writes: TensorBoard (tensorboard.py), the logging window (window.py: meters.py's device
sums, throughput.py, memory.py), health checks, the environment (env.py), summary.json (summary.py, run_results.py),
the numerics instruments (numerics.py, lost_updates.py, headroom.py, overflow.py, fp8_stats.py, mx_stats.py), the
loss-scale history verdict (scale_history.py) and the Fréchet distance (frechet.py)."""
