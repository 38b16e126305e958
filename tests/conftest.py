"""Shared fixtures: a small slice of the real MNIST so end-to-end tests run in seconds."""

import pytest

# A few hundred real MNIST images: enough for the training loop to learn something.
SMALL = ["data.train_samples=2000", "data.test_samples=500", "train.epochs=2", "model.widths=[784,64,10]",
         "train.batch_size=100", "train.eval_batch_size=200", "device=cpu"]


@pytest.fixture
def small():
    return list(SMALL)
