"""Batch-wise augmentation on the training device, each sample's draw a function of
(seed, epoch, index) alone.

The random numbers come from a counter-based hash (Wellons' ``lowbias32`` on 32-bit words, in
int64 arithmetic so CPU and CUDA give the same bits), not from a stateful generator: sample *i*
of epoch *e* gets the same shift, angle or crop whatever batch it lands in, whatever the process
count, and after a resume. The modes follow :func:`nt_dist.data.transforms.build_transform`:

- ``shift``: integer translation by −2..2 px in x and y, zero fill (``RandomCrop(padding=2)``)
- ``pad_crop_flip``: −4..4 px translation, zero fill, then a horizontal flip with p = 0.5
- ``rotate_flip``: rotation by an angle uniform in [−20°, 20°] about the centre, nearest
  neighbour, zero fill (``RandomRotation(20)``), then a flip with p = 0.5
- ``rrc_flip``: ``RandomResizedCrop`` (area 8–100 %, aspect 3/4–4/3, ten tries, then the whole
  image), bilinear resize back to the input size, then a flip with p = 0.5

Translations are gathers on uint8; rotations and crops are one ``affine_grid`` +
``grid_sample`` per batch (float, 0..255).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

M32 = 0xFFFFFFFF
MODES = ("none", "shift", "pad_crop_flip", "rotate_flip", "rrc_flip")
RRC_TRIES = 10


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """``x * c mod 2**32`` for 0 <= x < 2**32 without int64 overflow (products < 2**49)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x: Tensor | int) -> Tensor | int:
    """lowbias32 (C. Wellons): a bijective 32-bit hash with good avalanche."""
    x = x & M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def epoch_key(seed: int, epoch: int) -> int:
    """One 32-bit word for (run seed, epoch); seeds up to 2**64 and any epoch."""
    key = mix32(seed & M32)
    key = mix32(key ^ mix32((seed >> 32) ^ 0x9E3779B9))
    return int(mix32(key ^ mix32(epoch ^ 0x85EBCA6B)))


def uniforms(seed: int, epoch: int, index: Tensor, count: int) -> Tensor:
    """``[len(index), count]`` float32 in [0, 1): draw *k* of sample ``index`` in ``epoch``."""
    base = mix32((index.to(torch.int64) & M32) ^ epoch_key(seed, epoch))
    draws = torch.arange(count, device=index.device, dtype=torch.int64)
    words = mix32(base[:, None] ^ mix32((draws + 0x27D4EB2F) & M32)[None, :])
    return (words >> 8).to(torch.float32) * (1.0 / (1 << 24))


def augment(images: Tensor, mode: str, seed: int, epoch: int, index: Tensor, size: int | None = None) -> Tensor:
    """``images`` (uint8 [B, C, H, W]) augmented as ``mode``; uint8 for ``none``/``shift``/
    ``pad_crop_flip``, float32 (0..255) for ``rotate_flip``/``rrc_flip``. ``rrc_flip`` resizes its
    crops to ``size`` pixels (progressive resizing; ``None``: the input's size); the other modes keep it."""
    if mode == "none":
        return images
    if mode in ("shift", "pad_crop_flip"):
        pad = 2 if mode == "shift" else 4
        u = uniforms(seed, epoch, index, 3)
        dx, dy = _integer(u[:, 0], pad), _integer(u[:, 1], pad)
        flip = u[:, 2] < 0.5 if mode == "pad_crop_flip" else torch.zeros_like(u[:, 2], dtype=torch.bool)
        return translate(images, dx, dy, flip, pad)
    if mode == "rotate_flip":
        u = uniforms(seed, epoch, index, 2)
        return rotate(images, (u[:, 0] * 2 - 1) * 20.0, u[:, 1] < 0.5)
    if mode == "rrc_flip":
        u = uniforms(seed, epoch, index, 4 * RRC_TRIES + 1)
        box = rrc_boxes(u[:, :-1], images.shape[-2], images.shape[-1])
        return crop_resize(images, box, u[:, -1] < 0.5, size)
    raise ValueError(f"unknown augment mode {mode!r}; expected one of {', '.join(MODES)}")


def _integer(u: Tensor, pad: int) -> Tensor:
    """Uniform integers in −pad..pad (``RandomCrop(padding=pad)``'s offsets)."""
    return (u * (2 * pad + 1)).long().clamp_(max=2 * pad) - pad


def translate(images: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, pad: int) -> Tensor:
    """Output pixel (y, x) of sample b is input pixel (y + dy, x' + dx), x' = W−1−x when flipped,
    zero outside: a crop of the zero-padded image, mirrored."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], w - 1 - cols[None, :], cols[None, :]) + pad + dx[:, None]
    rows = torch.arange(h, device=images.device)[None, :] + pad + dy[:, None]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B,H,W,C] -> NCHW


def rotate(images: Tensor, degrees: Tensor, flip: Tensor) -> Tensor:
    """Rotation about the centre by ``degrees`` (nearest, zero fill), then a mirror where ``flip``."""
    radians = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    mirror = 1.0 - 2.0 * flip.float()  # output x -> -x before the rotation's inverse
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos * mirror, -sin, zero], 1),
                         torch.stack([sin * mirror, cos, zero], 1)], 1)
    return _warp(images, theta, "nearest")


def rrc_boxes(u: Tensor, h: int, w: int) -> Tensor:
    """``[B, 4]`` (top, left, height, width) as ``RandomResizedCrop.get_params``: up to ten
    tries of area ~ U(0.08, 1) and log-aspect ~ U(log 3/4, log 4/3); the first that fits wins,
    else the whole image (a square image needs no aspect clamp)."""
    u = u.view(-1, RRC_TRIES, 4)
    area = h * w * (0.08 + 0.92 * u[..., 0])
    aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[..., 1])
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    top = torch.floor(u[..., 2] * (h - ch + 1))
    left = torch.floor(u[..., 3] * (w - cw + 1))
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full_like(fits[:, 0], -1, dtype=torch.long))
    pick = first.clamp(min=0)[:, None]
    box = torch.stack([top.gather(1, pick)[:, 0], left.gather(1, pick)[:, 0],
                       ch.gather(1, pick)[:, 0], cw.gather(1, pick)[:, 0]], 1)
    whole = torch.tensor([0.0, 0.0, h, w], device=u.device).expand_as(box)
    return torch.where((first < 0)[:, None], whole, box)


def crop_resize(images: Tensor, box: Tensor, flip: Tensor, size: int | None = None) -> Tensor:
    """Each sample's box (top, left, height, width) resized (bilinear) to ``size`` x ``size``
    (``None``: the input size), mirrored where ``flip``."""
    b, c, h, w = images.shape
    top, left, ch, cw = box.unbind(1)
    mirror = 1.0 - 2.0 * flip.float()
    zero = torch.zeros_like(top)
    # normalised coordinates (align_corners=False): x_in = centre + (cw / w) * x_out
    cx = (left + cw / 2) / w * 2 - 1
    cy = (top + ch / 2) / h * 2 - 1
    theta = torch.stack([torch.stack([cw / w * mirror, zero, cx], 1),
                         torch.stack([zero, ch / h, cy], 1)], 1)
    out = [b, c, h, w] if size is None else [b, c, size, size]
    return _warp(images, theta, "bilinear", "border", out)  # a crop never reaches past the image: no fill


def _warp(images: Tensor, theta: Tensor, mode: str, padding: str = "zeros", out: list[int] | None = None) -> Tensor:
    source = images.float()
    grid = F.affine_grid(theta.to(source.dtype), out or list(source.shape), align_corners=False)
    return F.grid_sample(source, grid, mode=mode, padding_mode=padding, align_corners=False)
