"""A learned distribution of bounded per-sample affine (+ colour) transforms: HARD's augmentor.

A transform is a vector ``u`` of P numbers: 6 for the affine matrix (``"affine"``), plus 3 per-channel
gains and 3 per-channel biases (``"affine_color"``). ``u = b * tanh(mu_k + sigma_k * eps)`` with a
mixture component ``k`` drawn uniformly, ``eps ~ N(0, I)`` from the global torch RNG and ``b`` the
configured bounds: ``|u_j| <= b_j`` whatever the learned ``mu`` and ``sigma``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

AFFINE_SIZE = 6
COLOR_SIZE = 6  # 3 gains, 3 biases
KINDS = ("affine", "affine_color")
PADDINGS = ("zeros", "border", "reflection")


class LearnedAffineAugmentor(nn.Module):
    """``K`` components, each a mean ``mu`` and log-scale ``log_sigma`` over the P transform numbers,
    initialised to near-identity transforms (``mu = 0``, ``sigma = init_sigma``)."""

    def __init__(
        self,
        kind: str = "affine_color",
        components: int = 1,
        linear_max: float = 0.25,
        translate_max: float = 0.25,
        gain_max: float = 0.2,
        bias_max: float = 0.2,
        init_sigma: float = 0.1,
        padding: str = "zeros",
    ):
        super().__init__()
        self.color = kind == "affine_color"
        self.padding = padding
        bounds = [linear_max] * 4 + [translate_max] * 2
        if self.color:
            bounds += [gain_max] * 3 + [bias_max] * 3
        # Derived from the config, so not saved: a checkpoint never overrides the configured bounds.
        self.register_buffer("bounds", torch.tensor(bounds), persistent=False)
        self.mu = nn.Parameter(torch.zeros(components, len(bounds)))
        self.log_sigma = nn.Parameter(torch.full((components, len(bounds)), math.log(init_sigma)))

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``u`` [n, P] for n images: a component and a normal noise vector per image, from
        ``generator`` (default: the global RNG)."""
        components, size = self.mu.shape
        eps = torch.randn(n, size, device=self.mu.device, generator=generator)
        if components == 1:
            mu, log_sigma = self.mu.expand(n, -1), self.log_sigma.expand(n, -1)
        else:
            k = torch.randint(components, (n,), device=self.mu.device, generator=generator)
            mu, log_sigma = self.mu[k], self.log_sigma[k]
        return self.bounds * torch.tanh(mu + log_sigma.exp() * eps)

    def params_of(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"theta": [n, 2, 3], "gain": [n, 3], "bias": [n, 3]}`` (no colour entries for "affine")."""
        identity = torch.eye(2, 3, device=u.device, dtype=u.dtype)
        # theta = [[1 + u1, u2, u5], [u3, 1 + u4, u6]] in affine_grid's normalised coordinates.
        offsets = torch.stack([u[:, 0], u[:, 1], u[:, 4], u[:, 2], u[:, 3], u[:, 5]], dim=1).view(-1, 2, 3)
        params = {"theta": identity + offsets}
        if self.color:
            params.update(gain=u[:, 6:9], bias=u[:, 9:12])
        return params

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        return self.params_of(self.draw(n))

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` [n, C, H, W] warped by ``theta`` (bilinear, align_corners=False in both calls so that
        the identity reproduces ``x``), then with colour ``x * (1 + gain) + bias`` per channel."""
        theta = params["theta"].to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        if "gain" in params:
            if x.shape[1] != params["gain"].shape[1]:
                raise ValueError(f"colour transforms are per RGB channel; got images with {x.shape[1]} channels")
            gain = params["gain"].to(x.dtype)[:, :, None, None]
            out = out * (1 + gain) + params["bias"].to(x.dtype)[:, :, None, None]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.sample(len(x)))

    def u_abs_mean(self, u: torch.Tensor) -> float:
        """Mean of ``|u| / b`` over the bounded entries: how far towards its bounds a draw goes."""
        bounded = self.bounds > 0
        if not bounded.any():
            return 0.0
        return (u.abs()[:, bounded] / self.bounds[bounded]).mean().item()
