"""MNIST splits and binarization protocols, on the real files."""

import dataclasses

import torch

from ppl_vae.data import load_mnist


def test_splits_have_the_standard_sizes(mnist):
    # Images keep their [C, H, W] shape; MLPs flatten them.
    assert mnist.train.shape == (50_000, 1, 28, 28)
    assert mnist.val.shape == (10_000, 1, 28, 28)
    assert mnist.test.shape == (10_000, 1, 28, 28)
    assert mnist.train_labels.shape == (50_000,) and mnist.test_labels.shape == (10_000,)


def test_dynamic_binarization_draws_fresh_binary_batches(mnist):
    # MNIST's first 500 training images (the draws are per pixel: 500 images check them as well as 50,000).
    data = dataclasses.replace(mnist, train=mnist.train[:500], train_labels=mnist.train_labels[:500])
    torch.manual_seed(0)
    assert data.train.min() >= 0 and data.train.max() <= 1 and not torch.all((data.train == 0) | (data.train == 1))
    batches = list(data.train_batches(200))
    assert [b.shape[0] for b in batches] == [200, 200, 100]
    assert all(torch.all((b == 0) | (b == 1)) for b in batches)
    # Each epoch is a permutation of the images with a fresh Bernoulli draw of every pixel.
    torch.manual_seed(1)
    epochs = [next(data.train_batches(500)) for _ in range(2)]
    torch.manual_seed(1)
    per_image = []
    for drawn in epochs:
        order = torch.randperm(500)
        assert torch.equal(drawn, torch.bernoulli(data.train[order]))
        unpermuted = torch.empty_like(drawn)
        unpermuted[order] = drawn
        per_image.append(unpermuted)
    changed = (per_image[0] != per_image[1]).float().mean()
    assert changed > 0.01  # grey pixels come out differently in the two epochs


def test_evaluation_sets_are_binarized_once_with_a_fixed_seed(mnist, data_root):
    again = load_mnist(data_root, binarize="static", eval_examples=100)
    assert torch.equal(again.test, mnist.test[:100])
    assert torch.equal(again.val, mnist.val[:100])
    assert torch.all((mnist.test == 0) | (mnist.test == 1))
    static_a = load_mnist(data_root, binarize="static", train_examples=50).train
    static_b = load_mnist(data_root, binarize="static", train_examples=50).train
    assert torch.equal(static_a, static_b)
    grey = load_mnist(data_root, binarize="none", eval_examples=10)
    assert not torch.all((grey.test == 0) | (grey.test == 1))
