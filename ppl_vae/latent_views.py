"""Looking at a latent space: guide means of images, decoded grids of the latent plane, how much of a box the codes
fill, and a small digit classifier that scores decoded images.

Shared by the figures (:mod:`ppl_vae.plots`) and the 2-D studies (:mod:`ppl_vae.latent2d`, ``experiments/``); it
imports neither, so both can import it.
"""

from __future__ import annotations

import torch
from torch import nn

from .modes import evaluates


def guide_mean(q) -> torch.Tensor:
    """The guide's mean, or for a flow (no closed-form mean) its base mean pushed through the flow."""
    try:
        return q.mean
    except NotImplementedError:
        z = q.base_dist.mean
        for transform in q.transforms:
            z = transform(z)
        return z


@evaluates
def guide_means(vae, x: torch.Tensor, chunk_size: int = 1000) -> torch.Tensor:
    """The guide's mean E_q[z | x] of every image, [N, latent_dim], on the CPU."""
    return torch.cat([guide_mean(vae.guide_net(vae.flatten(x[i : i + chunk_size]))).cpu()
                      for i in range(0, x.shape[0], chunk_size)])


@evaluates
def decode_grid(vae, low, high, steps: int) -> torch.Tensor:
    """E[x | z] on a steps x steps grid over the box: [steps * steps, data_dim], in reading order.

    Row r (top to bottom) has z_2 = high_2 ... low_2; column c (left to right) has z_1 = low_1 ... high_1,
    so the grid of images looks like the latent plane with z_2 pointing up.
    """
    low, high = torch.as_tensor(low, dtype=torch.float32).expand(2), torch.as_tensor(high, dtype=torch.float32).expand(2)
    z1 = torch.linspace(float(low[0]), float(high[0]), steps)
    z2 = torch.linspace(float(high[1]), float(low[1]), steps)
    z = torch.stack([z1[None, :].expand(steps, steps), z2[:, None].expand(steps, steps)], -1).reshape(-1, 2)
    device = next(vae.parameters()).device
    return vae.decode_mean(z.to(device)).cpu()


def occupancy(codes: torch.Tensor, low, high, cells: int = 20) -> float:
    """Share of the cells x cells squares of the box that hold at least one code: 1 means no holes."""
    low, high = torch.as_tensor(low, dtype=torch.float64).expand(2), torch.as_tensor(high, dtype=torch.float64).expand(2)
    codes = codes.double()
    inside = torch.all((codes >= low) & (codes < high), -1)
    index = ((codes[inside] - low) / (high - low) * cells).long().clamp(0, cells - 1)
    return torch.unique(index[:, 0] * cells + index[:, 1]).numel() / cells**2


def code_range(codes: torch.Tensor, quantile: float = 0.005) -> tuple[list[float], list[float]]:
    """The box the codes cover, from the ``quantile`` and 1 - ``quantile`` quantiles of each axis."""
    codes = codes.double()
    return torch.quantile(codes, quantile, 0).tolist(), torch.quantile(codes, 1 - quantile, 0).tolist()


def neighbour_change(images: torch.Tensor, steps: int) -> torch.Tensor:
    """RMS pixel difference between the decoded images of neighbouring grid points (both axes): [2 s (s-1)]."""
    grid = images.reshape(steps, steps, -1)
    across = (grid[:, 1:] - grid[:, :-1]).pow(2).mean(-1).sqrt().reshape(-1)
    down = (grid[1:] - grid[:-1]).pow(2).mean(-1).sqrt().reshape(-1)
    return torch.cat([across, down])


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3, hidden: int = 256,
                           batch_size: int = 128, learning_rate: float = 1e-3, seed: int = 0) -> nn.Module:
    """A 784-hidden-10 ReLU MLP fitted with Adam on grey-level images in [0, 1]; returned in eval mode.

    Used to score decoded images (is E[x | z] a recognizable digit?), not as a model of interest.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the classifier lives on the CPU: leave the GPUs' generators alone
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Flatten(), nn.Linear(images[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    images, labels = images.float().cpu(), labels.long().cpu()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted digit, its softmax probability) for each image."""
    probabilities = torch.softmax(classifier(images.float().cpu()), -1)
    confidence, prediction = probabilities.max(-1)
    return prediction, confidence
