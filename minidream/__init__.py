"""minidream: DreamBooth + LoRA fine-tuning for Stable Diffusion XL, in plain PyTorch."""

__version__ = "0.1.0"
