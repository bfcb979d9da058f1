"""SAM-Adapter's FFT high-pass filter, upstream's way (torch.fft) and as exact real matrix products.

Upstream (``PromptGenerator.fft`` on the normalised (N, 3, H, W) image): ``fft2`` (norm
"forward"), ``fftshift``, zero the box ``[H//2-line : H//2+line, W//2-line : W//2+line]`` with
``line = int((H·W·rate) ** .5 // 2)``, ``ifftshift``, ``ifft2`` (norm "forward"), real part, abs.

The box is the outer product of two 1-D masks, so the part it removes is ``L_H X L_Wᵀ`` with
``L = F⁻¹ diag(ifftshift(m)) F`` per axis (the two shifts cancel around a pointwise product, and
the norms "forward"/"forward" pair to the plain DFT round trip). ``L`` is circulant but not real:
fftshift puts frequency 0 at index ⌊n/2⌋ (even and odd n), so the kept band is ``-line..line-1`` —
``-line`` without ``+line``. With ``L = A + iB`` (A symmetric; B(n, m) = -sin(2π·line·(n-m)/n)/n,
rank 2) and a real X, the real part of ``L_H X L_Wᵀ`` is ``A_H X A_Wᵀ - B_H X B_Wᵀ``, and the
full spectrum inverts to X, so upstream's output is ``|X - A_H X A_Wᵀ + B_H X B_Wᵀ|``.
:class:`HighPass` computes exactly that with constant matrices built in float64 by numpy's FFT
(B through its rank-r factors), so every backend runs it as MatMul.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

RANK_TOLERANCE = 1e-12  # singular values of B (|B| ≤ 1) below this are FFT round-off, not rank


def cutoff(height: int, width: int, rate: float) -> int:
    """Upstream's ``line``: half the side of the removed low-frequency box."""
    return int((height * width * rate) ** 0.5 // 2)


def band(n: int, line: int) -> np.ndarray:
    """The 1-D mask of the removed box along an axis of length n, in fftshift order, sliced
    with the very slice upstream applies (Python semantics, negative starts included)."""
    mask = np.zeros(n)
    mask[n // 2 - line : n // 2 + line] = 1.0
    return mask


def lowpass_operator(n: int, line: int) -> np.ndarray:
    """(n, n) complex128 ``F⁻¹ diag(ifftshift(band)) F``: the removed low-pass along one axis."""
    keep = np.fft.ifftshift(band(n, line))
    return np.fft.ifft(keep[:, None] * np.fft.fft(np.eye(n), axis=0), axis=0)


def _factors(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``U (n, r)``, ``Vᵀ (r, n)`` with ``U Vᵀ = matrix`` to float64 round-off (r = its rank)."""
    u, s, vt = np.linalg.svd(matrix)
    rank = int((s > RANK_TOLERANCE).sum())
    return u[:, :rank] * s[:rank], vt[:rank]


def _axis(n: int, line: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A = Re L and the factors U, Vᵀ of B = Im L along one axis."""
    low = lowpass_operator(n, line)
    return (low.real, *_factors(low.imag))


def upstream_highpass(x: torch.Tensor, rate: float) -> torch.Tensor:
    """``PromptGenerator.fft(x, rate)`` line for line (the reference's path; not exportable)."""
    mask = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    w, h = x.shape[-2:]
    line = int((w * h * rate) ** 0.5 // 2)
    mask[:, :, w // 2 - line : w // 2 + line, h // 2 - line : h // 2 + line] = 1
    fft = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"))
    fft = fft * (1 - mask)
    fft_hires = torch.fft.ifftshift(torch.complex(fft.real, fft.imag))
    return torch.abs(torch.fft.ifft2(fft_hires, norm="forward").real)


class HighPass(nn.Module):
    """``|X - A_H X A_Wᵀ + U_H (V_Hᵀ X V_W) U_Wᵀ|`` on (N, C, H, W): upstream's FFT high-pass as
    six MatMuls with constants (B = U Vᵀ has rank 2 for every cutoff that does not wrap).

    The constants are built in float64 and stored in ``dtype`` (float64 for the exactness
    comparison); A_H and A_Wᵀ are the dense part, (H² + W²)·4 bytes in float32: 8 MiB at 1024².
    """

    def __init__(self, height: int, width: int, rate: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.height, self.width, self.rate = height, width, rate
        self.line = cutoff(height, width, rate)
        axes = {n: _axis(n, self.line) for n in {height, width}}  # square: built once
        (a_h, u_h, vt_h), (a_w, u_w, vt_w) = axes[height], axes[width]
        self.ranks = (u_h.shape[1], u_w.shape[1]) if u_h.size and u_w.size else (0, 0)
        tensors = {"a_h": a_h, "a_w_t": a_w.T, "u_h": u_h, "vt_h": vt_h, "v_w": vt_w.T,
                   "ut_w": u_w.T}
        for name, value in tensors.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value)).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.matmul(torch.matmul(self.a_h, x), self.a_w_t)
        if self.ranks[0]:  # B_H X B_Wᵀ = U_H (V_Hᵀ X V_W) U_Wᵀ
            imag = torch.matmul(torch.matmul(self.vt_h, x), self.v_w)
            low = low - torch.matmul(torch.matmul(self.u_h, imag), self.ut_w)
        return torch.abs(x - low)

    def flops(self, channels: int = 3) -> int:
        """Multiply-adds ×2 plus the elementwise ops, per image (what :meth:`forward` runs)."""
        h, w, (rh, rw) = self.height, self.width, self.ranks
        products = 2 * h * w * (h + w) + 2 * (rh * h * w + rh * w * rw + h * rh * rw + h * rw * w)
        return channels * (products + (3 if rh else 2) * h * w)
