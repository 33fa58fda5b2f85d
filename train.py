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
Each flag below is a field of minidream.config.TrainConfig.
"""

from __future__ import annotations

import argparse
import os
import sys

from minidream.cli.args import config_from_args, train_parser
from minidream.cli.script import run_script

OUT_OF_MEMORY = ("see what fits with --plan; try --gradient-checkpointing, --optimizer adamw8bit, "
                 "a smaller --resolution or --batch-size 1")


def build_parser() -> argparse.ArgumentParser:
    """TrainConfig's flags, and --plan."""
    parser = train_parser(description=__doc__)
    parser.add_argument("--plan", action="store_true", default=False,
                        help="print the predicted peak GPU memory of this run on a 16 GB T4 and exit: one training "
                             "step runs on fake tensors, so a model folder with only its config.json files is enough")
    return parser


def train(argv: list[str] | None) -> None:
    """Parse, then train (on every process torchrun started), or print the memory plan with --plan."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.plan:
        from minidream.planner.memory import default_plan_model, format_plan, plan_training

        cfg.model = cfg.model or default_plan_model()
        print(format_plan(plan_training(cfg)))
        return
    from minidream.cli.run_training import run_training

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    run_training(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_script("train.py", lambda: train(argv), out_of_memory=OUT_OF_MEMORY,
                      disk_full=" (a stopped run continues with --resume RUN)")


if __name__ == "__main__":
    sys.exit(main())
