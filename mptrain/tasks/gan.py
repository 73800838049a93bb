"""The GAN family: DCGAN with the non-saturating loss, one stepper (and loss scaler) per network.

Each step updates the discriminator on a real and a generated batch, then the
generator through the updated discriminator. Losses use
``binary_cross_entropy_with_logits`` on FP32 logits. Real images are fed in
the generator's range [-1, 1]; the FID extractor sees images in the dataset's
own normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mptrain.errors import UserError
from mptrain.schema import typed
from mptrain.tasks.base import Task
from mptrain.telemetry.frechet import frechet_distance, load_or_train_extractor

GRID_SAMPLES = 64


class GanTask(Task):
    family = "gan"

    def __init__(self, g, d, spec, precision, extractor=None, extractor_info=None, fid_samples=2048, seed=0):
        self.g, self.d = g, d
        self.precision = precision
        self.latent = g.latent
        shape = (1, spec.in_channels, 1, 1)
        device = next(g.parameters()).device
        self.mean = torch.tensor(spec.mean, device=device).view(shape)
        self.std = torch.tensor(spec.std, device=device).view(shape)
        self.extractor, self.extractor_info = extractor, extractor_info
        self.fid_samples = fid_samples
        generator = torch.Generator(device=device).manual_seed(seed)
        # the same noise every time: grids and FID samples are comparable across steps and runs
        self.fixed_noise = torch.randn(max(fid_samples, GRID_SAMPLES), self.latent, 1, 1, generator=generator, device=device)

    @classmethod
    def build(cls, model_cfg, data, precision) -> GanTask:
        from mptrain.models import build_model

        nets = build_model(model_cfg, data.spec)
        fid = typed("model", model_cfg).fid
        extractor, info = None, None
        if fid.enabled:
            extractor, info = load_or_train_extractor(data, fid.cache_dir, fid.extractor_steps, precision.device)
        g, d = (precision.prepare(nets[name], name) for name in ("g", "d"))
        return cls(g, d, data.spec, precision, extractor, info, fid.samples, seed=model_cfg.noise_seed)

    def networks(self):
        return {"g": self.g, "d": self.d}

    def wrap_training_forward(self, wrap) -> None:
        # the discriminator runs three forwards per step and the generator's backward goes through it:
        # DDP's one-forward-one-backward bookkeeping does not fit without restructuring the step
        raise UserError("the GAN family trains its networks as they are, on one device, for now (trainer.devices>1, "
                        "torchrun and trainer.compile take classifiers and language models); use trainer.devices=1")

    # -- pixel ranges ---------------------------------------------------------------------
    def to_gan_range(self, x: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images → [-1, 1] (where tanh lives)."""
        return (x * self.std + self.mean) * 2 - 1

    def from_gan_range(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1) / 2 - self.mean) / self.std

    # -- training -------------------------------------------------------------------------
    def train_step(self, batch, steppers, precision):
        real = self.to_gan_range(batch[0])
        n = real.shape[0]
        noise = torch.randn(n, self.latent, 1, 1, device=real.device)
        ones, zeros = torch.ones(n, device=real.device), torch.zeros(n, device=real.device)

        sd, sg = steppers["d"], steppers["g"]
        sd.zero_grad()
        with precision.autocast():
            fake = self.g(noise)
            logits_real = self.d(real).float()
            logits_fake = self.d(fake.detach()).float()
        loss_d = F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(
            logits_fake, zeros
        )
        sd.backward(loss_d)
        sd.step()

        sg.zero_grad()
        self.d.requires_grad_(False)  # the generator's backward needs no discriminator weight grads
        try:
            with precision.autocast():
                logits_gen = self.d(fake).float()
            loss_g = F.binary_cross_entropy_with_logits(logits_gen, ones)  # non-saturating: D should call fakes real
            sg.backward(loss_g)
        finally:
            self.d.requires_grad_(True)
        sg.step()
        return {
            "gan/loss_d": loss_d.detach(),
            "gan/loss_g": loss_g.detach(),
            "gan/d_real": torch.sigmoid(logits_real.detach()).mean(),
            "gan/d_fake": torch.sigmoid(logits_fake.detach()).mean(),
        }

    def check_loss(self, batch, precision, nets=None):
        g, d = (nets["g"], nets["d"]) if nets else (self.g, self.d)
        real = self.to_gan_range(batch[0])
        noise = torch.randn(real.shape[0], self.latent, 1, 1, device=real.device).to(real.dtype)
        with precision.autocast():
            logits_real, logits_fake = d(real).float(), d(g(noise)).float()  # the fake not detached: G gets its grads
        ones = torch.ones_like(logits_real)
        return F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(
            logits_fake, 1 - ones)

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise: torch.Tensor, precision) -> torch.Tensor:
        with precision.autocast():
            return self.g(noise).float()

    @torch.no_grad()
    def eval_step(self, batch, precision):
        real = self.to_gan_range(batch[0])
        with precision.autocast():
            logits = self.d(real).float()
        return {"d_real": torch.sigmoid(logits).mean()}

    @torch.no_grad()
    def replay_forward(self, batch, precision) -> None:
        noise = torch.randn(batch[0].shape[0], self.latent, 1, 1, device=batch[0].device)
        with precision.autocast():
            self.d(self.to_gan_range(batch[0]))
            self.d(self.g(noise))

    @torch.no_grad()
    def evaluate(self, batches, precision):
        batches = list(batches)
        metrics = super().evaluate(batches, precision)
        if self.extractor is None:
            return metrics
        real = torch.cat([self.extractor.features(x.float()) for x, _ in batches])[: self.fid_samples]
        if real.shape[0] < 2:
            raise UserError("the FID needs at least 2 held-out images; raise trainer.eval_max_batches")
        fake = []
        for noise in self.fixed_noise[: real.shape[0]].split(256):
            fake.append(self.extractor.features(self.from_gan_range(self.generate(noise, precision))))
        metrics["fid"] = frechet_distance(real, torch.cat(fake))
        return metrics

    def log_media(self, tb, step):
        was_training = self.g.training
        self.g.eval()  # BN running statistics: generating must not update them
        try:
            images = self.generate(self.fixed_noise[:GRID_SAMPLES], self.precision)
        finally:
            self.g.train(was_training)
        import torchvision

        grid = torchvision.utils.make_grid(images, nrow=8, normalize=True, value_range=(-1, 1))
        tb.image("gan/samples", grid, step)

    def describe(self):
        if self.extractor_info is None:
            return {}
        return {"fid_feature_extractor": {**self.extractor_info, "samples": self.fid_samples}}


def build(model_cfg, data, precision) -> GanTask:
    """model.task=gan (families.TASKS)."""
    return GanTask.build(model_cfg, data, precision)
