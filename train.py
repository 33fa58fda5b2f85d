"""DreamBooth training for SDXL: build the settings from the command line, then
minidream.training.train() does the work.

    python train.py --subject data/raj                 # LoRA; bundled tiny model on CPU, or SDXL if in weights/
    python train.py --subject data/me --token zwx --class-noun person
    python train.py --subject data/raj --method full   # every UNet weight -> a diffusers model folder
    python train.py --subject data/raj --method textual-inversion   # a new word "<rraj>" -> a few KB
    python train.py --subject data/raj --method pivotal   # the new word + LoRA, in one run
    python train.py --subject data/raj --dora --ema-decay 0.99   # DoRA layers, an averaged result
    python train.py --resume runs/raj-latest           # continue a stopped run
    torchrun --nproc_per_node 2 train.py --subject data/raj        # 2 GPUs (DistributedDataParallel)

Settings left out are chosen from the model: the T4 recipe for SDXL (1000 steps, lr 1e-4, rank 4,
1024 px, batch 1, fp16, gradient checkpointing, AdamW8bit, prior preservation with 200 class
images), small and fast ones for the bundled tiny model. See README "Train on your own photos".
Each flag below is a field of minidream.config.TrainConfig.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from minidream import formats, more_samplers, training
from minidream.cli.args import config_from_args, resumed_config, train_parser
from minidream.cli.script import run_script
from minidream.formats.archives import unpack_class_images
from minidream.lowmem.tiled_vae import WithTiledVAE
from minidream.methods.registry import method_class
from minidream.parallel import distributed
from minidream.planner.memory import default_plan_model, plan_training
from minidream.planner.report import format_plan
from minidream.planner.recipes import choose_recipe, format_search, search
from minidream.cli.latest_link import link_latest
from minidream.toy.run_score import score_run

OUT_OF_MEMORY = ("see what fits with --plan; try --gradient-checkpointing, --optimizer adamw8bit, "
                 "a smaller --resolution or --batch-size 1")


def build_parser() -> argparse.ArgumentParser:
    """TrainConfig's flags, and --plan."""
    parser = train_parser(description=__doc__)
    parser.add_argument("--plan", action="store_true", default=False,
                        help="print the predicted peak GPU memory of this run on a 16 GB T4 and exit: one training "
                             "step runs on fake tensors, so a model folder with only its config.json files is enough; "
                             "with --gpu-memory GB: every recipe's prediction for that card, and the fastest that fits")
    return parser


def train(argv: list[str] | None) -> None:
    """Parse, then train (on every process torchrun started), or print the memory plan with --plan."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    explicit = set(vars(args))  # the flags given (argparse leaves the others out)
    if args.plan:
        cfg.model = cfg.model or default_plan_model()
        print(format_search(search(cfg, cfg.gpu_memory, explicit)) if cfg.gpu_memory else format_plan(plan_training(cfg)))
        return
    if cfg.resume:  # the run's own settings, with the few a resumed run may change
        cfg = resumed_config(cfg)
    elif cfg.gpu_memory:  # the planner's recipe for the card, every change printed
        print(f"--gpu-memory {cfg.gpu_memory:g}: planning the recipes on fake tensors (a few minutes on a CPU)")
        model = cfg.model or str(formats.default_model_path()[0])
        changes, lines = choose_recipe(replace(cfg, model=model), explicit)
        print("\n".join(lines))
        cfg = replace(cfg, **changes)
    if cfg.class_dir and Path(cfg.class_dir).suffix.lower() == ".zip":  # the core reads folders
        cfg.class_dir = str(unpack_class_images(cfg.class_dir))
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints (errors still do)
        sys.stdout = open(os.devnull, "w")
    dist = distributed.setup(cfg.device)  # one process, or this rank among torchrun's
    try:
        models = WithTiledVAE(formats, cfg.vae_tiling) if cfg.vae_tiling else formats
        run = training.train(cfg, method_class(cfg), dist, models=models,
                             sampler_table=more_samplers.SAMPLERS)
    finally:
        distributed.shutdown()
    if dist.is_main:
        link_latest(run, Path(cfg.subject).name)  # runs/raj-latest -> this run
        if cfg.score:
            score_run(run)  # the toy judge's score line (toy-world subjects only)


def main(argv: list[str] | None = None) -> int:
    """train.py's exit code: 0 done, 1 the machine, 2 the user's input, 130/143 Ctrl-C/SIGTERM."""
    return run_script("train.py", train, argv, out_of_memory=OUT_OF_MEMORY,
                      disk_full=" (a stopped run continues with --resume RUN)")


if __name__ == "__main__":
    sys.exit(main())
