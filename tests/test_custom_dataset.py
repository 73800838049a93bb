"""A torch Dataset of your own through `dataset=custom`: built by Hydra, read whole, trained like a built-in set."""

from __future__ import annotations

import re

import pytest

from cli_helpers import mptrain, user_package

PACKAGE = '''
import torch
from PIL import Image


class Shapes(torch.utils.data.Dataset):
    """Bright squares (class 1) and dark ones (class 0), as uint8 tensors or PIL images."""

    classes = ["dark", "bright"]

    def __init__(self, n=40, size=12, pil=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(2, (n,), generator=g)
        noise = torch.randint(0, 60, (n, 1, size, size), generator=g)
        self.images = (noise + 150 * self.labels.view(-1, 1, 1, 1)).to(torch.uint8)
        self.pil = pil

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        return (Image.fromarray(image[0].numpy()) if self.pil else image), int(self.labels[i])


class Empty(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


class Oblong(Shapes):
    def __getitem__(self, i):
        return torch.zeros(1, 8, 12), 0


class Unlabelled(Shapes):
    def __getitem__(self, i):
        return self.images[i]
'''
COMMON = ["model=mlp", "model.depth=2", "model.width=16", "dataset.batch_size=8", "trainer.max_steps=3",
          "trainer.progress=false"]


@pytest.fixture
def package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with user_package(tmp_path, monkeypatch, "user_data", PACKAGE):
        yield tmp_path


@pytest.mark.parametrize("pil", [False, True])
def test_a_users_dataset_trains_with_a_held_out_split_of_its_own(package, pil):
    import mptrain

    summary = mptrain.train([*COMMON, "dataset=custom", "dataset.train._target_=user_data.Shapes",
                             f"+dataset.train.pil={pil}", "precision=mixed"])
    assert summary["status"] == "completed" and summary["dataset"] == "custom"
    assert summary["final"]["accuracy"] is not None


def test_a_users_test_split_is_used_as_it_is(package):
    from omegaconf import OmegaConf

    import mptrain
    from mptrain.data.custom import read_custom_dataset

    cfg = OmegaConf.create({"train": {"_target_": "user_data.Shapes", "n": 30},
                            "test": {"_target_": "user_data.Shapes", "n": 10, "seed": 1},
                            "valid_fraction": 0.1, "seed": 0, "num_classes": None})
    train_x, train_y, test_x, test_y, classes, mean, std = read_custom_dataset(cfg, "cpu")
    assert (train_x.shape, test_x.shape, classes) == ((30, 1, 12, 12), (10, 1, 12, 12), 2)
    assert 0.0 <= train_x.min() and train_x.max() <= 1.0 and len(mean) == 1
    summary = mptrain.train([*COMMON, "dataset=custom", "dataset.train._target_=user_data.Shapes",
                             "dataset.test._target_=user_data.Shapes", "+dataset.test.seed=1", "precision=bf16"])
    assert summary["status"] == "completed"


@pytest.mark.parametrize("overrides, says", [
    (["dataset.train._target_=user_data.Nope"], r"^dataset.train._target_=user_data.Nope could not be built"),
    (["dataset.train._target_=user_data.Empty"], r"^dataset.train is empty"),
    (["dataset.train._target_=user_data.Oblong"], r"^dataset.train\[0\]'s image has shape \(1, 8, 12\)"),
    (["dataset.train._target_=user_data.Unlabelled"], r"^dataset.train\[0\] is a Tensor; a classification Dataset "
                                                      r"gives \(image, label\)"),
    (["dataset.train._target_=user_data.Shapes", "dataset.num_classes=1"], r"class count is 1"),
    ([], r"^dataset=custom needs dataset.train._target_"),
])
def test_each_bad_dataset_is_one_line(package, overrides, says):
    """mptrain.train raises a refused config's one line and makes no run folder."""
    import mptrain

    with pytest.raises(mptrain.UserError) as refused:
        mptrain.train([*COMMON, "dataset=custom", *overrides])
    assert re.search(says, str(refused.value)) and "\n" not in str(refused.value), str(refused.value)


@pytest.mark.e2e
def test_the_command_says_a_bad_dataset_in_one_line(package):
    out = mptrain(*COMMON, "dataset=custom", "dataset.train._target_=user_data.Empty", cwd=package,
                  env={"PYTHONPATH": str(package)})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and lines == ["mptrain: error: dataset.train is empty: its Dataset has no items"], \
        out.stderr[-1500:]
