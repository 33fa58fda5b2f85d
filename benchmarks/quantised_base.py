"""Benchmark: the quantised frozen UNet base (minidream/quant, --base-weights fp16|int8|nf4).

    python -m benchmarks.quantised_base [--latent 32] [--cache /tmp/minidream-quant]

For each format: the UNet's weight bytes (parameters + buffers: codes and scales included), the
relative error of its output vs the full-precision base on the same inputs
(||eps_q - eps_ref|| / ||eps_ref||), and, for a full-size SDXL UNet, the load time and peak RSS of
loading it from a file, each format in a fresh Python process.

- tiny: the bundled trained tiny model (weights/tiny-sdxl), reference fp32, a 16x16 latent.
- SDXL: the real UNet config (configs/sdxl-base-1.0/unet, 2.567 B parameters) with random fp16
  weights (N(0, 0.02^2), seeded per tensor name), written once to the cache as a diffusers folder
  (4.8 GiB). Reference: the fp16 base (an fp32 SDXL UNet, 10 GB, does not fit beside the others
  on the machine that ran this). Inputs: batch 1, a --latent x --latent latent, 77 random context
  tokens, run in fp16 on the CPU. Random weights are no trained model: errors through a random
  UNet grow differently from a trained one's (the tiny rows are a trained model's).

Memory is read right after loading and touching every weight, before any forward: RssAnon (the
process's own memory: quantised codes and scales), RssFile (mapped file pages: an fp16 base's
weights, and a quantised base's convs and norms, are views of the file) and VmHWM (peak, imports
included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402

from benchmarks.loading import write_safetensors  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "sdxl-base-1.0" / "unet" / "config.json"
TINY = REPO / "weights" / "tiny-sdxl"
FORMATS = ("fp16", "int8", "nf4")
THREADS = 2


def random_fp16(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).half()


def write_sdxl_unet(cache: Path) -> Path:
    """A diffusers UNet folder (config.json + weights) with the real SDXL config, written once."""
    from minidream.formats.checkpoint import build_unet
    from minidream.formats.loading import parameters_on_meta

    folder = cache / "sdxl-unet"
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        config = json.loads(CONFIG.read_text())
        with parameters_on_meta():
            shapes = {k: tuple(v.shape) for k, v in build_unet(config).state_dict().items()}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        print(f"writing {weights} ({len(shapes)} tensors, random fp16) ...", file=sys.stderr)
        write_safetensors(weights, shapes, lambda name: random_fp16(name, shapes[name]))
    return folder


def unet_inputs(config, latent: int, batch: int, dtype):
    """Fixed random inputs: x (B, C, latent, latent), t, context (B, 77, D), pooled, time_ids."""
    g = torch.Generator().manual_seed(0)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = latent * 8
    return (torch.randn(batch, config.in_channels, latent, latent, generator=g).to(dtype),
            torch.tensor([500] * batch),
            torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(dtype),
            torch.randn(batch, pooled, generator=g).to(dtype),
            torch.tensor([[size, size, 0, 0, size, size]] * batch))


def memory_gib() -> dict[str, float]:
    """RssAnon (the process's own memory) and RssFile (mapped file pages) now, in GiB."""
    lines = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(lines[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile")}


def child(path: str, fmt: str, dtype_name: str, latent: int, out: str) -> None:
    """Load the UNet at `path` with base_weights `fmt`, report load figures, run one forward."""
    torch.set_num_threads(THREADS)
    from minidream.formats import load_unet
    from minidream.quant.linear import quantised_layers, weight_bytes

    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    unet = load_unet(path, dtype, base_weights=fmt)
    with torch.no_grad():  # fp16 tensors are still mmapped views of the file: read every page
        sum(t.reshape(-1)[::2048].float().sum().item() for t in unet.state_dict().values())
    load_s, peak, held = time.perf_counter() - start, harness.peak_rss_gib(), memory_gib()
    start = time.perf_counter()
    with torch.no_grad():
        eps = unet(*unet_inputs(unet.config, latent, 1, dtype)).float()
    torch.save(eps, out)
    print(json.dumps({"load_s": load_s, "peak_rss_gib": peak, "bytes": weight_bytes(unet), **held,
                      "quantised": len(quantised_layers(unet)), "forward_s":
                      time.perf_counter() - start, "finite": bool(eps.isfinite().all())}))


def measure(path: Path, cases: dict[str, tuple[str, str]], latent: int, cache: Path,
            label: str) -> list:
    """One fresh process per case (name -> (base weights, dtype)); the first case is the reference.
    Returns rows of the results table."""
    figures, outputs = {}, {}
    for name, (fmt, dtype) in cases.items():
        out = cache / f"{label}-{name}.pt"
        figures[name] = harness.run_child(["-m", "benchmarks.quantised_base", "--child", str(path),
                                           fmt, dtype, str(latent), str(out)],
                                          env={"OMP_NUM_THREADS": str(THREADS)}, timeout=1800)
        outputs[name] = torch.load(out)
        print(f"{label} {name}: {figures[name]}", file=sys.stderr)
    reference = outputs[next(iter(cases))]
    rows = []
    for name, (fmt, dtype) in cases.items():
        f = figures[name]
        error = ((outputs[name] - reference).norm() / reference.norm()).item()
        rows.append([label, name, dtype.replace("float", "fp"), f"{f['bytes'] / 2**30:.3f}",
                     f["quantised"],
                     "reference" if name == next(iter(cases)) else f"{error:.4f}",
                     f"{f['load_s']:.1f}", f"{f['RssAnon']:.2f} + {f['RssFile']:.2f}",
                     f"{f['peak_rss_gib']:.2f}", f"{f['forward_s']:.1f}",
                     "yes" if f["finite"] else "NO"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="SDXL latent side (px / 8)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/minidream-quant"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    tiny = {"fp32": ("fp16", "float32"), "fp16": ("fp16", "float16"),
            "int8": ("int8", "float32"), "nf4": ("nf4", "float32")}
    rows = measure(TINY, tiny, 16, args.cache, "tiny")
    sdxl = write_sdxl_unet(args.cache)
    rows += measure(sdxl, {fmt: (fmt, "float16") for fmt in FORMATS}, args.latent, args.cache,
                    "SDXL")
    linear = sum(math.prod(v) for k, v in _sdxl_linear_shapes().items())
    body = f"""## Quantised frozen UNet base (--base-weights)

Command: `{harness.command_line()}` (OMP_NUM_THREADS={THREADS})

{harness.machine_lines(harness.machine(THREADS))}

What: the UNet with its Linear weights stored as int8 (one absmax scale per output row) or NF4
(QLoRA's 4-bit NormalFloat, absmax per block of 64 weights, two codes per byte), dequantised
inside forward layer by layer; scales in the load dtype. Error: relative L2 error of the UNet
output vs the reference row on the same inputs (tiny: the bundled trained model vs fp32, 16x16
latent; SDXL: the real config with random N(0, 0.02^2) fp16 weights vs the fp16 base, a
{args.latent}x{args.latent} latent, batch 1, fp16 on CPU). The tiny model's int8/nf4 rows load in fp32
(scales fp32, compute fp32), as `--base-weights` does with `--precision fp32`. Load and peak
RSS: `load_unet(folder, dtype, base_weights=...)` in a fresh process, warm page cache, then one
value per 4 KiB page of every tensor read (tensors that are views of the file are read only when
touched). Held: RssAnon (the process's own memory) + RssFile (mapped file pages) after that. Peak
RSS: VmHWM then, imports included (0.34 GiB): the mapped file pages touched count in it too.
An fp16 load keeps every weight as a view of safetensors' one map of the whole file. A quantised
load maps each tensor alone (formats/loading.py TensorMaps): a Linear weight's pages leave the RSS
once it is quantised, the convs and norms stay fp16 views of the file (RssFile), and the codes
are the RssAnon; it quantises 16K weights at a time (minidream/quant), never a whole fp32 copy.
SDXL's Linear layers hold {linear / 1e9:.2f} B of its 2.567 B weights; the 3x3 convs stay fp16.

{harness.markdown_table(["model", "base weights", "load dtype", "weights GiB", "quantised Linears",
                         "output rel. error", "load s", "held GiB: anon + file", "peak RSS GiB",
                         "forward s", "finite"], rows)}
Before this fix (same machine, same file): peak RSS int8 10.12 GiB, nf4 8.46 GiB, above the
fp16 load's 5.13, for two causes. (1) safetensors maps the whole file once and the unquantised
weights stay views of it, so every page read while quantising stayed resident: RssFile 4.87 GiB.
(2) Freed temporaries of several MB (a whole fp32 copy of each weight) raise glibc's mmap
threshold, after which its heap kept GBs of freed holes between the codes: RssAnon 5.24 / 3.58
GiB for 2.08 / 1.11 GiB of codes (diagnosed with malloc_trim, which minidream does not call:
in trial runs it returned 1.2-1.8 GiB of freed heap).
"""
    harness.write_section("quantised_base", body)
    print(body)


def _sdxl_linear_shapes() -> dict:
    from minidream.formats.checkpoint import build_unet
    from minidream.formats.loading import parameters_on_meta

    with parameters_on_meta():
        unet = build_unet(json.loads(CONFIG.read_text()))
    return {n: tuple(m.weight.shape) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear)}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:4], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        main()
