"""Benchmark b: sampling, minidream vs diffusers' StableDiffusionXLPipeline.

    python -m benchmarks.sampling [--repeats 5] [--dtypes fp32 bf16] [--samplers ddim pndm] [--size 256]

A mid-size SDXL-shaped model (UNet channels (64, 128, 256), transformer depth (0, 2, 4), 64-wide
heads, text_time conditioning; two small CLIP text encoders; a small VAE) with random weights is
written once in the diffusers layout to benchmarks/.cache/sdxl-mid. Both libraries load that same
folder. One generation: 30 steps of DDIM or PNDM, classifier-free guidance 5.0 (UNet batch 2),
256 x 256 px by default (32 x 32 latents; `--size 512` for 64 x 64 latents, about 4x the time, over
10 minutes on a shared 2-core machine), seed 0, prompt encoding included, returning the final latents
(minidream `sample_latents`, diffusers `output_type="latent"`): the VAE decode is left out, it is
the same small VAE on both sides and not part of sampling.

Same protocol as every benchmark (harness.py), in one process: a short (2-step) warm-up generation
per side, then `repeats` interleaved rounds; medians; ratio minidream / diffusers per round, then
its median. The latents of both sides are compared (max |a - b| / max |b|) to show both computed
the same thing. OpenMP threads wait passively (harness.passive_waiting) on both sides.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import MID_TEXT, MID_UNET

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402

from minidream.formats.model_folder import WEIGHT_FILES, write_model_index, write_part  # noqa: E402
from minidream.formats.models import load_model  # noqa: E402
from minidream import samplers  # noqa: E402
from minidream.pipeline import sample_latents  # noqa: E402
from minidream.toy import tiny  # noqa: E402
from minidream.toy.vocab import vocab_size, write_clip_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
FOLDER = CACHE / "sdxl-mid"
THREADS = 2
STEPS, GUIDANCE = 30, 5.0
PROMPT = "a photo of a dog wearing sunglasses on the beach"
VAE = dict(tiny.VAE, sample_size=512)  # the bundled tiny model's VAE; not run (latents are returned)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_model(folder: Path = FOLDER) -> Path:
    """The mid-size SDXL-shaped diffusers folder, written once (random weights, fixed seeds), with
    the writers of the bundled tiny model (minidream.toy.tiny): same layout, larger widths."""
    if (folder / "model_index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = vocab_size(tiny.WORDS)
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", **MID_UNET},
        "vae": {"_class_name": "AutoencoderKL", **VAE},
        "text_encoder": tiny.clip_text_config(MID_TEXT[0], 2, "quick_gelu", vocab, projection=False),
        "text_encoder_2": tiny.clip_text_config(MID_TEXT[1], 2, "gelu", vocab, projection=True),
    }
    for seed, (part, config) in enumerate(configs.items()):
        weights = tiny.random_weights(tiny.stored_shapes(part, config), seed)
        write_part(tmp / part, config, weights, WEIGHT_FILES[part], torch.float32)
    write_clip_tokenizer(tmp / "tokenizer", tiny.WORDS)
    write_clip_tokenizer(tmp / "tokenizer_2", tiny.WORDS, pad_token="!")
    (tmp / "scheduler").mkdir()
    shutil.copy(REPO / "configs/sdxl-base-1.0/scheduler/scheduler_config.json", tmp / "scheduler")
    write_model_index(tmp)
    tmp.rename(folder)
    return folder


def minidream_case(folder: Path, dtype: torch.dtype, sampler: str, size: int):
    """run(steps) -> latents: one minidream generation."""
    model = load_model(folder, dtype)

    def run(steps=STEPS):
        return sample_latents(model, PROMPT, sampler=getattr(samplers, sampler), steps=steps, guidance_scale=GUIDANCE, seed=0,
                              height=size, width=size, progress=False)

    return run


def diffusers_case(folder: Path, dtype: torch.dtype, sampler: str, size: int):
    """run(steps) -> latents: one StableDiffusionXLPipeline generation with the same scheduler."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    scheduler = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}[sampler]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(steps=STEPS):
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator,
                    height=size, width=size, output_type="latent").images

    return run


def measure(runners: dict, repeats: int) -> tuple[dict, dict]:
    """Warm up each side with a 2-step generation, then time `repeats` interleaved generations.
    Returns (figures per side, the last latents of each side)."""
    latents = {}

    def case(name):
        def run():
            start, cpu = time.perf_counter(), time.process_time()
            latents[name] = runners[name]()
            return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}

        return run

    for run in runners.values():
        run(steps=2)
    return harness.interleave({name: case(name) for name in runners}, repeats, warmup=0), latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--samplers", nargs="+", default=["ddim", "pndm"], choices=["ddim", "pndm"])
    parser.add_argument("--size", type=int, default=256,
                        help="image side in pixels (latents: size / 8); 512 takes ~4x longer")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = write_model()
    info = harness.machine(args.threads)
    print(harness.machine_lines(info))
    rows, verdicts = [], []
    for dtype_name in args.dtypes:
        for sampler in args.samplers:
            dtype = DTYPES[dtype_name]
            runners = {"minidream": minidream_case(folder, dtype, sampler, args.size),
                       "diffusers": diffusers_case(folder, dtype, sampler, args.size)}
            print(f"{sampler} {dtype_name}: warm-up (a 2-step generation per side)")
            runs, latents = measure(runners, args.repeats)
            a, b = latents["minidream"].float(), latents["diffusers"].float()
            err = ((a - b).abs().max() / b.abs().max()).item()
            ours, ref = harness.median(runs["minidream"], "s"), harness.median(runs["diffusers"], "s")
            ratio = harness.paired_ratio(runs["minidream"], runs["diffusers"], "s")
            cpu_ratio = harness.paired_ratio(runs["minidream"], runs["diffusers"], "cpu_s")
            rows.append([sampler, dtype_name, ours, harness.spread(runs["minidream"], "s"), ref,
                         harness.spread(runs["diffusers"], "s"), f"{ratio:.2f}", f"{cpu_ratio:.2f}", f"{err:.1e}"])
            verdicts.append(f"- {sampler} {dtype_name}: ratio {ratio:.2f} ({harness.speed_words(ratio)})"
                            + harness.noise_note(runs, "s"))
    headers = ["sampler", "dtype", "minidream s", "min..max", "diffusers s", "min..max", "ratio (wall)",
               "ratio (CPU time)", "latents rel. diff"]
    table = harness.markdown_table(headers, rows)
    print(table)
    print("\n".join(verdicts))
    if args.no_write:
        return
    latent = args.size // 8
    body = f"""## b. Sampling: {STEPS} steps with CFG, mid-size SDXL-shaped pipeline (CPU)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Config: UNet block_out_channels {MID_UNET['block_out_channels']}, transformer depth (0, 2, 4), heads
{MID_UNET['attention_head_dim']} (64 wide), context {MID_UNET['cross_attention_dim']}, text_time conditioning;
CLIP text encoders of width {MID_TEXT}, 2 layers each; random weights in the diffusers layout
(benchmarks/.cache/sdxl-mid, both sides load it). One generation = prompt encoding + {STEPS} sampler
steps with guidance {GUIDANCE} (UNet batch 2) at {args.size} x {args.size} px ({latent} x {latent} latents), seed 0,
returning the latents (minidream `pipeline.sample_latents`, diffusers `StableDiffusionXLPipeline(...,
output_type="latent")` with `DDIMScheduler` / `PNDMScheduler` from the model's scheduler config).
`torch.set_num_threads({args.threads})` for both, in one process; warm-up: one 2-step generation per
side; then medians of {args.repeats} interleaved repeats; ratios are medians of the per-round ratios
minidream / diffusers (harness.paired_ratio). "ratio (CPU time)" uses the process CPU
time, less sensitive to other jobs on the machine (but it counts threads spinning while they wait).
"latents rel. diff" = max |minidream - diffusers| / max |diffusers| of the final latents.

{table}

Summary (ratio minidream / diffusers, wall time):
{chr(10).join(verdicts)}
"""
    harness.write_section(f"b-sampling-{args.size}px", body)  # one section per image size
    print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
