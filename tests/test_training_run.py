"""minidream.training end to end on a tiny random SDXL-shaped model (CPU, seconds): the run folder,
Ctrl-C and exact resume, a full disk, text-encoder LoRA, class images, the command line."""

import csv
import errno
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import minidream.training as training
from minidream import formats, more_samplers
from minidream.toy.tiny import write_tiny_sdxl
from minidream.data import DataError
from minidream.formats.lora_stack import stack_layers
from minidream.formats.lora_files import load_lora
from minidream.formats.models import load_model
from minidream.lora import LoRALayer
from minidream.optim import make_optimizer
from minidream.pipeline import NonFiniteError, generate
from minidream.prior import CPU_CLASS_BATCH, class_batch_size, fill_class_folder, plan_class_images
from minidream.drawing import MIN_TILE, labelled_grid
from minidream.progress import MAX_SKIPPED_IN_A_ROW
from minidream.runs import Stopped
from minidream.config import LORA_FILE, PRESETS, TrainConfig, TrainingError, fill_defaults
from minidream.formats.models import model_image_size
from minidream.cli.args import resumed_config

ROOT = Path(__file__).resolve().parent.parent


def train(cfg):
    """training.train reading models as train.py has it read them (minidream.formats)."""
    return training.train(cfg, models=formats)

sys.path.insert(0, str(ROOT))
import train as train_cli  # noqa: E402  (the CLI script at the repo root)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a subject folder (3 photos of different sizes) and a shared class folder."""
    root = tmp_path_factory.mktemp("world")
    model = write_tiny_sdxl(root / "tiny-sdxl")
    subject = root / "raj"
    subject.mkdir()
    (subject / "subject.json").write_text(json.dumps({"token": "rraj", "class_noun": "person"}))
    for i, size in enumerate([(72, 66), (96, 70), (66, 80)]):
        img = Image.new("RGB", size, (40 * i, 120, 200 - 50 * i))
        img.paste((250, 20, 180), (8, 8, 24, 24))
        img.save(subject / f"{i}.png")
    return {"model": str(model), "subject": str(subject), "class_dir": str(root / "class-images"),
            "size": model_image_size(model)}


def config(world, out, **overrides) -> TrainConfig:
    settings = dict(subject=world["subject"], model=world["model"], out=str(out), class_dir=world["class_dir"],
                    steps=6, num_class_images=2, validate_every=0, save_every=2, keep_checkpoints=0, log_every=1,
                    class_steps=4, validation_steps=3, views_per_image=2)
    return TrainConfig(**(settings | overrides))


def losses(run: Path) -> list[tuple[str, ...]]:
    with open(run / "loss.csv") as f:
        return [(r["step"], r["loss"], r["instance_loss"], r["prior_loss"], r["lr"]) for r in csv.DictReader(f)]


def test_a_run_writes_its_folder(world, tmp_path, capsys):
    run = train(config(world, tmp_path, steps=4, validate_every=2, keep_checkpoints=1))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"model: {world['model']}"
    size = world["size"]
    assert any(line.startswith(f"tiny model ({size} px): demo settings") for line in printed)

    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 4 and saved["resolution"] == size and saved["lr"] == PRESETS["tiny", "lora"]["lr"]
    assert [r[0] for r in losses(run)] == ["1", "2", "3", "4"]
    assert all(float(r[3]) > 0 for r in losses(run))  # the prior term is there
    assert Image.open(run / "loss.png").size == (720, 400)
    assert sorted(p.name for p in (run / "validation").iterdir()) == [f"step-00000{i}.png" for i in (0, 2, 4)]
    grid = Image.open(run / "validation" / "step-000004.png")
    tile = size * -(-MIN_TILE // size)  # small pictures are enlarged by a whole factor
    # 6 rows (5 edits of the instance prompt + the class prompt) x 2 seeds, a label column on the left
    # and a row of seed labels on top
    assert 6 * tile < grid.height < 6 * tile + 40 and 2 * tile < grid.width < 2 * tile + 4 * tile
    assert "a photo of person" in grid.text["prompts"]
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["step-000004.pt"]  # keep_checkpoints=1
    assert not list(run.rglob(".*.tmp"))

    # the LoRA file loads onto a fresh copy of the base model and changes its UNet
    lora = run / LORA_FILE
    assert all(k.startswith("unet.") for k in load_file(lora))
    model = load_model(world["model"])
    load_lora(lora, unet=model.unet)
    trained = [layer.lora_B[n].weight for _, layer in stack_layers(model.unet) for n in layer.lora_B]
    assert trained and any(b.abs().max() > 0 for b in trained)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_then_resume_reproduces_the_uninterrupted_losses(world, tmp_path, monkeypatch, signum):
    """Ctrl-C (SIGINT) or SIGTERM (timeout, docker stop, SLURM) during a step: the step finishes, a
    checkpoint is written, and the resumed run continues bit for bit."""
    kwargs = dict(noise_offset=0.1, snr_gamma=5.0, grad_accum=2, lr_schedule="cosine", warmup_steps=2)
    uninterrupted = losses(train(config(world, tmp_path / "a", **kwargs)))

    calls = {"n": 0}
    real_apply = training.apply_gradients

    def apply_then_signal(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signum)  # as if the user pressed Ctrl-C, or a scheduler sent SIGTERM, in step 3
        return real_apply(*args, **kw)

    monkeypatch.setattr(training, "apply_gradients", apply_then_signal)
    handlers_before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]  # SIG_IGN under nohup
    with pytest.raises(Stopped) as stopped:  # after saving the checkpoint, as an unhandled signal would
        train(config(world, tmp_path / "b", **kwargs))
    assert stopped.value.signum == signum and isinstance(stopped.value, KeyboardInterrupt)
    monkeypatch.setattr(training, "apply_gradients", real_apply)
    (run,) = (tmp_path / "b").glob("raj-*")
    assert len(losses(run)) == 3 and (run / "checkpoints" / "step-000003.pt").is_file()
    assert not (run / LORA_FILE).exists()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers_before  # the caller's

    leftover = run / "checkpoints" / ".step-000004.pt.4242.tmp"  # a checkpoint write killed half-way (SIGKILL)
    leftover.write_bytes(b"half a checkpoint")
    train(resumed_config(TrainConfig(resume=str(run))))
    assert losses(run) == uninterrupted  # bit for bit, as written to the CSV
    assert not leftover.exists()  # removed at the start of the resumed run, never read as a checkpoint
    assert (run / LORA_FILE).is_file()

    # resuming from an older mid-run checkpoint (step 2) gives the same numbers too
    older = tmp_path / "c"
    shutil.copytree(run, older)
    for late in ("step-000003", "step-000004", "step-000006"):
        (older / "checkpoints" / f"{late}.pt").unlink(missing_ok=True)
    train(resumed_config(TrainConfig(resume=str(older))))
    assert losses(older) == uninterrupted


def test_resume_through_the_latest_link_a_relative_path_and_a_trailing_slash(world, tmp_path, monkeypatch,
                                                                             capsys):
    """runs/raj-latest is a link to the newest finished run: resuming through it (or through any other
    spelling of the run's path) continues that run, and the link then still points at the run folder."""
    monkeypatch.chdir(tmp_path)
    base = ["--subject", world["subject"], "--model", world["model"], "--class-dir", world["class_dir"],
            "--num-class-images", "2", "--class-steps", "2", "--validate-every", "0", "--views-per-image", "1",
            "--no-score"]
    assert train_cli.main(base + ["--out", "runs", "--steps", "2", "--save-every", "2"]) == 0
    (run,) = Path("runs").glob("raj-2*")
    latest = Path("runs") / "raj-latest"
    for steps, spelling in [(3, "runs/raj-latest"), (4, "runs/raj-latest/"), (5, f"./runs/{run.name}/"),
                            (6, str(latest.absolute()))]:
        assert train_cli.main(["--resume", spelling, "--steps", str(steps)]) == 0, capsys.readouterr().err
        assert latest.is_symlink() and latest.readlink() == Path(run.name), latest.readlink()
        assert losses(run)[-1][0] == str(steps)
    assert sorted(p.name for p in Path("runs").iterdir()) == [run.name, "raj-latest"]  # no new run folder


@pytest.mark.parametrize("kind", ["looping", "broken", "missing"])
def test_resume_through_a_broken_or_looping_link_is_one_line_naming_the_runs(world, tmp_path, capsys, kind):
    runs = tmp_path / "runs"
    real = runs / "raj-20260101-120000"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    link = runs / "raj-latest"
    if kind == "looping":
        link.symlink_to("raj-latest")
    elif kind == "broken":
        link.symlink_to("raj-20250101-000000")
    assert train_cli.main(["--resume", str(link), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    why = "nothing there" if kind == "missing" else "a broken or looping link"
    assert err == f"train.py: error: --resume {link} is not a run folder ({why}); run folders there: {real}\n"


def test_validation_samples_in_eval_mode_and_training_goes_on_in_train_mode(world, tmp_path, monkeypatch):
    """With --lora-dropout the validation pictures must not be drawn with dropout on."""
    seen = []
    real_generate = training.generate

    def generate_and_record(model, *args, **kwargs):
        seen.append(model.unet.training)
        return real_generate(model, *args, **kwargs)

    modes = []
    real_step = training.training_step

    def step_and_record(unet, *args, **kwargs):
        modes.append(unet.training)
        return real_step(unet, *args, **kwargs)

    monkeypatch.setattr(training, "generate", generate_and_record)
    monkeypatch.setattr(training, "training_step", step_and_record)
    train(config(world, tmp_path, steps=2, validate_every=1, lora_dropout=0.5, prior=False))
    assert seen and not any(seen)  # every validation image from the model in eval mode
    assert modes == [True, True]  # and training resumed in train mode after each grid


def test_a_base_model_with_nan_weights_stops_the_run_and_writes_nothing_non_finite(world, tmp_path):
    broken = tmp_path / "nan-model"
    shutil.copytree(world["model"], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors = {k: torch.full_like(v, float("nan")) if k.startswith("conv_in.") else v for k, v in tensors.items()}
    save_file(tensors, str(weights))
    with pytest.raises(NonFiniteError, match="latents hold inf/NaN"):  # sampling: an error, not black images
        generate(load_model(broken), "a photo", steps=2, progress=False)
    with pytest.raises(TrainingError, match=f"the last {MAX_SKIPPED_IN_A_ROW} steps had inf/NaN gradients"):
        train(config(world, tmp_path / "runs", model=str(broken), prior=False, steps=40, save_every=10))
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / LORA_FILE).exists()
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000010.pt", "step-000010.safetensors", "step-000020.pt",
                                             "step-000020.safetensors"]
    for path in checkpoints:
        trained = torch.load(path, weights_only=True)["trained"] if path.suffix == ".pt" else {"": load_file(path)}
        assert all(t.isfinite().all() for tensors in trained.values() for t in tensors.values())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def save_until_disk_full(obj, f, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half a file, then ENOSPC
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(TrainingError, match="step-4 checkpoint.*No space left.*intact.*--resume"):
        train(config(world, tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("raj-"))
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["step-000002.pt"]
    assert torch.load(run / "checkpoints" / "step-000002.pt", weights_only=True)["step"] == 2
    assert not list(run.rglob(".*.tmp"))  # no half-written file left behind


def test_text_encoder_lora_trains_and_is_saved(world, tmp_path):
    run = train(config(world, tmp_path, steps=2, prior=False, train_text_encoder=True, text_encoder_lr=1e-3))
    keys = load_file(run / LORA_FILE)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        ups = [v for k, v in keys.items() if k.startswith(component + ".") and ".lora_B." in k]
        assert ups and any(v.abs().max() > 0 for v in ups), component
    assert all(r[3] == "0.0" for r in losses(run))  # no prior term


def test_compile_compiles_the_unet_in_place_after_the_adapters(world, tmp_path, monkeypatch):
    """--compile calls nn.Module.compile on the UNet once its LoRA layers exist (torch.compile made
    an identity here: inductor's own numbers are benchmarks/compile_step.py's); the run and its file
    are those of an eager run."""
    compiled = []

    def record(fn, *args, **kwargs):
        compiled.append(fn.__self__)
        assert any(isinstance(m, LoRALayer) for m in fn.__self__.modules())
        return fn

    monkeypatch.setattr(torch, "compile", record)
    eager = train(config(world, tmp_path / "eager", steps=2, prior=False))
    assert compiled == []
    run = train(config(world, tmp_path / "compiled", steps=2, prior=False, compile=True))
    assert len(compiled) == 1 and compiled[0].__class__.__name__ == "UNet"
    want, got = load_file(eager / LORA_FILE), load_file(run / LORA_FILE)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_lora_targets_choose_the_unet_layers_and_the_file_loads_back(world, tmp_path):
    run = train(config(world, tmp_path, steps=2, prior=False, validate_every=0, lora_targets="attn,ff,conv"))
    keys = load_file(run / LORA_FILE)
    for layer in ("to_q", "ff.net.2", "conv1"):
        assert any(f".{layer}.lora_B." in k for k in keys), layer
    assert not any(".proj_in.lora_" in k for k in keys)  # proj was not asked for
    model = load_model(world["model"])
    load_lora(run / LORA_FILE, unet=model.unet)  # conv and feed-forward adapters load back into a fresh UNet
    assert any(name.endswith("conv1") for name, _ in stack_layers(model.unet))


def test_unknown_lora_target_group_is_a_clear_error(world, tmp_path):
    with pytest.raises(TrainingError, match="--lora-targets: unknown group.*'mlp'.*attn, ff, proj, conv"):
        train(config(world, tmp_path / "runs", lora_targets="attn,mlp"))
    assert not (tmp_path / "runs").exists()


def test_too_few_class_images_and_no_generation_fail_before_training(world, tmp_path):
    class_dir = tmp_path / "few"
    class_dir.mkdir()
    Image.new("RGB", (64, 64)).save(class_dir / "a.png")
    cfg = config(world, tmp_path / "runs", class_dir=str(class_dir), num_class_images=5, generate_class_images=False)
    with pytest.raises(DataError, match="holds 1 class image.*5 are needed.*--no-generate"):
        train(cfg)
    assert not (tmp_path / "runs").exists()  # failed before a run folder (or the model) was made


def test_class_generation_fills_a_partial_folder_and_keeps_existing_images(world, tmp_path):
    folder = tmp_path / "classes"
    folder.mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "mine.jpg")
    (folder / "notes.txt").write_text("not an image")
    mine = (folder / "mine.jpg").read_bytes()
    model = load_model(world["model"])
    used = fill_class_folder(plan_class_images(folder, 4, True), model, "a photo of person",
                             resolution=world["size"], steps=3, progress=False)
    assert [p.name for p in used] == ["class-00000.png", "class-00001.png", "class-00002.png", "mine.jpg"]
    assert (folder / "mine.jpg").read_bytes() == mine

    # an interrupted generation continues, and image N is the same image whenever it is made
    second = (folder / "class-00001.png").read_bytes()
    (folder / "class-00001.png").unlink()
    used = fill_class_folder(plan_class_images(folder, 4, True), model, "a photo of person",
                             resolution=world["size"], steps=3, progress=False)
    assert len(used) == 4 and (folder / "class-00001.png").read_bytes() == second
    assert plan_class_images(folder, 3, False).used() == used[:3]  # enough: nothing to generate


def test_class_images_in_batches_are_the_images_made_one_at_a_time(world, tmp_path):
    """Image NNNNN's x_T comes from its own seed, so the batch size does not change it (up to the
    float rounding of a larger matmul), and a batch size that does not divide the count is fine."""
    model = load_model(world["model"])
    folders = {b: tmp_path / f"batch-{b}" for b in (1, 3)}
    for b, folder in folders.items():
        folder.mkdir()
        fill_class_folder(plan_class_images(folder, 5, True), model, "a photo of person",
                          resolution=world["size"], steps=3, batch=b, progress=False)
    for i in range(5):
        one, three = (np.asarray(Image.open(f / f"class-{i:05d}.png"), dtype=np.int16) for f in folders.values())
        assert np.abs(one - three).max() <= 1
    alone = generate(model, ["a photo of person"], seed=7, steps=3, progress=False)[0]
    batched = generate(model, ["a photo of person"], seed=[3, 7], num_images=2, steps=3, progress=False)[1]
    assert np.abs(np.asarray(alone, dtype=np.int16) - np.asarray(batched, dtype=np.int16)).max() <= 1


def test_class_batch_size_on_a_cpu_is_the_measured_constant(world):
    assert class_batch_size(load_model(world["model"])) == CPU_CLASS_BATCH >= 1


def test_the_sampler_setting_draws_class_images_and_names_the_choices(world, tmp_path):
    cfg = TrainConfig(subject=world["subject"], model=world["model"], out=str(tmp_path), steps=1,
                      num_class_images=2, class_dir=str(tmp_path / "classes"), class_steps=2,
                      validate_every=0, score=False, sampler="dpmpp-2m")
    with pytest.raises(TrainingError, match="--sampler: one of ddim, pndm, not 'dpmpp-2m'"):
        train(cfg)
    training.train(cfg, models=formats, sampler_table=more_samplers.SAMPLERS)
    metadata = Image.open(tmp_path / "classes" / "class-00001.png").text
    assert metadata["sampler"] == "dpmpp_2m" and metadata["steps"] == "2"


def test_tiny_and_t4_defaults():
    cfg = TrainConfig()
    assert "tiny model (64 px)" in fill_defaults(cfg, 64)
    assert (cfg.resolution, cfg.steps, cfg.num_class_images) == (64, 1200, 40)
    cfg = TrainConfig(steps=50)
    assert fill_defaults(cfg, 1024) == ""
    assert (cfg.resolution, cfg.steps, cfg.lr, cfg.num_class_images) == (1024, 50, 1e-4, 200)
    assert cfg.gradient_checkpointing is True
    assert (cfg.rank, cfg.batch_size, cfg.precision, cfg.optimizer, cfg.prior) == (4, 1, "fp16", "adamw8bit", True)


def test_optimizer_falls_back_to_torch_adamw_when_bitsandbytes_cannot_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="AdamW8bit cannot run here.*torch.optim.AdamW"):
        optimizer, name = make_optimizer([{"params": [p]}], "adamw8bit", lr=1e-3)
    assert name == "adamw" and isinstance(optimizer, torch.optim.AdamW)


def test_cli_help_names_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for field in TrainConfig.__dataclass_fields__:
        flag = {"prior": "--no-prior", "generate_class_images": "--no-generate",
                "validation_prompts": "--validation-prompt"}.get(field, "--" + field.replace("_", "-"))
        assert flag in text, flag
    assert "[preset: SDXL 200, tiny 40]" in text  # --num-class-images, from PRESETS
    args = train_cli.build_parser().parse_args(["--no-prior", "--no-flip", "--validation-prompt", "x", "--no-generate",
                                                "--validation-seeds", "3", "4", "--lr", "1e-3"])
    cfg = train_cli.config_from_args(args)
    assert (cfg.prior, cfg.flip, cfg.validation_prompts, cfg.generate_class_images) == (False, False, ["x"], False)
    assert (cfg.validation_seeds, cfg.lr, cfg.steps, cfg.rank) == ([3, 4], 1e-3, None, 4)  # unset: TrainConfig's


@pytest.mark.parametrize("argv, message", [
    (["--subject", "/no/such/folder"], "subject folder /no/such/folder does not exist"),
    (["--model", "/no/such/model"], "model /no/such/model does not exist"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "-1"], "learning rates must be in (0, 1]"),
    (["--lr", "inf"], "learning rates must be in (0, 1]"),
    (["--lr", "nan"], "learning rates must be in (0, 1]"),
    (["--lr", "1e6"], "learning rates must be in (0, 1]"),
    (["--seed", "99999999999999999999999"], "seeds must be in 0 .. 2**63 - 1"),
    (["--validation-seeds", *["1"] * 17], "give 1 to 16 seeds"),
    (["--resume", "/no/such/run"], "is not a run folder"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--resume", str(Path(__file__))], "is not a run folder"),  # a file where a folder is expected
    (["--out", str(Path(__file__))], "is a file: give the folder where run folders are made"),
    (["--class-dir", str(Path(__file__))], "is a file: give a folder of class images"),
])
def test_cli_user_errors_are_one_line(world, tmp_path, capsys, argv, message):
    base = ["--subject", world["subject"], "--model", world["model"], "--out", str(tmp_path)]
    assert train_cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_validation_grid_enlarges_small_pictures_without_blurring():
    tile = Image.new("RGB", (64, 64), "white")
    tile.putpixel((0, 0), (255, 0, 0))
    grid = labelled_grid([tile, tile], ["a photo of rraj person"])
    factor = MIN_TILE // 64
    assert grid.height == 64 * factor
    left = grid.width - 2 * 64 * factor  # the label column
    assert grid.getpixel((left + factor - 1, factor - 1)) == (255, 0, 0)  # one source pixel -> factor x factor block
    assert grid.getpixel((left + factor, factor)) == (255, 255, 255)
