"""The denoising UNet of Stable Diffusion: SD 1.x, SD 2.x and SDXL from one config (unet_config.py).

Latent diffusion (Rombach et al. 2022, sec. 3.3): a convolutional UNet over the VAE latent whose
resnets take the timestep embedding and whose spatial transformers cross-attend to the text tokens.
SDXL (Podell et al. 2023, sec. 2.1-2.2) changes only numbers and adds the pooled text embedding and
six size/crop "micro-conditioning" ids to the timestep embedding. Reads bottom-up; state-dict keys
and shapes equal diffusers' UNet2DConditionModel's, so its checkpoints load strictly."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidream.layers import (Attention, Downsample, ResnetBlock, Upsample, maybe_checkpoint,
                              timestep_embedding)
from minidream.unet_config import DOWN_TYPES, UP_TYPES, UNetConfig


class GEGLU(nn.Module):
    """value * GELU(gate), both halves from one Linear (Shazeer 2020, "GLU Variants", eq. 6)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden_dim)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, hidden) each
        # Multiply into GELU's fresh output instead of allocating a third (B, L, hidden) tensor.
        # Safe under autograd: GELU's backward needs its input (gate), not its output.
        return F.gelu(gate).mul_(value)


class FeedForward(nn.Module):
    """The transformer MLP: GEGLU to mult*dim, then Linear back to dim."""

    def __init__(self, dim, mult):
        super().__init__()
        # Index 1 held a dropout in the original; the Identity keeps the output layer at `net.2`.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block, each sub-layer x + f(LayerNorm(x)): self-attention, cross-attention to the
    text (queries from the image, keys/values from the text: Rombach et al. 2022 sec. 3.3), MLP."""

    gradient_checkpointing = False  # see maybe_checkpoint

    def __init__(self, dim, heads, context_dim, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(dim, cfg.ff_mult)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, `depth` TransformerBlocks over the H*W positions, proj_out, residual."""

    def __init__(self, channels, heads, depth, cfg):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.transformer_norm_eps)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, kernel_size=1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(channels, heads, cfg.cross_attention_dim, cfg) for _ in range(depth)])
        self.proj_out = proj(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        tokens = lambda t: t.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, H*W, C)
        image = lambda t: t.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, H*W, C) -> (B, C, H, W)
        h = self.norm(x)
        h = self.proj_in(tokens(h)) if self.linear else tokens(self.proj_in(h))  # Linear/1x1 conv
        for block in self.transformer_blocks:
            h = maybe_checkpoint(block, h, context)
        h = image(self.proj_out(h)) if self.linear else self.proj_out(image(h))
        # x first: the sum takes x's contiguous (B, C, H, W) layout, no extra copy needed.
        return x + h


def _resnets(in_chs, out_ch, temb_ch, cfg):  # a ResnetBlock per entry of in_chs, to out_ch
    return nn.ModuleList([ResnetBlock(i, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps)
                          for i in in_chs])


def _transformers(n, ch, heads, depth, cfg):  # n = 0 at levels without attention: no keys
    return nn.ModuleList([SpatialTransformer(ch, heads, depth, cfg) for _ in range(n)])


class DownLevel(nn.Module):
    """One encoder level: `num_layers` x (resnet [+ spatial transformer]), then a stride-2 conv.
    Returns the features and every intermediate output: the skips the decoder concatenates back."""

    def __init__(self, in_ch, out_ch, temb_ch, num_layers, attn, heads, depth, down, cfg):
        super().__init__()
        self.resnets = _resnets([in_ch] + [out_ch] * (num_layers - 1), out_ch, temb_ch, cfg)
        self.attentions = _transformers(num_layers * attn, out_ch, heads, depth, cfg)
        pad = cfg.downsample_padding
        self.downsamplers = nn.ModuleList([Downsample(out_ch, pad)]) if down else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = maybe_checkpoint(resnet, x, temb)
            x = self.attentions[i](x, context) if self.attentions else x
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck at the lowest resolution: resnet, spatial transformer, resnet."""

    def __init__(self, ch, temb_ch, heads, depth, cfg):
        super().__init__()
        self.resnets = _resnets([ch, ch], ch, temb_ch, cfg)
        self.attentions = _transformers(1, ch, heads, depth, cfg)

    def forward(self, x, temb, context):
        x = maybe_checkpoint(self.resnets[0], x, temb)
        x = self.attentions[0](x, context)
        return maybe_checkpoint(self.resnets[1], x, temb)


class UpLevel(nn.Module):
    """One decoder level: `num_layers` x (concat a skip, resnet [+ spatial transformer]), 2x up."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, num_layers, attn, heads, depth, up, cfg):
        super().__init__()
        x_chs = [prev_ch] + [out_ch] * (num_layers - 1)  # from the deeper level, then this level's
        skip_chs = [out_ch] * (num_layers - 1) + [in_ch]  # the last: output of the level below
        self.resnets = _resnets([x + s for x, s in zip(x_chs, skip_chs)], out_ch, temb_ch, cfg)
        self.attentions = _transformers(num_layers * attn, out_ch, heads, depth, cfg)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if up else None

    def forward(self, x, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = maybe_checkpoint(resnet, x, temb)
            x = self.attentions[i](x, context) if self.attentions else x
        if self.upsamplers is not None:
            # Upsample to the size of the next skip, which also covers odd latent sizes.
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x


class EmbeddingMLP(nn.Module):
    """Linear -> SiLU -> Linear: lifts a sinusoidal embedding to the time-embedding width."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------
# The model


class UNet(nn.Module):
    """eps_theta(x_t, t, text): the noise in latent x_t (or v, as the checkpoint was trained).

    forward(x (B, in_channels, H, W), t (int, float, 0-d or (B,) tensor),
            context (B, L, cross_attention_dim), SDXL only: pooled (B, P), time_ids (B, 6) =
            (orig size, crop corner, target size)) -> (B, out_channels, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        layers, depths, heads = cfg.per_level()
        temb_ch = cfg.time_embed_mult * ch[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = EmbeddingMLP(ch[0], temb_ch)
        text_time = cfg.addition_embed_type == "text_time"
        add_dim = cfg.projection_class_embeddings_input_dim
        self.add_embedding = EmbeddingMLP(add_dim, temb_ch) if text_time else None

        self.down_blocks = nn.ModuleList([
            DownLevel(ch[max(i - 1, 0)], ch[i], temb_ch, layers[i], DOWN_TYPES[kind], heads[i],
                      depths[i], down=i < n - 1, cfg=cfg)
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], temb_ch, heads[-1], depths[-1], cfg)
        self.up_blocks = nn.ModuleList([  # from the deepest level back to the first
            UpLevel(ch[max(lv - 1, 0)], ch[min(lv + 1, n - 1)], ch[lv], temb_ch, layers[lv] + 1,
                    UP_TYPES[kind], heads[lv], depths[lv], up=lv > 0, cfg=cfg)
            for lv, kind in zip(reversed(range(n)), cfg.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, kernel_size=3, padding=1)

    def enable_gradient_checkpointing(self, on=True):
        """Recompute each resnet and transformer block's activations in backward, not store them."""
        for module in self.modules():
            if isinstance(module, (ResnetBlock, TransformerBlock)):
                module.gradient_checkpointing = on

    def _sinusoid(self, t, dim):
        return timestep_embedding(t, dim, self.config.flip_sin_to_cos, self.config.freq_shift)

    def _micro_conditioning(self, pooled, time_ids, batch, dtype):
        """SDXL micro-conditioning (Podell et al. 2023 sec. 2.2): pooled text, a sinusoid per id."""
        if pooled is None or time_ids is None:
            raise ValueError("UNet: an SDXL UNet needs pooled (B, P) and time_ids (B, 6) = "
                             "(orig_h, orig_w, crop_top, crop_left, target_h, target_w)")
        id_dim = self.config.addition_time_embed_dim
        width = pooled.shape[-1] + time_ids.shape[-1] * id_dim
        dim = self.config.projection_class_embeddings_input_dim
        if pooled.shape[0] != batch or time_ids.shape[0] != batch or width != dim:
            raise ValueError(f"UNet: pooled {[*pooled.shape]} and time_ids {[*time_ids.shape]} do "
                             f"not fit batch {batch}, projection_class_embeddings_input_dim {dim}")
        ids = self._sinusoid(time_ids.reshape(-1), id_dim).reshape(batch, -1)  # (B*6, D) -> (B, 6D)
        return torch.cat([pooled.to(dtype), ids.to(dtype)], dim=-1)  # (B, P + 6*D)

    def forward(self, x, t, context, pooled=None, time_ids=None):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() not in (1, B):
            raise ValueError(f"UNet: {t.numel()} timesteps for a batch of {B}: give 1 or {B}")
        emb = self.time_embedding(self._sinusoid(t.expand(B), self.config.block_out_channels[0])
                                  .to(x.dtype))  # (B, temb_ch)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(self._micro_conditioning(pooled, time_ids, B, emb.dtype))
        elif pooled is not None or time_ids is not None:
            raise ValueError("UNet: SD 1.x/2.x UNets have no added embedding: drop pooled/time_ids")
        temb = F.silu(emb)  # every resnet starts its time projection with SiLU: do it once here

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips += block_skips
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, skips, temb, context)  # each up level pops its skips off the end
        return self.conv_out(F.silu(self.conv_norm_out(h)))
