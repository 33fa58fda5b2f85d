"""minidream.schedule against diffusers: stored reference numbers always, live diffusers when
importable. Reference file: tests/fixtures/make_reference.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minidream import schedule as S
from minidream.schedule import ScheduleConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_reference", FIXTURES / "make_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

SDXL = json.loads(ref.SDXL_SCHEDULER.read_text())


@pytest.fixture(scope="module")
def stored():
    return load_file(ref.FIXTURE)


def cfg_for(overrides=None, **kw) -> ScheduleConfig:
    return ScheduleConfig.from_dict({**SDXL, **(overrides or {}), **kw})


# ----------------------------------------------------------------------------- config


def test_defaults_are_sdxl_and_from_dict_reads_the_real_config():
    assert ScheduleConfig.from_dict(json.loads(Path(ref.SDXL_SCHEDULER).read_text())) == ScheduleConfig()
    cfg = ScheduleConfig()
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.prediction_type) == ("leading", 1, "epsilon")


def test_from_dict_ignores_irrelevant_keys_and_reads_relevant_ones():
    cfg = ScheduleConfig.from_dict(
        {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear", "use_karras_sigmas": False,
         "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0}
    )
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.steps_offset) == ("v_prediction", "trailing", 0)
    assert cfg.beta_schedule == "scaled_linear"  # missing keys keep the SDXL defaults


@pytest.mark.parametrize(
    "field, value",
    [("beta_schedule", "cosine"), ("prediction_type", "sample"), ("timestep_spacing", "karras")],
)
def test_unknown_choice_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'"):
        ScheduleConfig(**{field: value})
    with pytest.raises(ValueError, match=f"unknown {field}"):
        ScheduleConfig.from_dict({**SDXL, field: value})


def test_unknown_choice_set_after_construction_still_fails():
    cfg = ScheduleConfig()
    cfg.beta_schedule = "cosine"
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        S.betas(cfg)
    cfg = ScheduleConfig()
    cfg.timestep_spacing = "karras"
    with pytest.raises(ValueError, match="unknown timestep_spacing"):
        S.inference_timesteps(cfg, 10)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        S.predicted_x0_eps(torch.zeros(1), torch.zeros(1), torch.tensor(0.5), "sample")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        S.training_target(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(2), "x0")


# ----------------------------------------------------------------------------- alphas_cumprod


@pytest.mark.parametrize("name", list(ref.SCHEDULES))
def test_alphas_cumprod_matches_stored_reference(stored, name):
    """float32 by definition (diffusers builds the table in float32). From the betas stored with the
    reference, the cumulative product (and the zero-SNR rescale) must agree to float32 rounding. From
    the config, torch's float32 linspace rounds 1 in 7 betas one ulp differently on other kernel paths
    (ATEN_CPU_CAPABILITY=default), which the zero-SNR rescale turns into up to 3e-7 relative: 1e-5
    leaves a margin of 30, and a wrong formula (linear for scaled_linear, a missing rescale) is off by
    more than 1e-3."""
    overrides = ref.SCHEDULES[name]
    expected = stored[f"schedule/{name}/alphas_cumprod"]
    betas = stored[ref.betas_key(ref._case("ddim", 1, **overrides))].tolist()
    from_betas = S.alphas_cumprod(cfg_for(overrides, trained_betas=betas))
    torch.testing.assert_close(from_betas, expected, atol=1e-9, rtol=1e-6)
    ac = S.alphas_cumprod(cfg_for(overrides))
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    torch.testing.assert_close(ac, expected, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("name", list(ref.SCHEDULES))
def test_alphas_cumprod_matches_live_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    cfg_dict = {**SDXL, **ref.SCHEDULES[name]}
    expected = diffusers.DDIMScheduler.from_config(cfg_dict)
    torch.testing.assert_close(S.betas(ScheduleConfig.from_dict(cfg_dict)), expected.betas, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(S.alphas_cumprod(ScheduleConfig.from_dict(cfg_dict)), expected.alphas_cumprod,
                               atol=1e-7, rtol=1e-6)


def test_trained_betas_are_used_as_given():
    b = torch.linspace(1e-4, 2e-2, 10)
    cfg = ScheduleConfig(num_train_timesteps=10, trained_betas=b.tolist(), beta_schedule="linear")
    torch.testing.assert_close(S.betas(cfg), b)


def test_zero_terminal_snr_ends_at_pure_noise():
    ac = S.alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True))
    assert ac[-1] == 0 and ac[0] == S.alphas_cumprod(ScheduleConfig())[0]


# ----------------------------------------------------------------------------- inference timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", ref.TIMESTEP_STEPS)
def test_inference_timesteps_match_stored_reference(stored, spacing, steps):
    ts = S.inference_timesteps(cfg_for(timestep_spacing=spacing), steps)
    assert len(ts) == steps and all(type(t) is int for t in ts)
    assert ts == stored[f"timesteps/{spacing}/{steps}"].tolist()[:steps]


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_match_live_diffusers_for_every_step_count(spacing, steps_offset):
    """DDIMScheduler.timesteps and PNDMScheduler's base timesteps, for steps = 1 .. 1000."""
    diffusers = pytest.importorskip("diffusers")
    cfg_dict = {**SDXL, "timestep_spacing": spacing, "steps_offset": steps_offset}
    cfg = ScheduleConfig.from_dict(cfg_dict)
    ddim = diffusers.DDIMScheduler.from_config(cfg_dict)
    pndm = diffusers.PNDMScheduler.from_config(cfg_dict)
    extra = []
    for steps in range(1, 1001):
        ddim.set_timesteps(steps)
        pndm.set_timesteps(steps)
        expected = ddim.timesteps.tolist()
        assert expected == pndm._timesteps[::-1].tolist()  # the two schedulers pick the same set
        if spacing == "leading" and steps + steps_offset > 1000:
            with pytest.raises(ValueError, match="timestep 1000 >= num_train_timesteps"):
                S.inference_timesteps(cfg, steps)  # diffusers would index alphas_cumprod[1000]
            continue
        ts = S.inference_timesteps(cfg, steps)
        assert ts == expected[:steps], steps
        if len(expected) > steps:  # diffusers' float-arange quirk: a bogus last timestep -1
            assert expected[steps:] == [-1]
            extra.append(steps)
    assert (61 in extra) == (spacing == "trailing")  # trailing ignores steps_offset


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, "50"])
def test_bad_step_count_is_a_value_error(steps):
    with pytest.raises(ValueError, match="steps must be"):
        S.inference_timesteps(ScheduleConfig(), steps)


def test_leading_spacing_that_overflows_is_a_value_error():
    with pytest.raises(ValueError, match="use fewer steps or steps_offset=0"):
        S.inference_timesteps(ScheduleConfig(steps_offset=1), 1000)
    assert S.inference_timesteps(ScheduleConfig(steps_offset=0), 1000)[0] == 999


def test_num_train_timesteps_must_be_positive():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ScheduleConfig(num_train_timesteps=0)


# ----------------------------------------------------------------------------- forward process


def test_add_noise_and_velocity_match_stored_reference(stored):
    """float64, from the float32 betas diffusers used (stored): |x| < 5 here, so 1e-14 is ~50 float64
    ulps, and any error of a float32 computation (~1e-7) would show."""
    ac = S.alphas_cumprod(ScheduleConfig(trained_betas=stored["add_noise/betas"].tolist()))
    x0, noise, t = stored["add_noise/x0"], stored["add_noise/noise"], stored["add_noise/t"]
    assert x0.dtype == stored["add_noise/x_t"].dtype == torch.float64
    torch.testing.assert_close(S.add_noise(x0, noise, t, ac), stored["add_noise/x_t"], atol=1e-14, rtol=0)
    torch.testing.assert_close(S.velocity(x0, noise, t, ac), stored["add_noise/v"], atol=1e-14, rtol=0)
    torch.testing.assert_close(S.training_target(x0, noise, t, ac, "v_prediction"), stored["add_noise/v"])
    assert S.training_target(x0, noise, t, ac, "epsilon") is noise


@pytest.mark.parametrize("name", list(ref.SCHEDULES))
def test_add_noise_velocity_snr_match_live_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    cfg_dict = {**SDXL, **ref.SCHEDULES[name]}
    sched = diffusers.DDIMScheduler.from_config(cfg_dict)
    ac = S.alphas_cumprod(ScheduleConfig.from_dict(cfg_dict))
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(S.add_noise(x0, noise, t, ac), sched.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S.velocity(x0, noise, t, ac), sched.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S.snr(t, ac), compute_snr(sched, t), atol=0, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_eps_inverts_the_forward_process(prediction_type):
    ac = S.alphas_cumprod(ScheduleConfig())
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([10, 400, 900])
    x_t = S.add_noise(x0, noise, t, ac)
    target = S.training_target(x0, noise, t, ac, prediction_type)  # what a perfect model outputs
    a = ac[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x0_hat, eps_hat = S.predicted_x0_eps(target, x_t, a, prediction_type)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=2e-5, rtol=1e-5)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    ac = S.alphas_cumprod(ScheduleConfig()).double()
    t = torch.arange(1000)
    torch.testing.assert_close(S.snr(t, ac.float()).double(), ac / (1 - ac), rtol=1e-5, atol=0)
    assert S.snr(t, ac.float()).diff().lt(0).all()  # noisier timesteps have less signal
