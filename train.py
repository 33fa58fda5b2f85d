"""DreamBooth training for SDXL: the command line around minidream.training.train().

    python train.py --subject data/raj                 # LoRA; bundled tiny model on CPU, or SDXL if in weights/
    python train.py --subject data/me --token zwx --class-noun person
    python train.py --subject data/raj --method full   # every UNet weight -> a diffusers model folder
    python train.py --subject data/raj --method textual-inversion   # a new word "<rraj>" -> a few KB
    python train.py --resume runs/raj-20250101-120000  # continue a stopped run
    torchrun --nproc_per_node 2 train.py --subject data/raj        # 2 GPUs (DistributedDataParallel)

Settings left out are chosen from the model: the T4 recipe for SDXL (1000 steps, lr 1e-4, rank 4,
1024 px, batch 1, fp16, gradient checkpointing, AdamW8bit, prior preservation with 200 class
images), small and fast ones for the bundled tiny model. See README "Train on your own photos".
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from minidream.train_config import METHODS, T4_RECIPE, TINY_RECIPE, TrainConfig

DEFAULTS = TrainConfig()


def recipe(setting: str, show=str) -> str:
    """Help text for a setting whose default comes from the T4 / tiny-model recipe."""
    return f"default: T4 recipe {show(T4_RECIPE[setting])}, tiny model {show(TINY_RECIPE[setting])}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction

    g = p.add_argument_group("subject")
    g.add_argument("--subject", default=DEFAULTS.subject,
                   help="folder of subject photos (+ subject.json) [%(default)s]")
    g.add_argument("--token", help="rare identifier of the subject, e.g. rraj [subject.json]")
    g.add_argument("--class-noun", help="the subject's class, e.g. person, dog [subject.json]")
    g.add_argument("--instance-prompt", help='training prompt of the photos ["a photo of TOKEN CLASS"]')
    g.add_argument("--class-prompt", help='prompt of the class images ["a photo of CLASS"]')

    g = p.add_argument_group("model and output")
    g.add_argument("--model", help="diffusers folder or .safetensors file [SDXL under weights/, else the tiny model]")
    g.add_argument("--vae", help="a separate VAE folder/file, e.g. an fp16-fix VAE")
    g.add_argument("--tokenizer", help="folder with tokenizer/ and tokenizer_2/ (needed for single files)")
    g.add_argument("--out", default=DEFAULTS.out, help="where run folders are made [%(default)s]")
    g.add_argument("--resume", metavar="RUN", help="continue run folder RUN from its latest checkpoint (same "
                   "settings; only --steps, --save-every, --validate-every, --keep-checkpoints, --log-every, "
                   "--device, --cpu-threads may change)")
    g.add_argument("--device", help="cuda, cuda:1, cpu, ... [cuda if available]")
    g.add_argument("--plan", action="store_true",
                   help="print the predicted peak GPU memory of this run on a 16 GB T4 and exit: one training step "
                   "runs on fake tensors, so a model folder with only its config.json files is enough")
    g.add_argument("--cpu-threads", type=int, help="torch CPU threads [torch's default; tiny model: 1, faster "
                   "for its tiny tensors]")

    g = p.add_argument_group("training")
    g.add_argument("--method", choices=METHODS, default=DEFAULTS.method,
                   help="what trains: LoRA adapters (SDXL rank 4: a 23 MB file), every UNet weight (a model folder; SD 1.x/2.x on "
                   "a T4, SDXL needs more than 16 GB) or a new word's embedding (a few KB) [%(default)s]")
    g.add_argument("--steps", type=int, help=recipe("steps") + " (optimizer steps; full: 800, "
                   "textual inversion: 1500 on a T4)")
    g.add_argument("--lr", type=float, help="learning rate; " + recipe("lr", "{:g}".format)
                   + "; full: 2e-6 (tiny 1e-4); textual inversion: 5e-4 (tiny 5e-3)")
    g.add_argument("--rank", type=int, default=DEFAULTS.rank, help="LoRA rank [%(default)s]")
    g.add_argument("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha/rank [= rank]")
    g.add_argument("--lora-targets", default=DEFAULTS.lora_targets,
                   help="UNet layers that get LoRA, comma-separated groups: attn (to_q/k/v/out, as diffusers' "
                   "DreamBooth script), ff (feed-forward), proj (proj_in/out), conv (ResNet and resampling convs, "
                   "kohya's LoCon) [%(default)s]")
    g.add_argument("--resolution", type=int, help="training image side in px [the model's: SDXL 1024]")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="subject images per step, plus as many class images [%(default)s]")
    g.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum,
                   help="micro-batches accumulated per optimizer step [%(default)s]")
    g.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=DEFAULTS.precision,
                   help="frozen weights and autocast dtype; fp16 uses loss scaling; without CUDA fp16 "
                   "falls back to fp32 [%(default)s]")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seeds LoRA init, crops, data order, noise, class images [%(default)s]")
    g.add_argument("--gradient-checkpointing", action=flag, default=None,
                   help="recompute activations in backward to save memory; " + recipe("gradient_checkpointing", lambda v: "on" if v else "off"))
    g.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default=DEFAULTS.optimizer,
                   help="bitsandbytes 8-bit AdamW, or torch AdamW (also used, with a warning, when bitsandbytes "
                   "cannot run) [%(default)s]")
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay [%(default)s]")
    g.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm,
                   help="clip the gradient norm to this; 0 = no clipping [%(default)s]")
    g.add_argument("--lr-schedule", choices=("constant", "constant_with_warmup", "cosine"),
                   default=DEFAULTS.lr_schedule, help="[%(default)s]")
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps,
                   help="linear warmup steps for constant_with_warmup / cosine [%(default)s]")
    g.add_argument("--snr-gamma", type=float, help="min-SNR loss weighting with this gamma (5.0 is usual) [off]")
    g.add_argument("--noise-offset", type=float, default=DEFAULTS.noise_offset,
                   help="offset noise strength, helps very dark/bright images (try 0.05) [%(default)s]")
    g.add_argument("--flip", action=flag, default=DEFAULTS.flip,
                   help="random horizontal flips (--no-flip for asymmetric subjects, e.g. text) [on]")
    g.add_argument("--center-crop", action="store_true", help="centre crops instead of random crops")
    g.add_argument("--views-per-image", type=int, default=DEFAULTS.views_per_image,
                   help="augmented crops/flips cached per subject photo [%(default)s]")
    g.add_argument("--train-text-encoder", action="store_true",
                   help="train both text encoders too: LoRA on them, or with --method full all their weights "
                   "(more memory; prompts are then encoded every step)")
    g.add_argument("--text-encoder-lr", type=float, default=DEFAULTS.text_encoder_lr,
                   help="learning rate of the text-encoder LoRA [%(default)s]")

    g = p.add_argument_group("textual inversion (--method textual-inversion)")
    g.add_argument("--placeholder-token", help="the new word [<TOKEN>, e.g. <rraj>]; prompts' TOKEN becomes it")
    g.add_argument("--init-word", help="the new word starts as this word's embedding [the class noun]")
    g.add_argument("--num-vectors", type=int, default=DEFAULTS.num_vectors,
                   help="embedding vectors per text encoder for the new word [%(default)s]")

    g = p.add_argument_group("prior preservation")
    g.add_argument("--no-prior", dest="prior", action="store_false", help="train without class images")
    g.add_argument("--prior-weight", type=float, default=DEFAULTS.prior_weight,
                   help="weight of the class-image loss term [%(default)s]")
    g.add_argument("--class-dir", help="folder or .zip of class images; missing ones are generated into it "
                   "[OUT/class-images/MODEL/PROMPT-RESpx]")
    g.add_argument("--num-class-images", type=int, help="class images to use; " + recipe("num_class_images"))
    g.add_argument("--no-generate", dest="generate_class_images", action="store_false",
                   help="never generate class images: error if the class folder holds too few")
    g.add_argument("--class-steps", type=int, help="sampler steps per generated class image; " + recipe("class_steps"))
    g.add_argument("--guidance-scale", type=float, default=DEFAULTS.guidance_scale,
                   help="classifier-free guidance for class and validation images [%(default)s]")

    g = p.add_argument_group("validation, checkpoints, logs")
    g.add_argument("--validate-every", type=int, help="steps between validation grids, 0 = never; "
                   + recipe("validate_every"))
    g.add_argument("--validation-prompt", dest="validation_prompts", action="append",
                   help="a validation prompt (repeat the flag for more) [subject.json's, else the seed's five + "
                   "the class prompt]")
    g.add_argument("--validation-seeds", type=int, nargs="+", default=list(DEFAULTS.validation_seeds),
                   help="one grid column per seed [%(default)s]")
    g.add_argument("--validation-steps", type=int, help="sampler steps of validation images; " + recipe("validation_steps"))
    g.add_argument("--save-every", type=int, help="steps between checkpoints, 0 = only at the end; "
                   + recipe("save_every"))
    g.add_argument("--keep-checkpoints", type=int, default=DEFAULTS.keep_checkpoints,
                   help="newest checkpoints kept, 0 = all [%(default)s]")
    g.add_argument("--log-every", type=int, default=DEFAULTS.log_every, help="steps between log lines [%(default)s]")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in vars(args).items() if k != "plan"})


def plan(cfg: TrainConfig) -> None:
    """--plan: the T4 memory planner (minidream/memory.py) instead of training."""
    from minidream.memory import default_plan_model, format_plan, plan_training

    cfg.model = cfg.model or default_plan_model()
    print(format_plan(plan_training(cfg)))


def short_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # one line for users, not the source location


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = short_warning
    from minidream import distributed
    from minidream.checkpoint import CheckpointError
    from minidream.data import DataError
    from minidream.lora import LoRAMismatchError
    from minidream.text import TokenizerNotFoundError
    from minidream.textual_inversion import EmbeddingFileError
    from minidream.train_config import TrainingError
    from minidream.training import train

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        if args.plan:
            plan(config_from_args(args))
            return 0
        train(config_from_args(args))
    except (DataError, TrainingError, CheckpointError, TokenizerNotFoundError, LoRAMismatchError,
            EmbeddingFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: disk full while writing {e.filename or 'a file'}; free some space and run again "
                  "(a stopped run continues with --resume RUN)", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
