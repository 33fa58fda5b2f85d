"""minidream: DreamBooth + LoRA fine-tuning for Stable Diffusion XL, in plain PyTorch.

One concept per module; read ../DESIGN notes in README.md for the data flow.
"""

__version__ = "0.1.0"
