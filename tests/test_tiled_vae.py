"""minidream.lowmem.tiled_vae: the VAE in overlapping tiles and one image at a time.

- against diffusers' AutoencoderKL with tiling (tiled_encode, tiled_decode) on the same tiny random
  weights: relative error max|ours - ref| / max|ref| measured 1.0e-6 .. 1.8e-6 (fp32); asserted 1e-5,
  as tests/test_vae.py asserts for the untiled VAE;
- the stitching alone, with functions that see no tile edge (identity, nearest upsampling, average
  pooling): tiled equals untiled to fp32 rounding, whatever the image size;
- tiled vs untiled on the bundled tiny model's trained VAE (a 64 px photo, 32 px tiles: 3 x 3 tiles
  of a quarter of the image each): the figures measured are in the test, with the bounds asserted;
- slicing: the batch one image at a time equals the batch to rounding (measured <= 1.3e-6 relative).
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from minidream.cli.args import VAE_TILE, check_numbers, sample_parser
from minidream.errors import UserError
from minidream.formats import load_model
from minidream import formats
from minidream.lowmem.tiled_vae import DEFAULT_TILE, TiledVAE, WithTiledVAE, fade_in, tiled, use_tiled_vae
from minidream.pipeline import decode
from minidream.vae import VAE, VAEConfig
from tests._model_factory import ROOT, TINY_VAE, load_minidream, rel_err, save_diffusers

TOL = 1e-5
SIZES = [(64, 48), (56, 88), (40, 32), (64, 64)]  # several tiles; narrow last tiles; 2-row grids


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """diffusers' tiny random AutoencoderKL with tiling on (tiles of sample_size 32 px) and ours."""
    folder = tmp_path_factory.mktemp("tiles") / "vae"
    ref = save_diffusers(AutoencoderKL, TINY_VAE, folder, seed=0)
    ref.enable_tiling()
    return ref, load_minidream(VAE, VAEConfig, folder)


def set_tile(ref, tile):
    """diffusers' tile sides: tile_sample_min_size (pixels) and tile_latent_min_size (latents)."""
    ref.tile_sample_min_size, ref.tile_latent_min_size = tile, tile // 4  # TINY_VAE: 4 px per latent


def _image(batch, height, width, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("tile", [32, 16])
@pytest.mark.parametrize("size", SIZES)
def test_tiled_encode_matches_diffusers(pair, tile, size):
    ref, ours = pair
    set_tile(ref, tile)
    x = _image(2, *size)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist  # blends the moments, then clamps the log-variance
        mean, logvar = TiledVAE(ours, tile).encode(x)
        untiled, _ = ours.encode(x)
    assert mean.shape == dist.mean.shape == (2, 4, size[0] // 4, size[1] // 4)
    assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
    assert rel_err(mean, untiled) > 0.1  # tiles really were used (random weights: far from untiled)


@pytest.mark.parametrize("tile", [32, 16])
@pytest.mark.parametrize("size", SIZES)
def test_tiled_decode_matches_diffusers(pair, tile, size):
    ref, ours = pair
    set_tile(ref, tile)
    z = torch.randn(2, 4, size[0] // 4, size[1] // 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = TiledVAE(ours, tile).decode(z)
        untiled = ours.decode(z)
    assert got.shape == expected.shape == (2, 3, *size)
    assert rel_err(got, expected) <= TOL
    assert rel_err(got, untiled) > 0.1


def test_images_no_larger_than_a_tile_are_not_tiled(pair):
    ours = pair[1]
    x, z = _image(1, 32, 24), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(TiledVAE(ours, 32).encode(x), ours.encode(x)))
        assert torch.equal(TiledVAE(ours, 32).decode(z), ours.decode(z))


def test_slicing_equals_the_batch(pair):
    ours = pair[1]
    x, z = _image(3, 32, 24, seed=4), torch.randn(3, 4, 8, 6, generator=torch.Generator().manual_seed(5))
    sliced = TiledVAE(ours, tile=1024, slicing=True)  # no image is larger than a tile: slicing only
    with torch.no_grad():
        for a, b in zip(sliced.encode(x), ours.encode(x)):
            assert rel_err(a, b) <= TOL  # batched kernels round differently
        assert rel_err(sliced.decode(z), ours.decode(z)) <= TOL


@pytest.mark.parametrize("size", [(64, 64), (40, 88), (96, 8), (8, 8)])
@pytest.mark.parametrize("tile", [16, 32])
def test_stitching_alone_is_exact(size, tile):
    """Functions with no tile edges to see: the tiles line up and the blends mix equal values."""
    x = _image(2, *size, seed=6)
    up = lambda t: F.interpolate(t, scale_factor=4.0, mode="nearest")  # noqa: E731 (like decode)
    down = lambda t: F.avg_pool2d(t, 4)  # noqa: E731 (like encode: 4 px per latent)
    assert (tiled(lambda t: t.clone(), x, tile, 1) - x).abs().max() <= 1e-6
    assert (tiled(up, x, tile // 4, 4) - up(x)).abs().max() <= 1e-6
    assert (tiled(down, x, tile, 1 / 4) - down(x)).abs().max() <= 1e-6


def test_fade_in_is_a_linear_ramp_across_the_overlap():
    prev, tile = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    fade_in(prev, tile, 4, dim=2)  # rows 0..3 weigh tile's own by 0, 1/4, 2/4, 3/4
    assert torch.equal(tile[0, 0, :, 0], torch.tensor([0, 0.25, 0.5, 0.75, 1, 1, 1, 1]))
    assert torch.equal(tile[0, 0, 0], torch.zeros(8)) and torch.equal(tile[0, 0, 3], torch.full((8,), 0.75))
    prev, tile = torch.arange(8.0).expand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    fade_in(prev, tile, 2, dim=3)  # columns 0, 1 from prev's last two (6, 7), weighted 1, 1/2
    assert torch.equal(tile[0, 0, 5], torch.tensor([6, 3.5, 0, 0, 0, 0, 0, 0]))


def _psnr(a, b):
    """(max, mean abs difference in 0..255 pixel units, PSNR dB) of two images in [-1, 1]."""
    d = (a.clamp(-1, 1) - b.clamp(-1, 1)).abs() * 127.5
    return d.max().item(), d.mean().item(), 10 * math.log10(255**2 / (d**2).mean().item())


def test_tiled_close_to_untiled_on_the_bundled_trained_vae():
    """Measured (3 photos of data/raj at 64 px, 32 px tiles): decode max 101 / mean 14.6 (of 255),
    PSNR 22.7 dB; encode: latent means off by 0.21 of their std on average. Without the blends
    (each tile's first 3/4 kept as it is): 116, 16.1, 21.7 dB and 0.24, which the bounds refuse. For scale: the
    tiny VAE's own reconstruction of these photos is at 21.7 dB."""
    vae = load_model(ROOT / "weights" / "tiny-sdxl").vae
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL arrays are read-only; torch warns
        photos = [np.asarray(Image.open(ROOT / f"data/raj/rraj_{i}.png").convert("RGB").resize((64, 64)))
                  for i in range(3)]
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (3, 3, 64, 64)
    tiles = TiledVAE(vae, 32)
    with torch.no_grad():
        mean, _ = vae.encode(x)
        tiled_mean, _ = tiles.encode(x)
        untiled, got = vae.decode(mean), tiles.decode(mean)
    worst, average, psnr = _psnr(got, untiled)
    print(f"tiled vs untiled decode: max {worst:.1f}, mean {average:.2f}, PSNR {psnr:.2f} dB")
    assert psnr >= 22.2 and average <= 15.5 and worst < 110
    latent_error = (tiled_mean - mean).abs().mean().item() / mean.std().item()
    print(f"tiled vs untiled encode: mean abs / std {latent_error:.3f}")
    assert latent_error <= 0.22


def test_use_tiled_vae_swaps_the_vae_and_keeps_its_weights():
    model = load_model(ROOT / "weights" / "tiny-sdxl")
    vae = model.vae
    use_tiled_vae(model, 32)
    assert isinstance(model.vae, TiledVAE) and model.vae.vae is vae and model.vae.config is vae.config
    assert all(a is b for a, b in zip(model.vae.parameters(), vae.parameters()))
    use_tiled_vae(model, 16, slicing=False)  # again: new settings, never a wrapper of a wrapper
    assert model.vae.vae is vae and (model.vae.tile, model.vae.slicing) == (16, False)
    assert model.vae.to(torch.float32) is model.vae  # callers use .to's result (latent cache)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    images = decode(model, z * vae.config.scaling_factor)
    assert len(images) == 2 and images[0].size == (64, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        TiledVAE(vae, 24)  # 4 px per latent, overlap a quarter of a tile


def test_training_reads_models_with_the_vae_tiled():
    models = WithTiledVAE(formats, 32)
    model = models.load_model(ROOT / "weights" / "tiny-sdxl")
    assert isinstance(model.vae, TiledVAE) and model.vae.tile == 32
    assert models.model_image_size is formats.model_image_size  # the rest: formats' own


def test_sample_flag():
    parse = lambda *a: sample_parser("").parse_args(["--prompt", "x", *a])  # noqa: E731
    assert VAE_TILE == DEFAULT_TILE
    assert parse().vae_tiling is None
    assert parse("--vae-tiling").vae_tiling == DEFAULT_TILE
    assert parse("--vae-tiling", "256").vae_tiling == 256
    with pytest.raises(UserError, match="--vae-tiling 100 is not a positive multiple of 32"):
        check_numbers(parse("--vae-tiling", "100"))
