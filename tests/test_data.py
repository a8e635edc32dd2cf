"""MNIST splits and binarization protocols, on the real files."""

import torch

from ppl_vae.data import load_mnist


def test_splits_have_the_standard_sizes(mnist):
    # Images keep their [C, H, W] shape; MLPs flatten them.
    assert mnist.train.shape == (50_000, 1, 28, 28)
    assert mnist.val.shape == (10_000, 1, 28, 28)
    assert mnist.test.shape == (10_000, 1, 28, 28)
    assert mnist.train_labels.shape == (50_000,) and mnist.test_labels.shape == (10_000,)


def test_dynamic_binarization_draws_fresh_binary_batches(mnist):
    torch.manual_seed(0)
    assert mnist.train.min() >= 0 and mnist.train.max() <= 1 and not torch.all((mnist.train == 0) | (mnist.train == 1))
    batches = list(mnist.train_batches(20_000))
    assert [b.shape[0] for b in batches] == [20_000, 20_000, 10_000]
    assert all(torch.all((b == 0) | (b == 1)) for b in batches)
    # Each epoch is a permutation of the images with a fresh Bernoulli draw of every pixel.
    torch.manual_seed(1)
    epochs = [next(mnist.train_batches(50_000)) for _ in range(2)]
    torch.manual_seed(1)
    per_image = []
    for drawn in epochs:
        order = torch.randperm(50_000)
        assert torch.equal(drawn, torch.bernoulli(mnist.train[order]))
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
