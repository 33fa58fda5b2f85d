"""Hostile and broken inputs through train.py and sample.py, each in its own process: prints a table of
exit code, traceback (yes/no), warning lines, seconds and the last stderr line. Not part of the test run
(it takes ~4 minutes and mounts two small tmpfs folders for the read-only and full-disk cases, so it
needs root); tests/test_fuzz.py is the fast, randomised version that runs with the tests.

    python tests/hostile_inputs.py .      # from the repository root, with the test requirements installed
"""
import json, os, shutil, struct, subprocess, sys, time, zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from PIL import Image

REPO = Path(sys.argv[1]).resolve()
W = Path("/tmp/hostile"); shutil.rmtree(W, ignore_errors=True); W.mkdir()
TINY = REPO / "weights/tiny-sdxl"
SUBJ = REPO / "data/raj"
FAST = ["--steps", "2", "--validate-every", "0", "--no-prior"]
rows = []


def run(name, script, args, timeout=120):
    start = time.time()
    try:
        p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=W, capture_output=True,
                           text=True, timeout=timeout)
        code, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        code, err = "TIMEOUT", ""
    lines = [l for l in err.splitlines() if l.strip()]
    tb = "Traceback" in err
    last = lines[-1] if lines else ""
    warns = sum(l.startswith("warning:") for l in lines)
    rows.append((name, script, code, tb, warns, round(time.time() - start, 1), last[:230]))
    print(rows[-1], flush=True)


# a good LoRA to damage: train one quickly
run("(setup: a 2-step LoRA)", "train.py", ["--subject", SUBJ, "--out", W / "runs", *FAST])
lora = next((W / "runs").glob("raj-*/pytorch_lora_weights.safetensors"))
tensors = load_file(lora)
from safetensors import safe_open
with safe_open(str(lora), "pt") as f:
    meta = dict(f.metadata())
cfg = json.loads(meta["lora_adapter_metadata"])


def lora_variant(name, change_tensors=None, change_cfg=None, raw_meta=None):
    t = {k: v.clone() for k, v in tensors.items()}
    c = json.loads(json.dumps(cfg))
    if change_tensors: change_tensors(t)
    if change_cfg: change_cfg(c)
    m = dict(meta); m["lora_adapter_metadata"] = raw_meta if raw_meta is not None else json.dumps(c)
    path = W / f"{name}.safetensors"
    save_file(t, str(path), metadata=m)
    return path


k0 = sorted(k for k in tensors if "lora_A" in k)[0]
SAMPLE = ["--steps", "2", "--prompt", "a photo of rraj person", "--out", W / "samples"]
run("train --lr inf", "train.py", ["--subject", SUBJ, "--out", W / "r2", "--lr", "inf", *FAST])
run("train --lr 1e6", "train.py", ["--subject", SUBJ, "--out", W / "r2", "--lr", "1e6", *FAST])
run("LoRA with NaN values", "sample.py", ["--lora", lora_variant("nan", lambda t: t[k0].fill_(float("nan"))), *SAMPLE])
run("LoRA with inf values", "sample.py", ["--lora", lora_variant("inf", lambda t: t[k0].fill_(float("inf"))), *SAMPLE])
run("LoRA with NaN alpha", "sample.py", ["--lora", lora_variant("nanalpha", change_cfg=lambda c: c.update({"unet.lora_alpha": float("nan")})), *SAMPLE])
run("--lora FILE:nan", "sample.py", ["--lora", f"{lora}:nan", *SAMPLE])
run("--lora FILE:inf", "sample.py", ["--lora", f"{lora}:inf", *SAMPLE])
run("LoRA alpha_pattern ReDoS regex", "sample.py", ["--lora", lora_variant("redos", change_cfg=lambda c: c.update({"unet.alpha_pattern": {"([a-z0-9_]+\\.?)+X": 8}})), *SAMPLE], timeout=60)
run("LoRA with a 0-d tensor", "sample.py", ["--lora", lora_variant("zerod", lambda t: t.__setitem__(k0, torch.tensor(1.0))), *SAMPLE])
run("LoRA with a vector alpha", "sample.py", ["--lora", lora_variant("vecalpha", lambda t: t.__setitem__(k0.replace("lora_A.weight", "alpha"), torch.tensor([1.0, 2.0]))), *SAMPLE])
run("LoRA of rank 0", "sample.py", ["--lora", lora_variant("rank0", lambda t: [t.__setitem__(k, v[:0] if "lora_A" in k else v[:, :0]) for k, v in list(t.items())]), *SAMPLE])
run("LoRA metadata a list", "sample.py", ["--lora", lora_variant("listmeta", raw_meta="[1, 2]"), *SAMPLE])
run("LoRA lora_alpha not a number", "sample.py", ["--lora", lora_variant("stralpha", change_cfg=lambda c: c.update({"unet.lora_alpha": "eight"})), *SAMPLE])
run("LoRA invalid regex pattern", "sample.py", ["--lora", lora_variant("badregex", change_cfg=lambda c: c.update({"unet.alpha_pattern": {"down_blocks.[": 2}})), *SAMPLE])

# base models
def model_copy(name):
    dst = W / name
    shutil.copytree(TINY, dst)
    return dst

nan = model_copy("nan-model")
unet_file = nan / "unet/diffusion_pytorch_model.safetensors"
u = load_file(unet_file); u = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in u.items()}
save_file(u, str(unet_file))
run("sample: base model with NaN weights", "sample.py", ["--model", nan, *SAMPLE])
run("train: base model with NaN weights", "train.py", ["--subject", SUBJ, "--model", nan, "--out", W / "r3", "--steps", "30", "--validate-every", "0", "--no-prior"])
big = model_copy("huge-config")
c = json.loads((big / "unet/config.json").read_text()); c["block_out_channels"] = [100000, 100000, 100000]
(big / "unet/config.json").write_text(json.dumps(c))
run("model config with absurd sizes", "sample.py", ["--model", big, *SAMPLE])
i32 = model_copy("int32-weight")
vf = i32 / "vae/diffusion_pytorch_model.safetensors"
v = load_file(vf); k = sorted(v)[0]; v[k] = v[k].to(torch.int32); save_file(v, str(vf))
run("model folder with an int32 weight", "sample.py", ["--model", i32, *SAMPLE])
lst = model_copy("list-config"); (lst / "vae/config.json").write_text("[1, 2, 3]")
run("config.json that is a list", "sample.py", ["--model", lst, *SAMPLE])
mi = model_copy("broken-index"); (mi / "model_index.json").write_text("{\"_class_name\": ")
run("broken model_index.json", "sample.py", ["--model", mi, *SAMPLE])
run("train: broken model_index.json", "train.py", ["--subject", SUBJ, "--model", mi, "--out", W / "r4", *FAST])

# data
def subject_copy(name):
    dst = W / name; shutil.copytree(SUBJ, dst); return dst

bomb = subject_copy("bomb")
Image.new("1", (20000, 20000)).save(bomb / "huge.png", optimize=True)
run("20000x20000 PNG in the subject folder", "train.py", ["--subject", bomb, "--out", W / "r5", *FAST])
zb = W / "prior-bomb.zip"
with zipfile.ZipFile(zb, "w", zipfile.ZIP_DEFLATED) as z:
    with z.open("prior/big.png", "w", force_zip64=True) as m:
        for _ in range(1500):
            m.write(bytes(2**20))
run("class-dir zip bomb (1.5 GB inflated)", "train.py", ["--subject", SUBJ, "--class-dir", zb, "--out", W / "r6", "--steps", "2", "--validate-every", "0"])
sl = subject_copy("subject-list"); (sl / "subject.json").write_text("[1, 2]")
run("subject.json holding a list", "train.py", ["--subject", sl, "--out", W / "r7", *FAST])
su = subject_copy("subject-bytes"); (su / "subject.json").write_bytes(b"\xff\xfe\x00{")
run("subject.json not UTF-8", "train.py", ["--subject", su, "--out", W / "r7", *FAST])
many = subject_copy("many")
for i in range(1000):
    Image.new("RGB", (16, 16), (i % 256, 0, 0)).save(many / f"small-{i:04d}.png")
for i in range(200):
    (many / f"broken-{i:03d}.png").write_bytes(b"nope")
run("1000 small + 200 broken images (warning lines)", "train.py", ["--subject", many, "--out", W / "r8", "--steps", "1", "--validate-every", "0", "--no-prior", "--views-per-image", "1"], timeout=600)

# runs and numbers
run_folder = next((W / "runs").glob("raj-*"))
broken_run = W / "broken-run"; shutil.copytree(run_folder, broken_run); (broken_run / "config.json").write_text("{oops")
run("--resume with a corrupt config.json", "train.py", ["--resume", broken_run])
run("train --seed 99999999999999999999999", "train.py", ["--subject", SUBJ, "--out", W / "r9", "--seed", "99999999999999999999999", *FAST])
run("sample --steps 100000", "sample.py", ["--steps", "100000", "--prompt", "x", "--out", W / "samples"])
run("train huge --validation-seeds", "train.py", ["--subject", SUBJ, "--out", W / "r9", "--validation-seeds", *range(100), *FAST])
run("sample --seed 99999999999999999999999", "sample.py", ["--seed", "99999999999999999999999", "--prompt", "x", "--out", W / "samples"])

# file system: a read-only and a full tmpfs (root ignores permission bits)
for name, opts in (("ro", "ro,size=4m"), ("full", "size=300k")):
    d = W / name; d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=False)
run("train into a read-only --out", "train.py", ["--subject", SUBJ, "--out", W / "ro", *FAST])
run("sample into a read-only --out", "sample.py", ["--prompt", "x", "--steps", "2", "--out", W / "ro"])
run("train with a full disk", "train.py", ["--subject", SUBJ, "--out", W / "full", *FAST])
run("sample with a full disk", "sample.py", ["--prompt", "x", "--steps", "2", "--num-images", "30", "--out", W / "full"])
for name in ("ro", "full"):
    subprocess.run(["umount", str(W / name)], check=False)

print("\n| case | script | exit | traceback | warning lines | s | last stderr line |\n|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(x).replace("|", "/") for x in r) + " |")
