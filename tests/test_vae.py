"""minidream's VAE against diffusers' AutoencoderKL: same keys, same shapes, same numbers.

Relative error everywhere: max|ours - ref| / max|ref|, computed in fp32.
"""

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from minidream.toy.pretrain import sample_latent
from minidream.vae import VAE, VAEConfig, vae_dtype
from tests._model_factory import (
    TINY_VAE, load_minidream, rel_err, save_diffusers, sdxl_config,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "vae"
    ref = save_diffusers(AutoencoderKL, TINY_VAE, folder, seed=0)
    ours = load_minidream(VAE, VAEConfig, folder)
    return ref, ours


def _image(batch=2, height=32, width=24, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_matches_diffusers(pair):
    ref, ours = pair
    x = _image()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
    assert mean.shape == dist.mean.shape == (2, 4, 8, 6)
    assert rel_err(mean, dist.mean) <= TOL
    assert rel_err(logvar, dist.logvar) <= TOL


def test_sampled_latent_matches_diffusers_for_the_same_seed(pair):
    ref, ours = pair
    x = _image(seed=1)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        mean, logvar = ours.encode(x)
        got = sample_latent(mean, logvar, generator=torch.Generator().manual_seed(7))
        other_seed = sample_latent(mean, logvar, generator=torch.Generator().manual_seed(8))
    assert rel_err(got, expected) <= TOL
    assert rel_err(other_seed, expected) > 1e-3  # the noise really is drawn from the generator


def test_logvar_is_clamped_like_diffusers(pair):
    # Shift the quant_conv biases of the log-variance channels far outside the trained clamp
    # range [-30, 20] (copies; the shared models stay intact): both must clamp identically.
    ref, ours = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    with torch.no_grad():
        for conv in (ref.quant_conv, ours.quant_conv):
            conv.bias[4:6] += 100.0  # channels 4..7 are the log-variance half
            conv.bias[6:8] -= 100.0
        x = _image(seed=2)
        expected = ref.encode(x).latent_dist.logvar
        _, logvar = ours.encode(x)
    assert torch.equal(logvar, expected)
    assert logvar[:, :2].eq(20.0).all() and logvar[:, 2:].eq(-30.0).all()


def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == expected.shape == (2, 3, 32, 24)
    assert rel_err(got, expected) <= TOL


def test_full_size_sdxl_vae_has_diffusers_names_and_shapes():
    config = sdxl_config("vae")
    with torch.device("meta"):
        ref = AutoencoderKL.from_config(config)
        ours = VAE(VAEConfig.from_dict(config))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing, extra = ref_shapes.keys() - ours_shapes.keys(), ours_shapes.keys() - ref_shapes.keys()
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 248


def test_config_defaults_are_sdxl_base_and_missing_keys_mean_diffusers_defaults():
    assert VAEConfig.from_dict(sdxl_config("vae")) == VAEConfig()
    assert VAEConfig().scaling_factor == 0.13025
    # An old SD 1.x vae/config.json without scaling_factor means diffusers' default, 0.18215.
    sd1 = {k: v for k, v in sdxl_config("vae").items() if k not in ("scaling_factor", "force_upcast")}
    assert VAEConfig.from_dict(sd1).scaling_factor == 0.18215


def test_vae_dtype_keeps_the_overflowing_sdxl_vae_in_fp32():
    assert vae_dtype(VAEConfig(force_upcast=True), torch.float16) == torch.float32
    assert vae_dtype(VAEConfig(force_upcast=False), torch.float16) == torch.float16
    assert vae_dtype(VAEConfig(force_upcast=True), torch.float32) == torch.float32


@pytest.mark.parametrize(
    "change, match",
    [
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"use_quant_conv": False}, "use_quant_conv"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] * 3}, "DownEncoderBlock2D"),
        ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "UpDecoderBlock2D"),
        ({"not_a_vae_key": 1}, "unknown key"),
    ],
)
def test_unsupported_vae_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_dict({"_class_name": "AutoencoderKL", **TINY_VAE, **change})
