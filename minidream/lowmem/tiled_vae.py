"""The VAE in overlapping tiles and one image at a time, so its phases fit small GPUs.

The VAE's activations grow with the image: the SDXL VAE at 1024 px holds ~11 GiB at its peak (the
planner, minidream/planner/memory.py: encode 10.6 GiB, decode 11.2 GiB, fp32 as it must run).
`TiledVAE` wraps a minidream.vae.VAE with the same interface (encode, decode, config, parameters),
so pipeline.decode and the latent cache call it unchanged; `use_tiled_vae(model)` swaps it in.

    slicing: a batch of B images goes through the VAE as B batches of one (its activations / B).
    tiling:  an image larger than a tile goes through in overlapping tiles (activations of one
             tile, whatever the image size), stitched with linear blends across the overlaps:

    tile side t (pixels for encode, latents for decode), a new tile every 3t/4; a tile's output
    side is T (t/8 or 8t: f = 8 px per latent); tiles are handled in raster order, each in place:
      top    T/4 rows  <- lerp(the above tile's last T/4 rows, its own), weight of its own 0 -> 1
      left   T/4 cols  <- lerp(the left tile's last T/4 cols, its own)  (both neighbours blended)
      kept:  its first 3T/4 rows and cols (a row's or column's last tile: all it has)

This is diffusers' AutoencoderKL.enable_vae_tiling / enable_vae_slicing (diffusers 0.42,
autoencoder_kl.py: tiled_encode, tiled_decode, blend_v, blend_h; tile_overlap_factor 0.25):
tests/test_tiled_vae.py checks the numbers against it. Choices kept from diffusers: an image no
larger than a tile is not tiled; encode blends the moments (mean and log-variance), not samples.
Differences: the tile side is an argument (diffusers: config.sample_size, 1024 px for SDXL, so it
never tiles a 1024 px image; here 512 px by default); diffusers clamps the blended log-variance,
here each tile's is clamped (by vae.encode) before blending: the same unless a tile's log-variance
leaves [-30, 20] inside an overlap.

Tiled is not equal to untiled: each tile's GroupNorms normalise with the tile's statistics, its
mid-block attention sees only the tile, and its convolutions see zero padding at the tile's
edges. The blends hide the seams; benchmarks/RESULTS.md "VAE tiles" measures what is left.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DEFAULT_TILE = 512  # px: the SDXL VAE's peak falls ~4x from 1024 px (see benchmarks/RESULTS.md)
OVERLAP = 4  # tiles overlap by 1/OVERLAP of their side (diffusers' tile_overlap_factor 0.25)


def fade_in(prev: torch.Tensor, tile: torch.Tensor, width: int, dim: int) -> None:
    """Blend, in place, the first `width` rows (dim=2) or columns (dim=3) of `tile` from `prev`'s
    last ones (which cover the same pixels) into its own: tile_k <- prev_k (1 - k/n) + tile_k k/n.
    (diffusers blend_v / blend_h; weights from float64, as Python's floats there.)"""
    n = min(prev.shape[dim], tile.shape[dim], width)  # a row's last tile can be narrower
    ramp = torch.arange(n, dtype=torch.float64, device=tile.device) / n  # (n,) 0 .. (n-1)/n
    shape = (n, 1) if dim == 2 else (n,)  # broadcast over the other spatial axis
    own, theirs = ramp.to(tile.dtype).view(shape), (1 - ramp).to(tile.dtype).view(shape)
    head = tile.narrow(dim, 0, n)
    head.copy_(prev.narrow(dim, prev.shape[dim] - n, n) * theirs + head * own)


def tiled(fn, x: torch.Tensor, tile: int, scale: float) -> torch.Tensor:
    """fn (B, C, h, w) -> (B, C', h*scale, w*scale) over x (B, C, H, W) in overlapping tiles of
    side `tile`, blended and stitched (see the top) -> (B, C', H*scale, W*scale)."""
    step, out_tile = tile - tile // OVERLAP, int(tile * scale)  # a new tile every 3/4 tile
    blend, keep = out_tile // OVERLAP, out_tile - out_tile // OVERLAP
    rows, above = [], []
    for top in range(0, x.shape[2], step):
        row = []
        for j, left in enumerate(range(0, x.shape[3], step)):
            out = fn(x[:, :, top:top + tile, left:left + tile])  # edge tiles are smaller
            if above:
                fade_in(above[j], out, blend, dim=2)
            if row:
                fade_in(row[-1], out, blend, dim=3)
            row.append(out)
        rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))  # (B, C', keep, W')
        above = row
    return torch.cat(rows, dim=2)


class TiledVAE(nn.Module):
    """A VAE that encodes and decodes one image at a time (`slicing`) in tiles of `tile` pixels:
    same encode / decode / config as minidream.vae.VAE, which it holds as `.vae`."""

    def __init__(self, vae: nn.Module, tile: int = DEFAULT_TILE, slicing: bool = True):
        super().__init__()
        self.vae, self.config, self.tile, self.slicing = vae, vae.config, tile, slicing
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell
        if tile % (OVERLAP * self.scale):  # else steps and kept parts would not line up
            raise ValueError(f"VAE tile {tile} px: use a multiple of {OVERLAP * self.scale} px")

    def slices(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn over x, one image at a time if slicing: (B, ...) -> (B, ...)."""
        if not self.slicing or x.shape[0] == 1:
            return fn(x)
        return torch.cat([fn(one) for one in x.split(1)])

    def _encode(self, x):  # (1, 3, H, W) -> (1, 8, H/8, W/8): mean and log-variance, stacked
        return torch.cat(self.vae.encode(x), dim=1)

    def _decode(self, z):  # (1, 4, h, w) -> (1, 3, 8h, 8w)
        return self.vae.decode(z)

    def encode(self, x):
        """Image (B, 3, H, W) -> mean and log-variance, each (B, 4, H/8, W/8), as VAE.encode."""
        tile, scale = self.tile, 1 / self.scale
        if max(x.shape[2:]) <= tile:
            moments = self.slices(self._encode, x)
        else:
            moments = self.slices(lambda one: tiled(self._encode, one, tile, scale), x)
        return moments.chunk(2, dim=1)

    def decode(self, z):
        """Unscaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), as VAE.decode."""
        tile = self.tile // self.scale  # in latent cells
        if max(z.shape[2:]) <= tile:
            return self.slices(self._decode, z)
        return self.slices(lambda one: tiled(self._decode, one, tile, self.scale), z)


def use_tiled_vae(model, tile: int = DEFAULT_TILE, slicing: bool = True):
    """Swap model.vae (a minidream.model.Model's) for a TiledVAE around it; returns the model.
    Weights, dtype and device stay the VAE's; calling it again only changes the settings."""
    vae = model.vae.vae if isinstance(model.vae, TiledVAE) else model.vae
    model.vae = TiledVAE(vae, tile, slicing)
    return model


class WithTiledVAE:
    """train()'s `models` (minidream.formats) with the VAE tiled: load_model's model gets a
    TiledVAE (use_tiled_vae); everything else is the wrapped models' own. (The core imports no
    subpackage, so train.py chooses this, as it chooses formats: see minidream/training.py.)"""

    def __init__(self, models, tile: int = DEFAULT_TILE):
        self.models, self.tile = models, tile

    def __getattr__(self, name):
        return getattr(self.models, name)

    def load_model(self, *args, **kwargs):
        return use_tiled_vae(self.models.load_model(*args, **kwargs), self.tile)
