"""Checkpoints: everything a run needs to continue bit-identically, written atomically.

One file per run, `<run dir>/checkpoint.pt`: each network's weights, each stepper's state
(optimizer, FP32 master weights, loss scaler: scale, growth tracker, hysteresis, skipped
steps; LR schedule), the task's carried state (an LM's hidden state), the RNG streams
(python, numpy, torch, CUDA), the data position (epoch, batch within it), the step, and
the evaluation history. Written to a temporary file in the same folder, flushed and
renamed over the old one, so a crash mid-write leaves the previous checkpoint whole.
Read with `torch.load(weights_only=True)`: nothing in it can run code. A checkpoint whose
precision mode, model or dataset differs from the run's config is refused.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from mptrain.errors import UserError, first_line

log = logging.getLogger("mptrain.trainer")

FILENAME = "checkpoint.pt"
FORMAT = 1
IDENTITY = ("precision", "model", "dataset")  # what a resumed run may not change


def identity(cfg) -> dict:
    return {"precision": cfg.precision.mode, "model": cfg.model.name, "dataset": cfg.dataset.name}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: a temporary file beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def locate(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` names: `auto` (this run dir's, if any) or a run dir / checkpoint file."""
    if resume == "auto":
        path = run_dir / FILENAME
        return path if path.is_file() else None
    path = Path(resume).expanduser()
    path = path / FILENAME if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"trainer.resume={resume}: no checkpoint at {path}; point it at a run dir holding "
                        f"{FILENAME} (written every trainer.checkpoint_every steps), or use trainer.resume=auto")
    return path


RESUME_REMEDY = "resume from another run dir, or start afresh without trainer.resume"


def read(path: Path, device: torch.device, remedy: str = RESUME_REMEDY) -> dict:
    """The state in an mptrain checkpoint file (tensors and plain data only); an unreadable or foreign file gets
    one clear line ending in `remedy`."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many kinds for a truncated or foreign file
        raise UserError(f"checkpoint {path} is unreadable ({first_line(err, limit=160)}); it is corrupt or not an mptrain "
                        f"checkpoint: {remedy}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not an mptrain checkpoint of format {FORMAT}; start afresh")
    return state


def load(path: Path, cfg, device: torch.device, world_size: int = 1) -> dict:
    """A checkpoint made for this config (and as many data-parallel ranks); any other gets one clear line."""
    state = read(path, device)
    made, wanted = state["identity"], identity(cfg)
    differ = [f"{k}={made[k]} (this run: {wanted[k]})" for k in IDENTITY if made.get(k) != wanted[k]]
    made_world = state.get("world_size", 1)
    if made_world != world_size:  # the global batch and each rank's data would change under the run
        differ.append(f"{made_world} data-parallel process(es) (this run: {world_size})")
    if differ:
        raise UserError(f"checkpoint {path} was made with {', '.join(differ)}; resume with the same "
                        "settings, or start afresh without trainer.resume")
    return state


def capture(trainer) -> dict:
    """Everything continuing bit-identically needs: weights, steppers (optimizer, masters, loss scaler, schedule),
    the task's carried state, the data position, history, the RNG streams; and what checks a resume (identity,
    world size)."""
    return {
        "identity": trainer.identity, "world_size": trainer.replicas.world_size,
        "step": trainer.step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "networks": {name: net.state_dict() for name, net in trainer.task.networks().items()},
        "steppers": {name: stepper.state_dict() for name, stepper in trainer.steppers.items()},
        "task": trainer.task.state_dict(),
        "history": trainer.history, "best": trainer.best, "last_media_step": trainer.last_media_step,
        "overflow_events": list(trainer.overflows.events), "total_steps": trainer.total_steps,
        "overflow_history": {net: [list(e) for e in events] for net, events in trainer.overflows.history.items()},
        "rng": rng_state(),
    }  # fmt: skip


def restore(trainer, state: dict) -> None:
    """Put a freshly built Trainer where the checkpoint left off (weights first, then the steppers' masters over
    them); a run planned for another length rebuilds its LR schedule only when trainer.replan_schedule says so."""
    for name, net in trainer.task.networks().items():
        net.load_state_dict(state["networks"][name])
    for name, stepper in trainer.steppers.items():
        stepper.load_state_dict(state["steppers"][name])
    trainer.step, trainer.epoch, trainer.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    trainer.history, trainer.best = state["history"], state["best"]
    trainer.last_media_step = state["last_media_step"]
    trainer.overflows.events.extend(state["overflow_events"])
    for net, events in state.get("overflow_history", {}).items():  # checkpoints before it was kept: none
        trainer.overflows.history[net] = [tuple(e) for e in events]
    trainer.resumed_task_state = state["task"]  # loaded when its pass starts (an LM's hidden state)
    planned, total = state.get("total_steps", trainer.total_steps), trainer.total_steps
    if planned != total:  # the LR schedule was built for the checkpoint's length
        if not trainer.cfg.replan_schedule:
            raise UserError(f"the checkpoint's run was planned for {planned} steps and this one for {total}: its LR "
                            "schedule would continue past its end (a cosine climbs back up); set "
                            f"trainer.replan_schedule=true to rebuild the schedule for {total} steps from step "
                            f"{trainer.step}, or resume with the same length")
        for stepper in trainer.steppers.values():
            stepper.replan_schedule(lambda opt: trainer.make_scheduler(opt, total))
        log.info("LR schedule rebuilt for %d steps (was %d) from step %d", total, planned, trainer.step)
    set_rng_state(state["rng"])
