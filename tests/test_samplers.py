"""minidream.samplers against diffusers' schedulers, every intermediate x compared.

Each configuration in make_reference.CASES runs twice: in float64 against the stored float64
trajectory (tests/fixtures/scheduler_reference.safetensors, no diffusers needed), and in float32
against live diffusers on this machine when it is importable (max abs difference <= 1e-5 at every
step). float32 is compared only live: its rounding differs from one CPU to another by as much.
"""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minidream import samplers
from minidream.more_samplers import dpmpp_2m, euler, init_noise_sigma, prk_start
from minidream.cli.sample_command import SAMPLERS
from minidream.schedule import ScheduleConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_reference", FIXTURES / "make_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

ATOL = 1e-5
RTOL_FLOAT64 = 1e-12  # relative to the largest |x| of the step (at least 1): see test_matches_stored_reference
CASES = {ref.case_name(c): c for c in ref.CASES}


@pytest.fixture(scope="module")
def stored():
    return load_file(ref.FIXTURE)


def run_minidream(c: dict, x_T: torch.Tensor, model=ref.analytic_model, betas=None):
    """Run minidream's sampler for case c; returns (timesteps (S,), xs (S, ...)) from the callback.
    betas: the schedule's float32 betas as given (trained_betas) instead of computed here."""
    cfg = ScheduleConfig.from_dict(ref.scheduler_config(c))
    if betas is not None:
        cfg = replace(cfg, trained_betas=betas.tolist())
    ts, xs = [], []

    def record(i, t, x):
        assert i == len(ts), "callback indices must count model evaluations"
        ts.append(t)
        xs.append(x.clone())

    if c["sampler"] == "ddim":
        g = torch.Generator().manual_seed(ref.NOISE_SEED) if c["eta"] > 0 else None
        out = samplers.ddim(model, x_T, cfg, c["steps"], eta=c["eta"], generator=g, callback=record)
    elif c["sampler"] == "pndm":
        out = samplers.pndm(model, x_T, cfg, c["steps"], start=prk_start if c["prk"] else None, callback=record)
    elif c["sampler"] == "dpmpp-2m":  # karras: diffusers' config key, which ScheduleConfig ignores
        karras = c["extra"].get("use_karras_sigmas", False)
        out = dpmpp_2m(model, x_T, cfg, c["steps"], karras=karras, callback=record)
    else:  # euler scales the unit noise x_T by init_noise_sigma itself
        out = euler(model, x_T, cfg, c["steps"], callback=record)
    assert torch.equal(out, xs[-1]), "the sampler returns the last x it reported"
    return torch.tensor(ts, dtype=torch.int64), torch.stack(xs)


def assert_same_trajectory(ts, xs, ref_ts, ref_xs):
    assert ts.tolist() == ref_ts.tolist(), "timesteps differ"
    assert xs.shape == ref_xs.shape and xs.dtype == ref_xs.dtype == torch.float32
    err = (xs - ref_xs).abs().flatten(1).amax(1)  # worst element at each step
    bad = [(i, e) for i, e in enumerate(err.tolist()) if not e <= ATOL]
    assert not bad, f"max abs difference > {ATOL} at (step, diff): {bad[:5]}"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_stored_reference(stored, name):
    """float64 against diffusers' float64 trajectory, from the same float32 betas (stored with it).

    Tolerance: 1e-12 of the step's largest |x| (at least 1; x reaches ~4096 at zero terminal SNR).
    Each step rounds at float64's 1.1e-16 relative, and earlier errors grow at most a few times over
    <= 92 model evaluations: measured here, minidream and diffusers agree to 0 (native kernels) and
    to below 1e-15 (ATEN_CPU_CAPABILITY=default, other tanh kernels). 1e-12 leaves a margin of over
    1000 for other CPUs and math libraries, and is 1e5 times finer than float32 rounding (6e-8): a
    step that silently computes in float32, or any formula error, fails."""
    c = CASES[name]
    ts, xs = run_minidream(c, stored["x_T"].double(), betas=stored[ref.betas_key(c)])
    ref_xs = stored[f"{name}/x"]
    assert ts.tolist() == stored[f"{name}/t"].tolist(), "timesteps differ"
    assert xs.shape == ref_xs.shape and xs.dtype == ref_xs.dtype == torch.float64
    scale = ref_xs.abs().flatten(1).amax(1).clamp(min=1.0)  # (S,) largest |x| per step
    err = (xs - ref_xs).abs().flatten(1).amax(1) / scale  # worst element at each step, relative
    bad = [(i, e) for i, e in enumerate(err.tolist()) if not e <= RTOL_FLOAT64]
    assert not bad, f"relative difference > {RTOL_FLOAT64} at (step, diff): {bad[:5]}"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_live_diffusers(stored, name):
    pytest.importorskip("diffusers")
    ref_ts, ref_xs = ref.run_diffusers(CASES[name], stored["x_T"])
    ts, xs = run_minidream(CASES[name], stored["x_T"])
    assert_same_trajectory(ts, xs, ref_ts, ref_xs)


@pytest.mark.parametrize(
    "name", ["ddim-50-leading-epsilon-eta0.5", "pndm-20-trailing-v_prediction-prk", "euler-20-leading-v_prediction",
             "dpmpp-2m-20-trailing-v_prediction-use_karras_sigmas=True"]
)
def test_half_precision_matches_live_diffusers(stored, name):
    """A float16 model keeps float16 latents; diffusers' Euler and DPM-Solver++ step in float32 in between."""
    pytest.importorskip("diffusers")
    x_T = stored["x_T"].half()
    ref_ts, ref_xs = ref.run_diffusers(CASES[name], x_T)
    ts, xs = run_minidream(CASES[name], x_T)
    assert ts.tolist() == ref_ts.tolist() and xs.dtype == ref_xs.dtype == torch.float16
    torch.testing.assert_close(xs, ref_xs, atol=0, rtol=0)


def test_fixture_holds_exactly_the_current_cases(stored):
    names = {k[: -len("/x")] for k in stored if k.endswith("/x")}
    assert names == set(CASES), "regenerate: python tests/fixtures/make_reference.py"
    assert len(CASES) == len(ref.CASES), "two cases share a name"
    assert stored["x_T"].shape == ref.X_SHAPE


def test_trajectory_lengths_show_the_pndm_warmups():
    """PLMS evaluates steps + 1 times (diffusers' repeated timestep); PRK adds 3 * 4 - 3."""
    x = torch.zeros(ref.X_SHAPE)
    for steps in (2, 20):
        ts, _ = run_minidream(ref._case("pndm", steps), x)
        assert len(ts) == steps + 1 and ts[1] == ts[2]
        ts, _ = run_minidream(ref._case("pndm", steps + 2, prk=True), x)
        assert len(ts) == steps + 2 + 9


def test_samplers_keep_no_state_between_calls(stored):
    """Two identical calls give identical results: no history survives a call."""
    x_T, cfg = stored["x_T"], ScheduleConfig()
    for fn in (samplers.ddim, samplers.pndm, euler, dpmpp_2m):
        a = fn(ref.analytic_model, x_T, cfg, 10)
        b = fn(ref.analytic_model, x_T, cfg, 10)
        assert torch.equal(a, b), fn.__name__


def test_ddim_eta_noise_comes_from_the_generator(stored):
    x_T, cfg = stored["x_T"], ScheduleConfig()
    run = lambda seed: samplers.ddim(ref.analytic_model, x_T, cfg, 10, eta=0.5,
                                     generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_rejects_eta_outside_0_1(eta):
    with pytest.raises(ValueError, match="eta must be in"):
        samplers.ddim(ref.analytic_model, torch.zeros(ref.X_SHAPE), ScheduleConfig(), 10, eta=eta)


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "dpmpp-2m"])
@pytest.mark.parametrize("steps", [0, 1001])
def test_samplers_reject_bad_step_counts(sampler, steps):
    with pytest.raises(ValueError, match="steps must be between 1 and num_train_timesteps=1000"):
        SAMPLERS[sampler](ref.analytic_model, torch.zeros(ref.X_SHAPE), ScheduleConfig(), steps)


def test_prk_warmup_needs_four_steps():
    with pytest.raises(ValueError, match="the PRK warm-up needs steps >= 4"):
        samplers.pndm(ref.analytic_model, torch.zeros(ref.X_SHAPE), ScheduleConfig(), 3, start=prk_start)


def test_euler_rejects_linspace_and_sample_py_offers_it():
    with pytest.raises(ValueError, match="euler supports leading or trailing"):
        euler(ref.analytic_model, torch.zeros(ref.X_SHAPE), ScheduleConfig(timestep_spacing="linspace"), 5)
    assert SAMPLERS["euler"] is euler and sorted(SAMPLERS) == ["ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "pndm"]


@pytest.mark.parametrize("settings", [dict(thresholding=True), dict(clip_sample=True)])
def test_dpmpp_rejects_x0_clipping(settings):
    with pytest.raises(ValueError, match="dpmpp_2m supports neither clip_sample nor thresholding"):
        dpmpp_2m(ref.analytic_model, torch.zeros(ref.X_SHAPE), ScheduleConfig(**settings), 5)


def test_dpmpp_karras_rejects_the_cosine_schedule_and_sample_py_offers_it():
    cfg = ScheduleConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="karras needs a beta_schedule other than squaredcos_cap_v2"):
        dpmpp_2m(ref.analytic_model, torch.zeros(ref.X_SHAPE), cfg, 5, karras=True)
    assert SAMPLERS["dpmpp-2m"] is dpmpp_2m


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_dpmpp_timesteps_match_diffusers(spacing, karras):
    """Every step count from 1 to 60 (at 61 trailing, diffusers adds a bogus timestep -1, as for DDIM)."""
    diffusers = pytest.importorskip("diffusers")
    cfg_dict = {**ref.scheduler_config(ref._case("dpmpp-2m", 1)), "timestep_spacing": spacing,
                "use_karras_sigmas": karras}
    sched = diffusers.DPMSolverMultistepScheduler.from_config(cfg_dict)
    cfg = ScheduleConfig.from_dict(cfg_dict)
    for steps in range(1, 61):
        sched.set_timesteps(steps)
        ts = []
        dpmpp_2m(lambda x, t: x, torch.zeros(1), cfg, steps, karras=karras, callback=lambda i, t, x: ts.append(t))
        assert ts == sched.timesteps.tolist(), steps


# ----------------------------------------------------------------------------- init sigma, guidance


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_init_noise_sigma_matches_diffusers(spacing):
    diffusers = pytest.importorskip("diffusers")
    cfg_dict = {**ref.scheduler_config(ref._case("euler", 30)), "timestep_spacing": spacing}
    sched = diffusers.EulerDiscreteScheduler.from_config(cfg_dict)
    sched.set_timesteps(30)
    cfg = ScheduleConfig.from_dict(cfg_dict)
    assert init_noise_sigma(cfg, 30) == float(sched.init_noise_sigma)


def test_guidance_formula():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(samplers.guidance(u, c, 7.5), u + 7.5 * (c - u))
    torch.testing.assert_close(samplers.guidance(u, c, 1.0), c)
    torch.testing.assert_close(samplers.guidance(u, c, 0.0), u)


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale):
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(2, 4, 3, 3, generator=g), 2 * torch.randn(2, 4, 3, 3, generator=g)
    guided = u + 5.0 * (c - u)
    expected = rescale_noise_cfg(guided, c, guidance_rescale=rescale) if rescale > 0 else guided
    torch.testing.assert_close(samplers.guidance(u, c, 5.0, rescale), expected, atol=1e-6, rtol=1e-6)
    if rescale == 1.0:  # fully rescaled: each sample has the conditional output's std
        torch.testing.assert_close(expected.flatten(1).std(1), c.flatten(1).std(1))


def test_with_guidance_makes_one_batched_call_uncond_first(stored):
    calls = []

    def two_headed(x2, t):  # uncond half predicts 0, cond half predicts 1
        calls.append(x2.shape[0])
        return torch.cat([torch.zeros_like(x2[:1]).expand(x2.shape[0] // 2, *x2.shape[1:]),
                          torch.ones_like(x2[: x2.shape[0] // 2])])

    guided = samplers.with_guidance(two_headed, 3.0)
    out = guided(stored["x_T"], 500)
    assert calls == [2 * ref.X_SHAPE[0]]
    torch.testing.assert_close(out, torch.full(ref.X_SHAPE, 3.0))
    samplers.ddim(guided, stored["x_T"], ScheduleConfig(), 5)
    assert calls == [4] * 6  # one UNet call per step
