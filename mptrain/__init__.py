"""mptrain: measure what each mixed-precision technique does to your model.

    import mptrain
    summary = mptrain.train(["model=mlp", "precision=mixed", "trainer.max_steps=100"])
    result = mptrain.study(model="mlp", precisions=["fp32", "mixed", "bf16"], seeds=3, steps=200)
    answer = mptrain.check(my_model, (inputs, targets))
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`mptrain.train`, `study`, `check` and `UserError`, imported on first use: `import mptrain` stays light."""
    if name in ("train", "study", "check"):
        from mptrain import api

        return getattr(api, name)
    if name == "UserError":
        from mptrain.errors import UserError

        return UserError
    raise AttributeError(f"module 'mptrain' has no attribute {name!r}")


__all__ = ["UserError", "check", "study", "train"]
