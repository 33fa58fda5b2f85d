"""sample.py as a user runs it: a subprocess on the bundled tiny model.

Checks the files it writes (PNGs with their settings in text metadata, a contact sheet), that they
are the images minidream.pipeline makes (LoRA included), and that each kind of bad input ends in one
line `sample.py: error: ...` naming the fix, exit code 2, no traceback. The runs start together
(one process each, most of their time is importing torch) and are checked one by one.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_models import write_random_lora
from minidream.cli.sample_command import SAMPLERS
from minidream.more_samplers import dpmpp_2m_karras
from minidream.formats.lora_files import add_loras
from minidream.formats.models import BUNDLED_MODEL, default_model_path, load_model
from minidream.pipeline import generate

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / BUNDLED_MODEL
PROMPTS = ["a photo of rraj person", "a dog on the beach"]
SETTINGS = dict(num_images=2, steps=3, seed=4, guidance=4.0, negative="blurry", scale=0.5)


def error_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (arguments, what the one-line error must say)}."""
    (tmp / "empty").mkdir()
    unfinished = tmp / "raj-20260101-120000"  # a run folder stopped before its LoRA was written
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \x80")
    (tmp / "comments.txt").write_text("# only a comment\n\n")
    (tmp / "not_a_lora.safetensors").write_bytes(b"this is not a safetensors file at all")
    foreign = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)}
    save_file(foreign, str(tmp / "foreign_lora.safetensors"))
    tiny = ["--model", str(TINY), "--out", str(tmp / "not-written")]  # the folder is made before the model loads
    return {
        "missing model": (["--prompt", "a dog", "--model", str(tmp / "nowhere")], "does not exist"),
        "folder that is not a model": (["--prompt", "a dog", "--model", str(tmp / "empty")], "not a model folder"),
        "no prompt": (tiny, "no prompt: give --prompt"),
        "blank prompt": (tiny + ["--prompt", "  "], "no prompt"),
        "height not a multiple of 8": (tiny + ["--prompt", "a dog", "--height", "100"], "--height 100 is not a positive multiple of 8"),
        "width zero": (tiny + ["--prompt", "a dog", "--width", "0"], "--width 0 is not a positive multiple of 8"),
        "unknown sampler": (tiny + ["--prompt", "a dog", "--sampler", "heun"], "invalid choice: 'heun'"),
        "unknown sampler, older flag": (tiny + ["--prompt", "a dog", "--scheduler", "heun"], "invalid choice: 'heun'"),
        "missing prompts file": (tiny + ["--prompts-file", str(tmp / "nope.txt")], "cannot read the prompts file"),
        "binary prompts file": (tiny + ["--prompts-file", str(tmp / "binary.txt")], "cannot read the prompts file"),
        "prompts file without prompts": (tiny + ["--prompts-file", str(tmp / "comments.txt")], "holds no prompts"),
        "missing LoRA": (tiny + ["--prompt", "a dog", "--lora", str(tmp / "nope.safetensors:0.8")],
                         "nope.safetensors not found; give --lora FILE.safetensors[:SCALE]"),
        "unfinished run as LoRA": (tiny + ["--prompt", "a dog", "--lora", str(unfinished)],
                                   "without pytorch_lora_weights.safetensors (the run has not finished: continue it"),
        "folder as embedding": (tiny + ["--prompt", "a dog", "--embedding", str(tmp / "empty")],
                                "is a folder without learned_embeds.safetensors"),
        "LoRA that does not fit": (tiny + ["--prompt", "a dog", "--lora", str(tmp / "foreign_lora.safetensors")],
                                   "1 LoRA key(s) match no module of the unet"),
        "LoRA that is no safetensors": (tiny + ["--prompt", "a dog", "--lora", str(tmp / "not_a_lora.safetensors")],
                                        "not a valid safetensors file"),
        "eta without ddim": (tiny + ["--prompt", "a dog", "--scheduler", "pndm", "--eta", "0.5"], "--eta is DDIM's noise"),
        "karras without dpmpp-2m": (tiny + ["--prompt", "a dog", "--sampler", "euler", "--karras"],
                                    "is for dpmpp-2m; use --sampler dpmpp-2m or drop --karras"),
        "steps zero": (tiny + ["--prompt", "a dog", "--steps", "0"], "--steps must be between 1 and 1,000, got 0"),
        "steps too many": (tiny + ["--prompt", "a dog", "--steps", "100000"], "--steps must be between 1 and 1,000"),
        "not a number": (tiny + ["--prompt", "a dog", "--steps", "many"], "invalid int value: 'many'"),
        "output under a file": (["--model", str(TINY), "--prompt", "a dog", "--out", str(tmp / "binary.txt" / "sub")],
                                "binary.txt is a file: give a folder"),
    }


def start(args: list[str]) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # many small runs at once: one thread each
    return subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every run at once; {case: (returncode, stdout, stderr)}, plus the paths used."""
    tmp = tmp_path_factory.mktemp("cli")
    throwaway = load_model(TINY)
    lora = write_random_lora(tmp / "subject lora.safetensors", throwaway.unet, throwaway.text.text_encoder,
                             throwaway.text.text_encoder_2)
    s = SETTINGS
    good = [*[a for p in PROMPTS for a in ("--prompt", p)], "--negative-prompt", s["negative"],
            "--num-images", str(s["num_images"]), "--steps", str(s["steps"]), "--seed", str(s["seed"]),
            "--guidance", str(s["guidance"]), "--lora", f"{lora}:{s['scale']}", "--out", str(tmp / "out"),
            "--no-progress"]
    if default_model_path()[0] != TINY:  # a developer's downloaded SDXL would be the default: too slow here
        good += ["--model", str(TINY)]
    shared = ["--model", str(TINY), "--steps", "2", "--out", str(tmp / "shared"), "--no-progress"]
    same_time = {f"same out, at once {i}": (shared + ["--prompt", "a red ball", "--seed", str(i)], "") for i in (1, 2)}
    karras = ["--model", str(TINY), "--prompt", "a red ball", "--sampler", "dpmpp-2m", "--karras", "--steps", "3",
              "--out", str(tmp / "karras"), "--no-progress"]
    cases = {"good": (good, ""), "help": (["--help"], ""), "karras": (karras, "")} | same_time | error_cases(tmp)
    results = run_all({name: args for name, (args, _) in cases.items()})
    (out,) = (tmp / "out").iterdir()  # the good run's own new folder
    return {"results": results, "expected": {k: v[1] for k, v in cases.items()}, "out": out, "lora": lora,
            "shared": shared, "karras": tmp / "karras"}


def run_all(cases: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """Start every sample.py call at once; {case: (returncode, stdout, stderr)}."""
    processes = {name: start(args) for name, args in cases.items()}
    results = {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for name, p in processes.items()}
    for p in processes.values():
        p.stdout.close()
        p.stderr.close()
    return results


def test_generates_pngs_with_metadata_and_a_grid(runs):
    code, out, err = runs["results"]["good"]
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("model: weights/tiny-sdxl"), lines[0]  # first: which model
    assert "Traceback" not in err
    pngs = sorted(runs["out"].glob("0*.png"))
    assert [p.name for p in pngs] == ["000-a-photo-of-rraj-person-seed4-1.png", "001-a-photo-of-rraj-person-seed4-2.png",
                                      "002-a-dog-on-the-beach-seed5-1.png", "003-a-dog-on-the-beach-seed5-2.png"]
    for p in [*pngs, runs["out"] / "grid.png"]:
        assert f"  {p.name}" in lines  # it says where each file went
    assert any(runs["out"].name in line for line in lines)  # and in which folder
    for k, p in enumerate(pngs):
        meta = Image.open(p).text
        assert meta["prompt"] == PROMPTS[k // 2] and meta["seed"] == str(4 + k // 2)
        assert meta["image"] == f"{k % 2 + 1} of 2"
        assert (meta["negative_prompt"], meta["sampler"], meta["steps"], meta["guidance"], meta["size"]) == (
            "blurry", "ddim", "3", "4.0", "64x64")
        assert meta["model"].endswith("tiny-sdxl") and meta["loras"] == f"{runs['lora']}:0.5"
    grid = Image.open(runs["out"] / "grid.png")  # a row per prompt (its label on the left), a column per image
    tile = 2 * 64  # 64 px pictures, enlarged 2x with sharp pixels
    label_width, top = grid.width - 2 * tile, grid.height - 2 * tile
    assert 0 < label_width <= 2 * tile and 0 < top < 40
    second_prompt_first_image = Image.open(pngs[2]).resize((tile, tile), Image.NEAREST)
    assert (np.asarray(grid)[top + tile:, label_width:label_width + tile] == np.asarray(second_prompt_first_image)).all()
    assert grid.text["prompts"] == "\n".join(PROMPTS)


def test_no_call_overwrites_another(runs):
    """Two calls at once and one after them, into one --out: each writes its own folder; every image stays."""
    for i in (1, 2):
        assert runs["results"][f"same out, at once {i}"][0] == 0, runs["results"][f"same out, at once {i}"][2]
    code, _, err = run_all({"after": runs["shared"] + ["--prompt", "a red ball", "--seed", "3"]})["after"]
    assert code == 0, err
    folders = sorted((Path(runs["shared"][runs["shared"].index("--out") + 1])).iterdir())
    assert len(folders) == 3
    seeds = sorted(Image.open(next(f.glob("000-*.png"))).text["seed"] for f in folders)
    assert seeds == ["1", "2", "3"]  # one image per call, each in its own folder beside its own grid
    assert all((f / "grid.png").is_file() for f in folders)


def test_images_are_the_pipelines_with_the_lora_fused(runs):
    s = SETTINGS
    model = load_model(TINY)
    options = dict(num_images=s["num_images"], steps=s["steps"], guidance_scale=s["guidance"], progress=False)
    plain = generate(model, [PROMPTS[1]], s["negative"], seed=s["seed"] + 1, **options)
    add_loras(model, [(runs["lora"], s["scale"])])
    want = generate(model, [PROMPTS[1]], s["negative"], seed=s["seed"] + 1, **options)
    got = [Image.open(p) for p in sorted(runs["out"].glob("00[23]-*.png"))]
    pixels = lambda images: np.stack([np.asarray(im, dtype=np.int16) for im in images])  # noqa: E731
    assert np.abs(pixels(got) - pixels(want)).max() <= 1
    assert np.abs(pixels(got) - pixels(plain)).max() > 10  # the LoRA was applied


def test_dpmpp_2m_karras_image_and_its_metadata(runs):
    code, _, err = runs["results"]["karras"]
    assert code == 0, err
    (png,) = runs["karras"].glob("*/000-*.png")
    assert Image.open(png).text["sampler"] == "dpmpp-2m --karras"
    model, pixels = load_model(TINY), lambda image: np.asarray(image, dtype=np.int16)  # noqa: E731
    want = generate(model, ["a red ball"], sampler=dpmpp_2m_karras, steps=3, progress=False)[0]
    plain = generate(model, ["a red ball"], sampler=SAMPLERS["dpmpp-2m"], steps=3, progress=False)[0]
    assert np.abs(pixels(Image.open(png)) - pixels(want)).max() <= 1
    assert np.abs(pixels(want) - pixels(plain)).max() > 10  # --karras changed the sigmas


def test_help_explains_every_flag(runs):
    code, out, _ = runs["results"]["help"]
    assert code == 0
    for flag in ("--model", "--prompt", "--prompts-file", "--negative-prompt", "--sampler", "--steps", "--guidance",
                 "--seed", "--num-images", "--height", "--width", "--lora", "--out", "--device", "--dtype",
                 "--vae", "--tokenizer", "--variant", "--eta", "--karras", "dpmpp-2m", "FILE[:SCALE]", "tiny"):
        assert flag in out, flag


@pytest.mark.parametrize("case", [
    "missing model", "folder that is not a model", "no prompt", "blank prompt", "height not a multiple of 8",
    "width zero", "unknown sampler", "unknown sampler, older flag", "missing prompts file", "binary prompts file", "prompts file without prompts",
    "missing LoRA", "unfinished run as LoRA", "folder as embedding", "LoRA that does not fit", "LoRA that is no safetensors", "eta without ddim", "karras without dpmpp-2m", "steps zero", "steps too many",
    "not a number",
])
def test_bad_input_is_one_line_and_exit_code_2(runs, case):
    code, _, err = runs["results"][case]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: "), err
    assert runs["expected"][case] in lines[0]


def test_only_user_errors_end_in_one_line():
    """UserError -> one line, exit 2; a full disk or out of memory -> one line, exit 1; Ctrl-C -> 130;
    any other exception (a plain ValueError too: a bug) keeps its traceback."""
    from minidream.cli.script import run_script
    from minidream.errors import UserError

    def raising(error):
        def command():
            raise error
        return command

    ends = {UserError("bad input"): 2, OSError(errno.ENOSPC, "No space left on device", "x.png"): 1,
            RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"): 1, KeyboardInterrupt(): 130,
            OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"): 1}
    for error, code in ends.items():
        assert run_script("sample.py", raising(error), out_of_memory="try less") == code
    for error in (ValueError("a bug"), OSError(errno.EACCES, "Permission denied"), RuntimeError("shape mismatch")):
        with pytest.raises(type(error)):
            run_script("sample.py", raising(error), out_of_memory="try less")
