"""mptrain: measure what each mixed-precision technique does to your model.

    import mptrain
    summary = mptrain.train(["model=mlp", "precision=mixed", "trainer.max_steps=100"])
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`mptrain.train` and `mptrain.UserError`, imported on first use: `import mptrain` stays light."""
    if name == "train":
        from mptrain.api import train

        return train
    if name == "UserError":
        from mptrain.errors import UserError

        return UserError
    raise AttributeError(f"module 'mptrain' has no attribute {name!r}")


__all__ = ["UserError", "train"]
