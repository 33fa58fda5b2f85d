"""The toy world's judge: a small CNN that reads an image's attributes back.

A generated toy-world image is scored the way DreamBooth's paper scores real ones with CLIP and
DINO, but with exact labels: the judge says which kind of thing it shows, its style, its place,
its colour, and the person's skin, hair, eyes, hat and glasses. It is trained on procedural
images whose labels are known (toyworld.py), with one classification head per attribute.

Diffusion samples from a tiny model are softer and noisier than the renderer's crisp pixels, so
training adds random Gaussian blur and pixel noise to half of the images (see `degrade`).

    python -m minidream.toy.judge train                # writes weights/toy-judge.safetensors
    python -m minidream.toy.judge eval --n 2000        # accuracy per head on held-out images
"""

import argparse
import json
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minidream.toy import toyworld as tw
from minidream.toy.toydraw import SIZE, render

DEFAULT_PATH = "weights/toy-judge.safetensors"

# One head per judged attribute, with its classes in a fixed order.
HEADS = {
    "kind": tw.KINDS, "style": tuple(tw.STYLES), "context": tuple(tw.CONTEXTS),
    "color": tw.ALL_COLORS, "skin": tw.SKINS, "hair": tw.HAIRS, "eyes": tw.EYES,
    "hat": tw.HATS, "hat_color": tw.HAT_COLORS, "glasses": tw.GLASSES,
    "glasses_color": tw.GLASSES_COLORS,
}
PERSON_ONLY = ("skin", "hair", "eyes", "hat", "hat_color", "glasses", "glasses_color")
IGNORE = -100  # label of a head that does not apply (a dog's hair): no loss, not scored


@dataclass
class JudgeConfig:
    width: int = 32     # channels of the first conv; doubled at each downsampling
    hidden: int = 256   # size of the shared feature vector the heads read


def conv(cin, cout, stride=1):
    """3x3 conv, batch norm (without it this 7-conv net learns several times slower), ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Judge(nn.Module):
    """64x64 RGB in [0, 1] -> logits of every head. A stride-2 stem and three stride-2 stages
    (64 -> 32 -> 16 -> 8 -> 4 px), then an MLP.

    The 4x4 map is flattened rather than pooled: where a colour is (top of the head = hat,
    bottom = shirt) is what tells the heads apart.
    """

    def __init__(self, config=JudgeConfig()):
        super().__init__()
        self.config = config
        w = config.width
        layers = conv(3, w, stride=2)  # 64 -> 32 px
        for c in (w, 2 * w, 4 * w):  # 32 -> 16 -> 8 -> 4 px, channels doubling
            layers += conv(c, c) + conv(c, min(2 * c, 4 * w), stride=2)
        self.features = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 4 * 4, config.hidden), nn.ReLU())
        self.out = nn.Linear(config.hidden, sum(len(c) for c in HEADS.values()))

    def forward(self, x):
        """x: (B, 3, 64, 64) in [0, 1] -> dict head -> logits (B, n_classes)."""
        logits = self.out(self.mlp(self.features(x * 2 - 1)))  # (B, sum of classes)
        return dict(zip(HEADS, logits.split([len(c) for c in HEADS.values()], dim=1)))

    # ---------------------------------------------------------------- using a trained judge

    @torch.no_grad()
    def predict(self, images):
        """Attributes seen in each image: a list of dicts like toyworld.Attributes.labels(),
        plus "probs": {head: {class: probability}}. Fields that cannot apply are None: the
        person's fields when no person is seen, hat_color without a hat, eyes behind sunglasses.
        images: list of PIL images, a uint8 array (B, H, W, 3) or a float tensor (B, 3, H, W)
        in [0, 1]; other sizes than 64x64 are resized."""
        self.eval()
        probs = {h: F.softmax(z, dim=1) for h, z in self(to_tensor(images)).items()}
        out = []
        for i in range(len(probs["kind"])):
            p = {h: dict(zip(HEADS[h], probs[h][i].tolist())) for h in HEADS}
            pred = {h: max(p[h], key=p[h].get) for h in HEADS}
            if pred["kind"] != "person":
                pred.update(dict.fromkeys(PERSON_ONLY))
            else:
                if pred["hat"] == "none":
                    pred["hat_color"] = None
                if pred["glasses"] != "glasses":
                    pred["glasses_color"] = None
                if pred["glasses"] == "sunglasses":
                    pred["eyes"] = None
            out.append({**pred, "probs": p})
        return out

    def check(self, images, wanted):
        """Per image, {attribute: bool} for each attribute in `wanted`: a dict of judged fields
        ({"skin": "purple", "hat": "pointy"}) or a caption, whose named fields are used
        ("a painting of person with red glasses" -> style, kind, glasses, glasses_color)."""
        if isinstance(wanted, str):
            wanted = {k: v for k, v in tw.parse_caption(wanted).items() if k in HEADS}
        unknown = set(wanted) - set(HEADS)
        if unknown:
            raise ValueError(f"the judge has no head for {sorted(unknown)}; heads: {list(HEADS)}")
        return [{k: p[k] == v for k, v in wanted.items()} for p in self.predict(images)]

    def score(self, images, wanted):
        """Share of images in which the judge sees every attribute in `wanted` (see check)."""
        checks = self.check(images, wanted)
        return sum(all(c.values()) for c in checks) / max(len(checks), 1)

    def save(self, path):
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(asdict(self.config)),
                                                "heads": json.dumps(HEADS)})

    @classmethod
    def load(cls, path=DEFAULT_PATH):
        """A trained judge from a file written by `save` (python -m minidream.toy.judge train)."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if json.loads(meta["heads"]) != {h: list(c) for h, c in HEADS.items()}:
            raise ValueError(f"{path} was trained on another toy-world vocabulary; retrain it "
                             f"with: python -m minidream.toy.judge train --out {path}")
        judge = cls(JudgeConfig(**json.loads(meta["config"])))
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()


def to_tensor(images):
    """PIL list / uint8 (B, H, W, 3) array / float (B, 3, H, W) tensor -> (B, 3, 64, 64) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im.convert("RGB")) if isinstance(im, Image.Image)
                               else np.asarray(im) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images as (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area" if x.shape[-1] > SIZE else "bilinear")
    return x


# ----------------------------------------------------------------------------- training data

def labels(attrs):
    """(B, n_heads) class indices of a list of Attributes; IGNORE where a field is None."""
    rows = [[IGNORE if a.labels()[h] is None else HEADS[h].index(a.labels()[h]) for h in HEADS]
            for a in attrs]
    return torch.tensor(rows)


def make_batch(n, seed):
    """n rendered images (B, 3, 64, 64) in [0, 1] and their labels; the subject's look is
    included (exclude_subject=False): the judge must know it even though the generator never
    sees it in pretraining."""
    rng = np.random.default_rng(seed)
    attrs = [tw.sample_attributes(rng, exclude_subject=False) for _ in range(n)]
    return to_tensor([render(a) for a in attrs]), labels(attrs)


def gaussian_blur(x, sigma):
    """Blur each image of x (B, 3, H, W) with its own sigma (B,) using a separable 5-tap kernel."""
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-t**2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (B, 5)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B*3, 5): one kernel per channel
    B, C, H, W = x.shape
    y = F.pad(x.reshape(1, B * C, H, W), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # along width
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # along height
    return y.reshape(B, C, H, W)


def degrade(x, gen, p=0.5, max_sigma=1.2, max_noise=0.06):
    """Blur (sigma up to max_sigma px) and noise (std up to max_noise) a random share p of the
    batch: a stand-in for the soft, grainy samples of a tiny diffusion model."""
    B = x.shape[0]
    on = (torch.rand(B, generator=gen) < p).float()
    sigma = torch.rand(B, generator=gen) * max_sigma * on
    x = torch.where((sigma > 0.05)[:, None, None, None], gaussian_blur(x, sigma), x)
    noise = torch.rand(B, 1, 1, 1, generator=gen) * max_noise * on[:, None, None, None]
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def loss_fn(logits, y):
    """Sum over heads of the cross-entropy, each head averaged over the images it applies to."""
    total = 0.0
    for j, h in enumerate(HEADS):
        if (y[:, j] != IGNORE).any():
            total = total + F.cross_entropy(logits[h], y[:, j], ignore_index=IGNORE)
    return total


def train(steps=3000, batch_size=64, lr=2e-3, seed=0, log_every=250, config=JudgeConfig()):
    """Train a judge on fresh procedural images (batch i is drawn from seed (seed, i)), with a
    cosine learning-rate decay. Deterministic for a given seed, torch version and thread count."""
    torch.manual_seed(seed)
    judge = Judge(config)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        x, y = make_batch(batch_size, seed=(seed, step))
        loss = loss_fn(judge(degrade(x, gen)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    return judge.eval()


@torch.no_grad()
def evaluate(judge, n=2000, seed=12345, blur=0.0, noise=0.0, batch_size=250):
    """Accuracy of each head on n held-out images (counting only images where the head applies),
    plus "all_subject": share of persons whose skin, hat and glasses fields are all right.
    blur/noise degrade the images (Gaussian sigma in px, noise std) to test robustness."""
    judge.eval()
    right, count, subj, persons = np.zeros(len(HEADS)), np.zeros(len(HEADS)), 0, 0
    for start in range(0, n, batch_size):
        x, y = make_batch(min(batch_size, n - start), seed=(seed, start))
        if blur > 0:
            x = gaussian_blur(x, torch.full((len(x),), float(blur)))
        if noise > 0:
            x = (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(start))).clamp(0, 1)
        pred = torch.stack([z.argmax(1) for z in judge(x).values()], 1)  # (B, n_heads)
        ok, valid = (pred == y), (y != IGNORE)
        right += (ok & valid).sum(0).numpy()
        count += valid.sum(0).numpy()
        cols = [list(HEADS).index(k) for k in tw.RESERVED]
        person = y[:, 0] == tw.KINDS.index("person")
        subj += (ok[:, cols] | ~valid[:, cols]).all(1)[person].sum().item()
        persons += person.sum().item()
    acc = {h: float(r / c) for h, r, c in zip(HEADS, right, count)}
    acc["all_subject"] = subj / persons
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minidream.toy.judge", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the judge and write its weights")
    t.add_argument("--out", default=DEFAULT_PATH)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (the bits depend on it)")
    e = sub.add_parser("eval", help="accuracy per head on held-out procedural images")
    e.add_argument("--weights", default=DEFAULT_PATH)
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "train":
        t0 = time.time()
        judge = train(args.steps, args.batch_size, seed=args.seed)
        judge.save(args.out)
        print(f"wrote {args.out} in {time.time() - t0:.0f}s")
    else:
        judge = Judge.load(args.weights)
        for name, kw in (("clean", {}), ("blur 1.0 + noise 0.03", dict(blur=1.0, noise=0.03))):
            acc = evaluate(judge, args.n, args.seed, **kw)
            print(f"{name:>22}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
