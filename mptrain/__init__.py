"""mptrain: measure what each mixed-precision technique does to your model."""

__version__ = "0.1.0"
