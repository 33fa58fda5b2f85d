"""The VAE in tiles (minidream.lowmem.tiled_vae): how far tiled is from untiled, and what it saves.

    python -m benchmarks.vae_tiles [--side 512] [--tile 256] [--threads 1] [--no-write]

1. Image difference, tiled vs untiled (max and mean |difference| in 0..255 pixel units, PSNR):
   - the bundled tiny model's trained VAE (weights/tiny-sdxl, 4 px per latent) on the data/raj
     photos at 64 px (tiles of 32 and 16 px) and at 128 px (tiles of 64 px = its sample_size,
     diffusers' default tile): decode of the untiled latents, and encode (latent means, mean
     |difference| / their std);
   - the SDXL VAE's architecture (configs/sdxl-base-1.0/vae) with random weights at --side px in
     tiles of --tile px: random weights say nothing about how visible seams are, only that the
     full-size code path runs and how much memory it takes.
2. CPU memory of that SDXL-config VAE, untiled vs tiled, each in a fresh process: VmHWM after the
   call - VmRSS before it (VmHWM reset via /proc/self/clear_refs, glibc mmapping blocks >= 64 KiB
   so freed tensors leave RSS; as benchmarks/planner_validation.py), beside the fake-tensor
   counter's prediction for the same call (minidream.planner.fake_run.ByteCounter, no rounding).
3. The prediction for a T4 at 1024 px (ByteCounter with the CUDA allocator's 512-byte blocks):
   the SDXL VAE alone, untiled and in 512 and 256 px tiles; and the run's VAE phases as
   `train.py --plan` counts them (minidream.planner.memory.plan_sampling: the UNet and text
   encoders are on the GPU too, as load_model leaves them).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()  # before torch is imported
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minidream.formats import load_model  # noqa: E402
from minidream.formats.checkpoint import build_vae  # noqa: E402
from minidream.formats.loading import parameters_on_meta  # noqa: E402
from minidream.lowmem.tiled_vae import TiledVAE, use_tiled_vae  # noqa: E402
from minidream.planner import memory  # noqa: E402
from minidream.planner.fake_run import ByteCounter, fake_tensors, materialize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SDXL = REPO / "configs" / "sdxl-base-1.0"
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the docstring
MiB, GiB = 2**20, 2**30


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max, mean |a - b| in 0..255 units, PSNR in dB) of images in [-1, 1] (clamped first)."""
    d = (a.clamp(-1, 1) - b.clamp(-1, 1)).abs() * 127.5
    mse = (d**2).mean().item()
    return d.max().item(), d.mean().item(), 10 * math.log10(255**2 / mse) if mse else math.inf


def photos(side: int) -> torch.Tensor:
    """The data/raj photos at side x side: (6, 3, side, side) in [-1, 1]."""
    files = sorted((REPO / "data" / "raj").glob("*.png"))
    arrays = [np.array(Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def tiny_rows() -> list[list]:
    """Tiled vs untiled on the bundled trained tiny VAE (part 1)."""
    vae, rows = load_model(REPO / "weights" / "tiny-sdxl").vae, []
    for side, tile in ((64, 32), (64, 16), (128, 64), (128, 32)):
        x = photos(side)
        with torch.no_grad():
            mean, _ = vae.encode(x)
            tiles = TiledVAE(vae, tile)
            tiled_mean, _ = tiles.encode(x)
            worst, average, psnr = pixel_difference(tiles.decode(mean), vae.decode(mean))
            own = pixel_difference(vae.decode(mean), x)[2]
        latent = (tiled_mean - mean).abs().mean().item() / mean.std().item()
        n = math.ceil(side / (tile - tile // 4))
        rows.append([f"tiny VAE, {side} px photos", f"{tile} px ({n} x {n})", f"{worst:.1f}",
                     f"{average:.2f}", f"{psnr:.1f}", f"{latent:.3f}", f"{own:.1f}"])
        print(rows[-1])
    return rows


def sdxl_vae(seed: int = 0):
    """The SDXL VAE's architecture with random weights (fp32: force_upcast)."""
    config = json.loads((SDXL / "vae" / "config.json").read_text())
    torch.manual_seed(seed)
    return build_vae(config).eval().requires_grad_(False)


def inputs(call: str, side: int) -> torch.Tensor:
    """A smooth random image (bilinear from 1/16 size) or N(0, 1) latents, fixed seed."""
    g = torch.Generator().manual_seed(1)
    if call == "encode":
        coarse = torch.rand(1, 3, side // 16, side // 16, generator=g) * 2 - 1
        return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    return torch.randn(1, 4, side // 8, side // 8, generator=g)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(call: str, side: int, tile: int, threads: int, out: str) -> dict:
    """One measured call in this fresh process (tile 0: untiled); its output goes to `out`."""
    torch.set_num_threads(threads)
    vae = sdxl_vae()
    vae = TiledVAE(vae, tile) if tile else vae
    x = inputs(call, side)
    with torch.no_grad():
        before = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        y = getattr(vae, call)(x)
        seconds = time.perf_counter() - start
        increment = (rss_kib("VmHWM") - before) / 1024
    torch.save(y[0] if call == "encode" else y, out)  # encode: the latent means
    return {"increment_mib": increment, "s": seconds}


def predicted_peak(config: dict, call: str, side: int, tile: int, block: int) -> tuple[int, int]:
    """(peak bytes, weight bytes) the fake-tensor counter sees for one call of the VAE alone (the
    peak includes the weights); inputs are made inside the counter, as plan_sampling makes them."""
    with parameters_on_meta():
        vae = build_vae(config)
    vae.eval().requires_grad_(False)
    vae = TiledVAE(vae, tile) if tile else vae
    counter = ByteCounter(block)
    with fake_tensors(), counter, torch.no_grad():
        materialize(vae)
        weights = counter.live
        shape = (1, 3, side, side) if call == "encode" else (1, 4, side // 8, side // 8)
        getattr(vae, call)(torch.empty(shape))
    return counter.peak, weights


def cpu_rows(args) -> tuple[list[list], list[list]]:
    """Parts 1 (random SDXL-config VAE) and 2: measured in fresh processes, and predicted."""
    config = json.loads((SDXL / "vae" / "config.json").read_text())
    memory_rows, quality_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for call in ("encode", "decode"):
            outputs = {}
            for tile in (0, args.tile):
                out = f"{tmp}/{call}-{tile}.pt"
                m = harness.run_child(["-m", "benchmarks.vae_tiles", "--child", call, str(args.side), str(tile),
                                       "--threads", str(args.threads), "--out", out], env=ENV)
                outputs[tile] = torch.load(out)
                peak, weights = predicted_peak(config, call, args.side, tile, block=1)
                p = (peak - weights) / MiB  # the increment, as measured
                what = f"{tile} px tiles" if tile else "untiled"
                memory_rows.append([f"{call}, {what}", f"{m['increment_mib']:.0f}", f"{p:.0f}",
                                    f"{m['s']:.1f}"])
                print(memory_rows[-1])
            a, b = outputs[args.tile], outputs[0]
            if call == "decode":
                worst, average, psnr = pixel_difference(a, b)
                quality_rows.append([f"SDXL-config VAE, random weights, {args.side} px", f"{args.tile} px",
                                     f"{worst:.1f}", f"{average:.2f}", f"{psnr:.1f}", "", ""])
            else:
                quality_rows[-1:] = []  # the encode figure joins the decode row below
                latent = (a - b).abs().mean().item() / b.std().item()
    quality_rows[-1][5] = f"{latent:.3f}"
    return quality_rows, memory_rows


def t4_rows() -> list[list]:
    """Part 3: predictions at 1024 px on a T4 (512-byte blocks)."""
    config, rows = json.loads((SDXL / "vae" / "config.json").read_text()), []
    configs = memory.read_configs(SDXL)
    for tile in (0, 512, 256):
        alone = [predicted_peak(config, call, 1024, tile, block=512)[0] / GiB for call in ("encode", "decode")]
        model = memory.meta_model(configs, torch.float16, torch.float16)  # the T4 recipe's fp16
        if tile:
            use_tiled_vae(model, tile)
        peaks = memory.plan_sampling(model, 1024, fake_tensors())
        rows.append([f"{tile} px tiles" if tile else "untiled", f"{alone[0]:.2f}", f"{alone[1]:.2f}",
                     f"{peaks['vae_encode'] / GiB:.2f}", f"{peaks['vae_decode'] / GiB:.2f}",
                     f"{peaks['unet_guidance'] / GiB:.2f}"])
        print(rows[-1])
    return rows


def section(args, info, tiny, cpu_quality, cpu_memory, t4) -> str:
    quality = harness.markdown_table(
        ["VAE, images", "tiles (grid)", "decode max abs diff (0..255)", "decode mean abs diff",
         "decode PSNR dB", "encode: mean abs diff of latent means / their std",
         "for scale: untiled reconstruction PSNR dB"], tiny + cpu_quality)
    cpu = harness.markdown_table(["SDXL-config VAE, 1 image", "measured increment MiB",
                                  "predicted increment (fake tensors) MiB", "s"], cpu_memory)
    gpu = harness.markdown_table(
        ["SDXL VAE, fp32, 1024 px", "VAE alone: encode GiB", "VAE alone: decode GiB",
         "run phase (plan_sampling): VAE encode GiB", "run phase: VAE decode GiB",
         "run phase: UNet with guidance GiB"], t4)
    return f"""## VAE tiles: tiled vs untiled images, and the memory they save (CPU; T4 predictions)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Tiles overlap by a quarter of their side, their seams blended linearly (diffusers' tiled_encode /
tiled_decode; minidream.lowmem.tiled_vae, equal to diffusers' to 2e-6 relative in
tests/test_tiled_vae.py). Differences are tiled - untiled (decode: of the untiled latents; encode:
latent means); not tiled vs the photo. A tiny VAE at 16-32 px tiles is a harsh case (a 32 px tile
is an 8 x 8 latent): seams and per-tile GroupNorm statistics weigh more than on SDXL's 64 x 64
latent tiles of 512 px. Random weights (last row) are no measure of visible quality.

{quality}

Memory of one {args.side} px call of the SDXL-config VAE (random fp32 weights, {args.threads} thread(s)), each
case in a fresh process: measured = VmHWM after the call - VmRSS before it; predicted = the
fake-tensor ByteCounter's peak for the same call minus the weights (319 MiB), which are there
before the call in both. The counter sees tensors only: the CPU's allocator and convolution
workspaces come on top.

{cpu}

Predicted GPU memory at 1024 px (ByteCounter on fake tensors, CUDA's 512-byte blocks; no margin
added). "VAE alone": the VAE's weights and its call. "Run phase": as `train.py --plan` counts the
phases with the T4 recipe, where load_model leaves the fp16 UNet and both text encoders on the GPU
beside the VAE (their weights, ~6.5 GiB, are in every phase): tiling removes the VAE's share, not
theirs.

{gpu}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=512, help="image side of the SDXL-config VAE runs [%(default)s]")
    parser.add_argument("--tile", type=int, default=256, help="their tile side, px [%(default)s]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("CALL", "SIDE", "TILE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        call, side, tile = args.child
        print(json.dumps(child(call, int(side), int(tile), args.threads, args.out)))
        return
    info = harness.machine(args.threads)
    print(harness.machine_lines(info))
    torch.set_num_threads(args.threads)
    tiny = tiny_rows()
    cpu_quality, cpu_memory = cpu_rows(args)
    body = section(args, info, tiny, cpu_quality, cpu_memory, t4_rows())
    print(body)
    if not args.no_write:
        harness.write_section("vae-tiles", body)
        print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
