"""Generate images from text with an SDXL model (a diffusers folder or a single .safetensors file),
optionally with LoRA adapters: one PNG per image, its settings in the PNG's text metadata, and a
contact sheet grid.png. The same seed, prompt and settings give the same image as diffusers'
StableDiffusionXLPipeline.

    python sample.py --prompt "a photo of rraj person"                  # bundled tiny model, CPU
    python sample.py --model weights/sdxl-base-1.0 --prompt "a photo of rraj person" \\
        --lora runs/raj/lora.safetensors --lora pixel-art.safetensors:0.8 --num-images 4
    python sample.py --embedding runs/raj/learned_embeds.safetensors --prompt "a photo of <rraj> person"
    python sample.py --prompt "a photo of rraj person" --morph 4 --frames 48 --fps 12   # looping morph.gif

Everything given (arguments, prompt files, model, VAE, tokenizer, LoRA and embedding files) is
checked before the first sampling step.
"""

from __future__ import annotations

import sys

from minidream.cli.args import check_sample_args, sample_parser
from minidream.cli.script import run_script

OUT_OF_MEMORY = "use --dtype fp16, a smaller --height/--width or --num-images 1"


def sample(argv: list[str] | None) -> None:
    """Parse and check the arguments, then (importing torch only now) generate and write."""
    args = sample_parser(description=__doc__).parse_args(argv)
    request = check_sample_args(args)
    from minidream.cli.sample_command import sample_images

    sample_images(args, request)


def main(argv: list[str] | None = None) -> int:
    return run_script("sample.py", sample, argv, out_of_memory=OUT_OF_MEMORY)


if __name__ == "__main__":
    sys.exit(main())
