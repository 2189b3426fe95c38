import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fake_cifar import write_cifar  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Upstream mdistiller's CIFAR zoo contract (state_dict keys/shapes, output shapes), recorded from
# upstream's models and kept with the tests so that they run from any clone.
CONTRACT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mdistiller_cifar_models.json")

# The CI machine has two cores; more threads only contend.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def cifar100_root(tmp_path):
    """A DATASET.ROOT holding a tiny CIFAR-100 in the real pickle layout (64 train, 32 test)."""
    write_cifar(str(tmp_path), "cifar100", num_train=64, num_test=32)
    return str(tmp_path)


@pytest.fixture
def cifar10_root(tmp_path):
    write_cifar(str(tmp_path), "cifar10", num_train=50, num_test=20)
    return str(tmp_path)
