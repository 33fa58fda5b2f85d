"""Running big models on small GPUs: the VAE in tiles and slices (tiled_vae.py)."""
