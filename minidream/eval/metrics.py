"""DreamBooth's evaluation metrics (Ruiz et al. 2022, sec. 4.1 and 4.3): CLIP-I, CLIP-T, DINO, PRES, DIV.

Every metric is a mean of cosine similarities between embeddings:

    CLIP-I  generated vs real subject images, all pairs, CLIP ViT-B/32 image embeddings  (higher: more alike)
    DINO    the same pairs, DINO ViT-S/16 CLS embeddings (the paper's preferred metric)   (higher: more alike)
    CLIP-T  each generated image vs its own prompt, CLIP image vs text embedding          (higher: on prompt)
    PRES    class-prompt samples ("a photo of dog") vs the real subject images, DINO      (LOWER is better: a
            high value means "a dog" now draws *this* dog, the class prior collapsed)
    DIV     diversity among the samples of one prompt                                     (higher: more varied)

CLIP-T uses the prompt without the rare token ("a rraj dog on the beach" -> "a dog on the beach").
The paper only says "prompt and image CLIP embeddings"; the identifier is a rare token that means
nothing to the evaluation CLIP (the LoRA changed the diffusion model, not this CLIP), so keeping it
would only add noise to the text embedding. CLIP-T is meant to measure whether the image shows the
described scene.

DIV: the paper uses LPIPS (Zhang et al. 2018), which needs the `lpips` package, torchvision and
AlexNet weights from the internet. minidream's default is 1 - (mean cosine between the DINO
embeddings of two samples of the same prompt), averaged over prompts: the same deep-feature
distance idea (Zhang et al. found self-supervised features work as perceptual distances too), no
extra model or download, as the DINO model is loaded anyway. It is global (one CLS vector per
image), so it reacts less to pose or layout changes than LPIPS's spatial feature maps. Its scale
differs from LPIPS: it is labelled "1-DINO" wherever it is written and must not be compared with
the paper's DIV (0.391 / 0.371). div="lpips" measures LPIPS where the package is installed.

Models come through transformers: CLIPModel (openai/clip-vit-base-patch32) and ViTModel
(facebook/dino-vits16), from a local folder or the Hugging Face cache; minidream never downloads
them itself. Images are prepared by the image processor saved with each model (CLIP: short side to
224 bicubic, centre crop, CLIP's mean/std; DINO: 224x224 bilinear, ImageNet mean/std), so the real
models get exactly the inputs their published preprocessing gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, ViTModel

from minidream.data import to_tensor
from minidream.errors import UserError
from minidream.formats.models import REPO

CLIP_MODEL = "openai/clip-vit-base-patch32"  # CLIP-I, CLIP-T (the paper's CLIP)
DINO_MODEL = "facebook/dino-vits16"  # DINO, PRES, DIV (the paper's ViT-S/16 DINO)
DIV_DINO, DIV_LPIPS = "1-DINO", "LPIPS"  # how DIV was measured (written next to every DIV value)
BATCH = 16  # images per forward pass of a metric model


class MetricModelError(UserError, FileNotFoundError):
    """A metric model (or package) is missing; the message says how to get it."""


# ----------------------------------------------------------------------------- the math

def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1, so that dot products are cosines."""
    return x / x.norm(dim=-1, keepdim=True)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M): cos(a_i, b_j) for every pair."""
    return unit(a.double()) @ unit(b.double()).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over all N * M pairs (CLIP-I, DINO, PRES)."""
    return cosine_matrix(a, b).mean().item()


def mean_cosine_within(a: torch.Tensor) -> float:
    """Mean of cos(a_i, a_j) over the N * (N - 1) pairs i != j (an image is not compared with itself)."""
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to compare among themselves, got {n}")
    sims = cosine_matrix(a, a)
    return ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()


def mean_matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i): row i of `a` against row i of `b` only (CLIP-T: image i vs its prompt)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"matched cosine needs as many rows in both, got {a.shape[0]} and {b.shape[0]}")
    return (unit(a.double()) * unit(b.double())).sum(-1).mean().item()


# ----------------------------------------------------------------------------- the metrics

def clip_i(generated: torch.Tensor, real: torch.Tensor) -> float:
    """CLIP-I: mean pairwise cosine of CLIP image embeddings, generated vs real (paper sec. 4.1)."""
    return mean_pairwise_cosine(generated, real)


def dino_score(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO: mean pairwise cosine of DINO ViT-S/16 embeddings, generated vs real (paper sec. 4.1)."""
    return mean_pairwise_cosine(generated, real)


def clip_t(images: torch.Tensor, prompts: torch.Tensor) -> float:
    """CLIP-T: mean cosine of each image's CLIP embedding with its own prompt's (paper sec. 4.1)."""
    return mean_matched_cosine(images, prompts)


def pres(class_samples: torch.Tensor, real: torch.Tensor) -> float:
    """PRES: mean pairwise DINO cosine, class-prompt samples vs the real subject (paper sec. 4.3).
    Lower is better: a high value means the class prompt now draws the subject (the prior collapsed)."""
    return mean_pairwise_cosine(class_samples, real)


def div_from_embeddings(groups: list[torch.Tensor]) -> float:
    """DIV (minidream's stand-in for LPIPS): 1 - mean DINO cosine among the samples of one prompt,
    averaged over prompts. 0: all samples identical; higher: more varied."""
    return sum(1.0 - mean_cosine_within(g) for g in groups) / len(groups)


def prompt_without_token(prompt: str, token: str) -> str:
    """The prompt CLIP-T compares with: the rare identifier removed as a whole word.
    "a rraj person on the beach" -> "a person on the beach"."""
    if not token:
        return prompt
    return " ".join(word for word in prompt.split() if word != token)


# ----------------------------------------------------------------------------- the models

def _download_hint(name: str) -> str:
    folder = f"weights/{name.rstrip('/').split('/')[-1]}"
    return (f"`hf download {name} --local-dir {folder}` (older huggingface_hub: `huggingface-cli download {name} "
            f"--local-dir {folder}`)")


def model_source(name: str) -> str:
    """Where to load `name` from: an existing folder, else weights/<last part of the hub id> if it
    exists (where the README's download command puts it), else the hub id itself (read from the
    Hugging Face cache only)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    local = REPO / "weights" / name.rstrip("/").split("/")[-1]
    return str(local) if local.is_dir() else name


def _looks_like_hub_id(name: str) -> bool:
    """"owner/model" (not a local path such as weights/x or ./x)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith(("weights/", "."))


def _load(load, name: str, what: str, flag: str, default: str):
    source = model_source(name)
    try:
        return load(source)
    except (OSError, ValueError) as e:  # not a folder, not cached (ValueError: a malformed hub id)
        hub_id = name if _looks_like_hub_id(name) else default
        raise MetricModelError(
            f"{what} was not found at {name!r} (nor in the Hugging Face cache; minidream never downloads it by "
            f"itself): fetch it once with {_download_hint(hub_id)} and run again (that folder is found "
            f"automatically), or pass {flag} DIR [{type(e).__name__}: {str(e).splitlines()[0][:200]}]"
        ) from None


def pixel_batches(processor, images: list[Image.Image], device):
    """The model's own preprocessing (resize, crop, normalise), BATCH images at a time."""
    for i in range(0, len(images), BATCH):
        yield processor(images=images[i:i + BATCH], return_tensors="pt")["pixel_values"].to(device)


@dataclass
class ClipEmbedder:
    """CLIP image and text embeddings (the projected ones CLIP compares by cosine)."""

    model: torch.nn.Module  # transformers CLIPModel
    processor: object  # its image processor (CLIPImageProcessor)
    tokenizer: object  # CLIPTokenizer
    device: torch.device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, projection_dim): visual_projection(pooled CLS of the vision tower)."""
        out = []
        for pixels in pixel_batches(self.processor, images, self.device):
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(N, projection_dim): text_projection(the text tower's state at the end-of-text token)."""
        length = self.model.config.text_config.max_position_embeddings  # 77
        out = []
        for i in range(0, len(texts), BATCH):
            tokens = self.tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=length,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


@dataclass
class DinoEmbedder:
    """DINO ViT-S/16 embeddings: the CLS token of the last layer, after the final LayerNorm (what
    DINO's own code returns as the image feature; no classification or pooler head)."""

    model: torch.nn.Module  # transformers ViTModel without its pooler
    processor: object  # ViTImageProcessor
    device: torch.device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for pixels in pixel_batches(self.processor, images, self.device):
            hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D)
            out.append(hidden[:, 0].float().cpu())  # CLS
        return torch.cat(out)


def load_clip(name: str = CLIP_MODEL, device="cpu") -> ClipEmbedder:
    """CLIP from a folder or a cached hub id; MetricModelError with the download command if absent."""
    def load(source):
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        return model, AutoImageProcessor.from_pretrained(source, local_files_only=True), \
            CLIPTokenizer.from_pretrained(source, local_files_only=True)

    model, processor, tokenizer = _load(load, name, f"CLIP ViT-B/32 ({CLIP_MODEL}, for CLIP-I and CLIP-T)",
                                        "--clip", CLIP_MODEL)
    return ClipEmbedder(model.float().eval().to(device), processor, tokenizer, torch.device(device))


def load_dino(name: str = DINO_MODEL, device="cpu") -> DinoEmbedder:
    """DINO ViT-S/16 from a folder or a cached hub id; MetricModelError if absent."""
    def load(source):
        # The hub checkpoint holds the backbone only: no pooler (it would be random, and unused).
        model = ViTModel.from_pretrained(source, add_pooling_layer=False, local_files_only=True)
        return model, AutoImageProcessor.from_pretrained(source, local_files_only=True)

    model, processor = _load(load, name, f"DINO ViT-S/16 ({DINO_MODEL}, for DINO, PRES and DIV)", "--dino",
                             DINO_MODEL)
    return DinoEmbedder(model.float().eval().to(device), processor, torch.device(device))


def lpips_div(groups: list[list[Image.Image]], device="cpu") -> float:
    """DIV as the paper measures it: mean LPIPS distance (AlexNet, v0.1) between the samples of one
    prompt, averaged over prompts. Optional: needs `pip install lpips` (and torchvision; the first use
    downloads AlexNet's weights)."""
    try:
        import lpips
    except ImportError:
        raise MetricModelError("DIV with LPIPS needs the lpips package: pip install lpips (it needs torchvision, "
                               "and its first use downloads AlexNet weights); or use --div dino") from None
    net = lpips.LPIPS(net="alex", verbose=False).eval().to(device)
    means = []
    with torch.no_grad():
        for group in groups:
            x = torch.stack([to_tensor(img) for img in group]).to(device)  # (N, 3, H, W) in [-1, 1]
            i, j = torch.triu_indices(len(group), len(group), offset=1)
            means.append(net(x[i], x[j]).mean().item())  # LPIPS is symmetric: each pair once
    return sum(means) / len(means)


# ----------------------------------------------------------------------------- all together

@dataclass
class Scores:
    clip_i: float  # generated vs real, CLIP
    clip_t: float  # generated vs its prompt without the rare token, CLIP
    dino: float  # generated vs real, DINO
    pres: float | None  # class-prompt samples vs real, DINO (None: no class samples)
    div: float | None  # diversity among same-prompt samples (None: one sample per prompt)
    div_kind: str  # DIV_DINO or DIV_LPIPS
    real_clip_i: float | None  # real vs real (i != j): the ceiling CLIP-I can reach (paper: 0.885)
    real_dino: float | None  # real vs real, DINO (paper: 0.774)
    generated: int  # images scored
    real: int
    class_samples: int

    def as_dict(self) -> dict:
        return dict(vars(self))


def score(real: list[Image.Image], generated: dict[str, list[Image.Image]], class_samples: list[Image.Image],
          token: str, clip: ClipEmbedder, dino: DinoEmbedder, div: str = "dino") -> Scores:
    """Every metric for one set of samples.

    real: the subject's photos. generated: prompt (with the rare token) -> its samples.
    class_samples: samples of the class prompt, for PRES (may be empty). token: the rare identifier.
    div: "dino" (minidream's default, see the module docstring) or "lpips" (needs the lpips package).
    """
    if div not in ("dino", "lpips"):
        raise ValueError(f"div must be 'dino' or 'lpips', got {div!r}")
    prompts = list(generated)
    images = [img for p in prompts for img in generated[p]]
    texts = [prompt_without_token(p, token) for p in prompts for _ in generated[p]]
    real_clip, real_dino = clip.images(real), dino.images(real)
    gen_clip, gen_dino = clip.images(images), dino.images(images)
    groups = [g for g in torch.split(gen_dino, [len(generated[p]) for p in prompts]) if len(g) > 1]
    div_value = None
    if groups and div == "lpips":
        div_value = lpips_div([generated[p] for p in prompts if len(generated[p]) > 1], clip.device)
    elif groups:
        div_value = div_from_embeddings(groups)
    return Scores(
        clip_i=clip_i(gen_clip, real_clip),
        clip_t=clip_t(gen_clip, clip.texts(texts)),
        dino=dino_score(gen_dino, real_dino),
        pres=pres(dino.images(class_samples), real_dino) if class_samples else None,
        div=div_value,
        div_kind=DIV_LPIPS if div == "lpips" else DIV_DINO,
        real_clip_i=mean_cosine_within(real_clip) if len(real) > 1 else None,
        real_dino=mean_cosine_within(real_dino) if len(real) > 1 else None,
        generated=len(images), real=len(real), class_samples=len(class_samples),
    )
