"""Benchmark c: loading a full-size SDXL UNet in fp16, minidream vs diffusers.

    python -m benchmarks.loading [--repeats 5] [--cache benchmarks/.cache]

Once, the benchmark writes a synthetic SDXL base UNet (the real config, 2.567 B parameters of
random fp16 values, 4.8 GiB) in the two layouts users download:

- a diffusers folder: `sdxl-folder/unet/config.json` + `diffusion_pytorch_model.safetensors`;
- an SGM single file: `sdxl-unet-single.safetensors`, the UNet under `model.diffusion_model.*`.
  Only the UNet: neither loader reads the VAE or text-encoder parts of a single file to load
  the UNet, so leaving them out changes nothing measured here.

Both files are written tensor by tensor in the safetensors format (an 8-byte header length, a
JSON header of names, dtypes, shapes and byte offsets, then the raw bytes), so the writer never
holds more than one tensor. The same tensor gets the same values in both files.

Then every loader runs in a fresh Python process (4 cases, interleaved, after a warm-up round):

    minidream  load_unet(folder, torch.float16)    vs  diffusers UNet2DConditionModel.from_pretrained(folder/unet)
    minidream  load_unet(single file, float16)     vs  diffusers UNet2DConditionModel.from_single_file(file,
                                                       config=configs/sdxl-base-1.0, subfolder="unet")

Each child reports the time of the load call, and the time until every weight is really in
memory ("ready"): both libraries return tensors that are still memory-mapped views of the file,
so the child then reads one value per 4 KiB page of every weight (a strided sum, which is also a
fingerprint proving both sides loaded the same values under the same names). Peak RSS is the
child's VmHWM, imports included. Files are in the page cache (written just before, or read by
the warm-up round): the figures are warm-cache loads; a cold first load also waits for the disk.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
import zlib
from pathlib import Path

from benchmarks import harness

harness.passive_waiting()  # before torch is imported
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from minidream.files import atomic_write  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "sdxl-base-1.0"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
FOLDER, SINGLE = "sdxl-folder", "sdxl-unet-single.safetensors"
THREADS = 2
PAGE_ELEMENTS = 4096 // 2  # fp16 values per 4 KiB page


# ---------------------------------------------------------------------------------------------
# Writing the synthetic checkpoints (parent process, once)
# ---------------------------------------------------------------------------------------------


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], tensor_of) -> None:
    """Write fp16 tensors `tensor_of(name)` to `path` one at a time, in the safetensors layout.

    Layout: u64 little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets}}
    (padded with spaces to a multiple of 8 so the data is aligned), then the tensors' bytes back to
    back. Names are sorted, as safetensors' own writer does. Written atomically (files.atomic_write),
    so an interrupted run never leaves a truncated file in the cache.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        size = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "F16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in sorted(shapes):
                tensor = tensor_of(name)
                assert tuple(tensor.shape) == tuple(shapes[name]) and tensor.dtype.itemsize == 2, name
                f.write(tensor.contiguous().numpy().tobytes())

    atomic_write(path, write)


def random_fp16(name: str, shape):
    """Values that depend only on the tensor's (diffusers) name: same tensor, same values in both files."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).half()


def diffusers_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of diffusers' own UNet2DConditionModel for `config`, built on meta."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_checkpoints(cache: Path, log=print) -> tuple[Path, Path]:
    """The diffusers folder and the single file, written once into `cache` (reused afterwards)."""
    # Imported here, as each library in `child`: a child process measures the imports of its own
    # library only (minidream.formats also loads minidream's checkpoint readers).
    from minidream.formats.sgm_keys import sgm_unet_name

    folder, single = cache / FOLDER, cache / SINGLE
    config = json.loads((CONFIGS / "unet" / "config.json").read_text())
    unet_dir = folder / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    shapes = None
    if not weights.exists():
        shapes = diffusers_shapes(config)
        log(f"writing {weights} ({len(shapes)} tensors, random fp16) ...")
        unet_dir.mkdir(parents=True, exist_ok=True)
        (unet_dir / "config.json").write_text(json.dumps(config, indent=2))
        index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        start = time.perf_counter()
        write_safetensors(weights, shapes, lambda name: random_fp16(name, shapes[name]))
        log(f"  {time.perf_counter() - start:.0f} s")
    if not single.exists():
        shapes = shapes or diffusers_shapes(config)
        # SGM names from minidream's inverse rename table; diffusers' from_single_file loading this
        # file and fingerprinting equal to the folder load (see the table) is the independent check.
        sgm = {"model.diffusion_model." + sgm_unet_name(k, config): k for k in shapes}
        assert len(sgm) == len(shapes), "two diffusers names map to one SGM name"
        log(f"writing {single} (the same tensors under model.diffusion_model.* names) ...")
        start = time.perf_counter()
        with safe_open(str(weights), framework="pt") as source:
            write_safetensors(single, {s: shapes[k] for s, k in sgm.items()}, lambda s: source.get_tensor(sgm[s]))
        log(f"  {time.perf_counter() - start:.0f} s")
    return folder, single


# ---------------------------------------------------------------------------------------------
# One measurement (child process)
# ---------------------------------------------------------------------------------------------


def fingerprint(model) -> tuple[float, int]:
    """(checksum, parameters): reads one fp16 value per 4 KiB page of every tensor, so every page
    of every weight is faulted in; the checksum weights each tensor's strided sum by its rank in
    name order, so it also changes when two tensors trade names."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rank, (name, tensor) in enumerate(sorted(model.state_dict().items())):
            if tensor.device.type == "meta":
                raise RuntimeError(f"{name} was never loaded (still on meta)")
            if tensor.dtype != torch.float16:
                raise RuntimeError(f"{name} is {tensor.dtype}, not float16")
            total += (rank + 1) * tensor.reshape(-1)[::PAGE_ELEMENTS].double().sum().item()
            count += tensor.numel()
    return total, count


def child(case: str, path: str) -> None:
    """One load in this fresh process. Each case imports only its own library, here: the imports
    are part of what is measured ("process" time, "RSS after imports")."""
    if case.startswith("minidream"):
        from minidream.formats import load_unet

        def load():
            return load_unet(path, torch.float16)
    elif case == "diffusers-folder":
        from diffusers import UNet2DConditionModel

        def load():
            return UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float16)
    elif case == "diffusers-single":
        from diffusers import UNet2DConditionModel

        def load():
            return UNet2DConditionModel.from_single_file(
                path, config=str(CONFIGS), subfolder="unet", torch_dtype=torch.float16, local_files_only=True
            )
    else:
        raise SystemExit(f"unknown case {case}")
    torch.set_num_threads(THREADS)
    rss_imports = harness.peak_rss_gib()
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter()
    checksum, count = fingerprint(model)
    ready = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "ready_s": ready - start, "rss_imports_gib": rss_imports,
                      "peak_rss_gib": harness.peak_rss_gib(), "checksum": checksum, "parameters": count}))


# ---------------------------------------------------------------------------------------------
# The benchmark (parent process)
# ---------------------------------------------------------------------------------------------

CASES = {  # name -> (which files, what it is compared with)
    "minidream-folder": (FOLDER, "diffusers-folder"),
    "diffusers-folder": (FOLDER + "/unet", None),
    "minidream-single": (SINGLE, "diffusers-single"),
    "diffusers-single": (SINGLE, None),
}
CALLS = {
    "minidream-folder": "minidream load_unet(folder, torch.float16)",
    "diffusers-folder": "diffusers UNet2DConditionModel.from_pretrained(folder/unet, torch_dtype=float16)",
    "minidream-single": "minidream load_unet(single_file, torch.float16)",
    "diffusers-single": "diffusers UNet2DConditionModel.from_single_file(file, config=configs/sdxl-base-1.0, subfolder='unet', torch_dtype=float16)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the synthetic checkpoints live")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.path)

    args.cache.mkdir(parents=True, exist_ok=True)
    folder, _ = write_checkpoints(args.cache)
    weights_gib = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 2**30
    env = {"HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}

    def case(name):
        path = str(args.cache / CASES[name][0])
        return lambda: harness.run_child(["-m", "benchmarks.loading", "--child", name, "--path", path], env=env)

    info = harness.machine(THREADS)
    print(harness.machine_lines(info))
    runs = harness.interleave({name: case(name) for name in CASES}, repeats=args.repeats, warmup=args.warmup)

    reference_sum = runs["diffusers-folder"][0]["checksum"]
    rows = []
    for name, (_, versus) in CASES.items():
        r = runs[name]
        peak = harness.median(r, "peak_rss_gib")
        same = all(abs(x["checksum"] - reference_sum) <= 1e-9 * abs(reference_sum) for x in r)
        row = [name, harness.median(r, "load_s"), harness.median(r, "ready_s"), harness.spread(r, "ready_s"),
               harness.median(r, "wall_s"), peak, peak / weights_gib, harness.median(r, "rss_imports_gib"),
               "yes" if same else "NO"]
        if versus:
            ratio_t = harness.paired_ratio(r, runs[versus], "ready_s")
            ratio_p = harness.paired_ratio(r, runs[versus], "wall_s")
            ratio_m = harness.paired_ratio(r, runs[versus], "peak_rss_gib")
            row += [f"{ratio_t:.2f}", f"{ratio_p:.2f}", f"{ratio_m:.2f}"]
        else:
            row += ["", "", ""]
        rows.append(row)
    headers = ["case", "load call s", "ready s", "ready min..max", "process s", "peak RSS GiB",
               "peak / weights", "RSS after imports GiB", "same weights", "ratio ready", "ratio process",
               "ratio peak RSS"]
    table = harness.markdown_table(headers, rows)
    print(table)
    verdicts = []
    for name in ("minidream-folder", "minidream-single"):
        r, versus = runs[name], CASES[name][1]
        peak = harness.median(r, "peak_rss_gib")
        ready = harness.paired_ratio(r, runs[versus], "ready_s")
        process = harness.paired_ratio(r, runs[versus], "wall_s")
        verdicts.append(f"- {name}: peak RSS {peak:.2f} GiB ({peak / weights_gib:.2f} x the weights); against "
                        f"{versus}: ready ratio {ready:.2f} ({harness.speed_words(ready)}), whole process ratio "
                        f"{process:.2f} ({harness.speed_words(process)})"
                        + harness.noise_note({name: r, versus: runs[versus]}, "ready_s"))
    print("\n".join(verdicts))
    if args.no_write:
        return
    calls = "\n".join(f"- `{name}`: {CALLS[name]}" for name in CASES)
    body = f"""## c. Loading full-size SDXL (UNet, fp16, CPU)

Command: `{harness.command_line()}`

{harness.machine_lines(info)}

Config: SDXL base 1.0 UNet (configs/sdxl-base-1.0/unet/config.json), {runs['minidream-folder'][0]['parameters'] / 1e9:.3f} B
parameters of random fp16 values, {weights_gib:.2f} GiB of weights, written once to {args.cache.name}/ as a
diffusers folder and as an SGM single file (UNet tensors only). Each load runs in a fresh process
(`torch.set_num_threads({THREADS})`, HF_HUB_OFFLINE=1); {args.warmup} warm-up round, then medians of
{args.repeats} interleaved rounds. Files are in the page cache (warm loads).

{calls}

"load call" = the call alone; both libraries return tensors that still map the file, so "ready"
adds reading one value of every 4 KiB page of every weight (the same strided sum on both sides,
also used as the checksum behind "same weights"); "process" = the child's whole life (Python
start, imports, load, ready). Peak RSS = the child's VmHWM, imports included (file pages mapped
into the process count). Ratios are minidream / diffusers, medians of the per-round ratios.

{table}

Summary:
{chr(10).join(verdicts)}
"""
    harness.write_section("c-loading", body)
    print(f"wrote {harness.RESULTS}")


if __name__ == "__main__":
    main()
