"""An LU-parameterised invertible C×C matrix, shared by the layers that need a 1×1 convolution."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LUMatrix", "apply_channel_matrix"]


def apply_channel_matrix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` at every pixel of ``x`` (B, C, H, W): a 1×1 convolution."""
    return torch.einsum("oc,bchw->bohw", matrix, x)


class LUMatrix(nn.Module):
    r"""``W = P·L·(U + diag(sign·exp(log_s)))``, invertible for any parameter values.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular,
    ``sign`` fixed; ``L``'s and ``U``'s free entries and ``log_s`` are the parameters (``C²`` in
    all). ``log|det W| = Σ log_s``, and ``W⁻¹ = U⁻¹ L⁻¹ Pᵀ`` takes two triangular solves of size C.

    Initialised from a random rotation (as Glow does) so that a layer mixes channels from step one.

    Arguments:
        size: C >= 1.

    References:
        D. P. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        NeurIPS 2018. https://arxiv.org/abs/1807.03039
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        q, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = upper.diagonal()
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.lower = nn.Parameter(lower[self._strict_lower()].float())
        self.upper = nn.Parameter(upper[self._strict_upper()].float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def _strict_lower(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.tril_indices(self.size, self.size, offset=-1, device=self.perm.device))

    def _strict_upper(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.triu_indices(self.size, self.size, offset=1, device=self.perm.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, U + diag(sign·exp(log_s)))``."""
        c = self.size
        lower = torch.eye(c, dtype=self.log_s.dtype, device=self.log_s.device)
        lower = lower.index_put(self._strict_lower(), self.lower)
        upper = torch.diag(self.sign_s * self.log_s.exp())
        upper = upper.index_put(self._strict_upper(), self.upper)
        return lower, upper

    def matrix(self) -> torch.Tensor:
        lower, upper = self.factors()
        return self.perm @ lower @ upper

    def inverse_matrix(self) -> torch.Tensor:
        lower, upper = self.factors()
        eye = torch.eye(self.size, dtype=lower.dtype, device=lower.device)
        # Triangular solves rather than a general inverse: exact structure, C² work each.
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv, upper=True) @ self.perm.t()

    def log_abs_det(self) -> torch.Tensor:
        return self.log_s.sum()

    @staticmethod
    def parameter_count(size: int) -> int:
        return size * size

    def extra_repr(self) -> str:
        return f"size={self.size}"
