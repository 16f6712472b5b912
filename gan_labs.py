"""The GAN labs: DCGAN, conditional DCGAN, the MLP ("vanilla") GAN and WGAN (clip / GP),
with metrics that work offline.

Adversarial regularization reuses the GAN game; this script teaches that game first. One
subcommand per lab, each run end to end: train, save a sample grid per epoch from a fixed z,
the curves of the losses and of the discriminator's outputs, a latent interpolation strip, a
resumable checkpoint, and numbers that say whether it worked.

Labs (subcommands)
  dcgan       DCGAN (Radford et al., 2016) on MNIST resized to 32x32: BCE game, Adam 2e-4,
              beta1 0.5, batch 128, nz 100, ngf = ndf = 32, N(0, 0.02) init, 5 epochs.
              Experiments: --g-loss saturating (min log(1 - D(G(z))), the "true" minimax loss)
              vs non-saturating (max log D(G(z))), --init default, widths, learning rates.
  cdcgan      Conditional DCGAN (Mirza & Osindero, 2014): one-hot y concatenated to z for G,
              y expanded to HxW channels stacked with x for D. Writes the class x z grid.
              --no-label-in-d removes y from D (the lab's question).
  vanilla     The MLP GAN of the second report: 4 linear layers with LeakyReLU each side,
              sigmoid D, BCE, Adam. --d-dropout, --g-every N (train G every N D steps).
  wgan        WGAN (Arjovsky et al., 2017) with --constraint clip (weights in [-c, c],
              RMSprop 5e-5) or WGAN-GP (Gulrajani et al., 2017, Alg. 1: lambda 10, n_critic 5,
              Adam 1e-4, betas (0, 0.9)) or none; --critic conv|mlp. Tracks an upper bound on
              the critic's Lipschitz constant, the product of the layers' spectral norms.
  classifier  Trains (and caches) the small CNN whose penultimate layer is the feature space
              of the metrics (the reports used an online Inception net; this works offline).
  evaluate    Fréchet distance (FID-style) and k-NN precision / recall (Kynkäänniemi et al.,
              2019) between generated and real test images in that feature space, the
              classifier's accuracy on cDCGAN samples against their labels, and the
              real-vs-real floor (train vs test). Also run at the end of every lab.
  interpolate The strip G(a z1 + (1 - a) z2) for a in [0, 1] from a run's checkpoint.
  --diffaug translation,cutout,color  DiffAugment (Zhao et al., 2020) on real and fake
              images in both the D and the G steps, for any lab.

Commands
  Lab setting (5 epochs of MNIST; downloads MNIST with torchvision, or pass an ImageFolder):
      python gan_labs.py dcgan --data mnist
      python gan_labs.py cdcgan --data /root/data/mnist
      python gan_labs.py wgan --constraint gp --data /root/data/mnist
  Quick CPU run (1 epoch: about 1.5 min of training and 0.5 min of metrics on one core):
      python gan_labs.py dcgan --data /root/data/mnist --epochs 1 --threads 1 --out runs/gan/quick
  Later:  python gan_labs.py evaluate --out runs/gan/mnist/dcgan
          python gan_labs.py interpolate --out runs/gan/mnist/dcgan

Reads   --data mnist | cifar10 (torchvision, under --data-root) or PATH, an ImageFolder tree
        PATH/{train,test}/<class>/*.png|jpg (grayscale PNGs stay 1-channel). Decoded tensors
        and the metric classifier are cached under --cache-dir.
Writes  under --out (default runs/gan/<data>/<lab>[_<flag>-<value>...]): checkpoint.pt (resumed if
        present), metrics.csv (curves, one row per log step), curves.png, samples_epochNN.png,
        interpolation.png, class_grid.png (cdcgan), eval.csv and summary.json.
"""
import argparse
import csv
import json
import math
import os
import re
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

LABS = ("dcgan", "cdcgan", "vanilla", "wgan")
CLASSIFIER_SIZE = 32  # the metric network sees every image at 32x32, whatever the lab's size


# ----------------------------------------------------------------------------- arguments
def add_common_args(p):
    p.add_argument("--data", default="mnist", help="mnist | cifar10 (torchvision) | PATH of an ImageFolder tree with train/ and test/")
    p.add_argument("--data-root", default="data", help="where torchvision keeps MNIST / CIFAR-10")
    p.add_argument("--cache-dir", default="runs/gan/cache", help="decoded dataset tensors and the metric classifier are cached here")
    p.add_argument("--classifier", default="", help="metric classifier checkpoint (default: <cache-dir>/classifier_<data>.pt, trained if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--eval-samples", type=int, default=10000, help="images per set for FID / precision / recall (0 = skip the metrics)")


def add_train_args(p, lab):
    conv = lab in ("dcgan", "cdcgan")
    p.add_argument("--out", default="", help="run folder (default: runs/gan/<data name>/<lab>_<non-default flags>)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training set (lab: 5)")
    p.add_argument("--train-limit", type=int, default=0, help="train on a random subset of this many images (0 = all)")
    p.add_argument("--image-size", type=int, default=28 if lab == "vanilla" else 32, help="pixels; 32 or 64 for the conv nets (lab: MNIST resized to 32; vanilla: 28 = 784 inputs)")
    p.add_argument("--batch-size", type=int, default=64 if lab == "wgan" else 128, help="lab: 128 (WGAN-GP Alg. 1: 64)")
    p.add_argument("--nz", type=int, default=100, help="latent dimension (lab: 100)")
    p.add_argument("--ngf", type=int, default=32, help="generator width (lab: 32)")
    p.add_argument("--ndf", type=int, default=32, help="discriminator width (lab: 32; the WGAN conv critic uses 16,32,64,128)")
    p.add_argument("--lr-g", type=float, default=None, help="generator learning rate (default: 2e-4 for the BCE labs; WGAN 5e-5 clip, 1e-4 GP)")
    p.add_argument("--lr-d", type=float, default=None, help="discriminator / critic learning rate (same defaults)")
    p.add_argument("--beta1", type=float, default=0.0 if lab == "wgan" else 0.5, help="Adam beta1 (DCGAN: 0.5; WGAN-GP: 0)")
    p.add_argument("--init", choices=["dcgan", "default"], default="dcgan" if conv else "default", help="dcgan: N(0, 0.02) conv weights, N(1, 0.02) BatchNorm scales; default: PyTorch's")
    p.add_argument("--diffaug", default="", help="comma list of translation,cutout,color (DiffAugment, Zhao et al. 2020)")
    p.add_argument("--log-every", type=int, default=25, help="iterations between progress lines / curve points")
    if lab in ("dcgan", "cdcgan", "vanilla"):
        p.add_argument("--g-loss", choices=["non-saturating", "saturating"], default="non-saturating", help="G maximizes log D(G(z)) (non-saturating) or minimizes log(1 - D(G(z))) (saturating)")
    if lab == "cdcgan":
        p.add_argument("--no-label-in-d", action="store_true", help="D sees x only; G stays conditional")
    if lab == "vanilla":
        p.add_argument("--d-dropout", type=float, default=0.3, help="dropout after each hidden layer of D")
        p.add_argument("--g-every", type=int, default=1, help="train G once every N D steps")
    if lab == "wgan":
        p.add_argument("--constraint", choices=["clip", "gp", "none"], default="gp", help="Lipschitz constraint on the critic")
        p.add_argument("--critic", choices=["conv", "mlp"], default="conv", help="conv: 4 strided conv + LeakyReLU(0.2) blocks (16 filters first); mlp: the vanilla D without sigmoid")
        p.add_argument("--clip", type=float, default=0.01, help="c of weight clipping (WGAN: 0.01)")
        p.add_argument("--gp-lambda", type=float, default=10.0, help="lambda of the gradient penalty (WGAN-GP: 10)")
        p.add_argument("--n-critic", type=int, default=5, help="critic steps per generator step (WGAN, WGAN-GP: 5)")


def build_parser():
    parser = argparse.ArgumentParser(description="The GAN labs with offline metrics.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="lab", required=True, metavar="{" + ",".join(LABS) + ",classifier,evaluate,interpolate}")
    for lab in LABS:
        p = sub.add_parser(lab, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_common_args(p)
        add_train_args(p, lab)
    p = sub.add_parser("classifier", help="train / cache the metric classifier")
    add_common_args(p)
    p.add_argument("--epochs", type=int, default=2, help="classifier epochs (a cached classifier is reused: delete it to retrain)")
    for mode in ("evaluate", "interpolate"):
        p = sub.add_parser(mode, help=f"{mode} a run from its checkpoint")
        add_common_args(p)
        p.add_argument("--out", required=True, help="run folder holding checkpoint.pt")
        p.add_argument("--steps", type=int, default=11, help="interpolation points, alpha = 0 ... 1")
    return parser, sub


def parse_args(argv=None):
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    if args.lab in LABS:
        if args.lab != "vanilla" and not (args.lab == "wgan" and args.critic == "mlp") and args.image_size not in (32, 64):
            parser.error(f"--image-size must be 32 or 64 for the {args.lab} conv nets, got {args.image_size}")
        if args.image_size < 8:
            parser.error(f"--image-size must be >= 8, got {args.image_size}")
        bad = set(filter(None, args.diffaug.split(","))) - {"translation", "cutout", "color"}
        if bad:
            parser.error(f"--diffaug: unknown policy {sorted(bad)}; choose from translation,cutout,color")
        lab_lr = 2e-4 if args.lab != "wgan" else (5e-5 if args.constraint == "clip" else 1e-4)
        args.lr_g = lab_lr if args.lr_g is None else args.lr_g
        args.lr_d = lab_lr if args.lr_d is None else args.lr_d
        if not args.out:
            # the folder name lists the flags that differ from the lab's defaults, so two
            # experiments never share (and resume from) one checkpoint
            lab_parser = sub.choices[args.lab]
            skip = {"data", "data_root", "cache_dir", "classifier", "device", "threads", "eval_samples", "out", "epochs", "log_every", "lr_g", "lr_d", "lab"}
            parts = [args.lab]
            for key, value in vars(args).items():
                if key not in skip and value != lab_parser.get_default(key):
                    parts.append(key.replace("_", "-") + ("" if value is True else f"-{value}"))
            for key in ("lr_g", "lr_d"):
                if getattr(args, key) != lab_lr:
                    parts.append(f"{key.replace('_', '-')}-{getattr(args, key)}")
            data_name = os.path.basename(os.path.normpath(args.data))  # --data mnist and --data PATH/mnist share a folder
            args.out = os.path.join("runs", "gan", data_name, re.sub(r"[^\w.=-]+", "_", "_".join(parts)))
    return args


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} is not available on this machine")
    return torch.device(name)


# ----------------------------------------------------------------------------- data
def list_image_folder(split_dir):
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    files = [(os.path.join(split_dir, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c))) if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    return classes, files


def load_split(args, split):
    """Returns (x uint8 N x C x H x W at the data's own size, y int64 N, class names), decoded once
    and cached under --cache-dir."""
    train = split == "train"
    if args.data in ("mnist", "cifar10"):
        cls = torchvision.datasets.MNIST if args.data == "mnist" else torchvision.datasets.CIFAR10
        try:
            ds = cls(args.data_root, train=train, download=True)
        except Exception as e:  # offline: torchvision raises URLError / RuntimeError
            raise SystemExit(f"error: cannot download {args.data} into {args.data_root} ({type(e).__name__}); "
                             f"pass an ImageFolder PATH instead, e.g. --data /root/data/{args.data}")
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)
    split_dir = os.path.join(args.data, split)
    if not os.path.isdir(split_dir):
        raise SystemExit(f"error: {split_dir} not found: --data PATH must hold train/ and test/ class folders")
    classes, files = list_image_folder(split_dir)
    if not files:
        raise SystemExit(f"error: no .png/.jpg images under {split_dir}/<class>/")
    key = re.sub(r"\W+", "_", os.path.abspath(split_dir)).strip("_")
    cache = os.path.join(args.cache_dir, f"data_{key}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache, weights_only=True)
        if blob["n_files"] == len(files) and blob["classes"] == classes:
            return blob["x"], blob["y"], classes
    with PIL.Image.open(files[0][0]) as first:  # grayscale trees (MNIST) stay 1-channel
        mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
    images = []
    for path, _ in files:
        with PIL.Image.open(path) as img:
            img = torchvision.transforms.functional.pil_to_tensor(img.convert(mode))
        if images and img.shape != images[0].shape:  # odd-sized images: match the first one
            img = resize_uint8(img[None], images[0].shape[-1])[0]
        images.append(img)
    x, y = torch.stack(images), torch.tensor([label for _, label in files])
    atomic_save(cache, lambda tmp: torch.save({"x": x, "y": y, "classes": classes, "n_files": len(files)}, tmp))
    return x, y, classes


def resize_uint8(x, size):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           for c in x.split(8192)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def load_data(args, split, size, device, limit=0):
    x, y, classes = load_split(args, split)
    if limit and limit < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:limit]
        x, y = x[keep], y[keep]
    return resize_uint8(x, size).to(device), y.to(device), classes


def to_float(x_uint8):
    return x_uint8.float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1], the range of G's tanh


def diff_augment(x, policy):
    """DiffAugment (Zhao et al., 2020): random translation (1/8 of the side, zero fill), cutout
    (a square of half the side) and colour jitter, differentiable in x: G learns through it."""
    n, c, h, w = x.shape
    dev = x.device
    for name in policy:
        if name == "color":
            x = x + (torch.rand(n, 1, 1, 1, device=dev) - 0.5)
            if c > 1:
                mean = x.mean(1, keepdim=True)
                x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev) * 2) + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev) + 0.5) + mean
        elif name == "translation":
            s = int(h * 0.125 + 0.5)
            ty, tx = torch.randint(-s, s + 1, (2, n, 1, 1), device=dev)
            gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
            gy, gx = (gy + ty + 1).clamp(0, h + 1), (gx + tx + 1).clamp(0, w + 1)
            padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
            x = padded[torch.arange(n, device=dev)[:, None, None], gy, gx].permute(0, 3, 1, 2)
        elif name == "cutout":
            ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
            oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=dev)
            ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=dev)
            gy, gx = torch.meshgrid(torch.arange(ch, device=dev), torch.arange(cw, device=dev), indexing="ij")
            gy, gx = (gy + oy - ch // 2).clamp(0, h - 1), (gx + ox - cw // 2).clamp(0, w - 1)
            mask = torch.ones(n, h, w, device=dev)
            mask[torch.arange(n, device=dev)[:, None, None], gy, gx] = 0
            x = x * mask.unsqueeze(1)
    return x


# ----------------------------------------------------------------------------- models
class Generator(nn.Module):
    """DCGAN generator. z (N, nz) [+ one-hot y (N, K)] -> (N, C, S, S) in [-1, 1].
    S = 32: (nz+K) x 1x1 -> convt1 4ngf x 4x4 -> convt2 2ngf x 8x8 -> convt3 ngf x 16x16
    -> convt4 C x 32x32, BatchNorm + ReLU between, tanh out (S = 64 adds one block, 8ngf first)."""

    def __init__(self, nz, ngf, channels, size, n_classes=0):
        super().__init__()
        n_blocks = int(math.log2(size)) - 2
        width = ngf * 2 ** (n_blocks - 1)
        self.net = nn.Sequential()
        self.net.add_module("convt1", nn.ConvTranspose2d(nz + n_classes, width, 4, 1, 0, bias=False))
        for i in range(2, n_blocks + 1):
            self.net.add_module(f"bn{i - 1}", nn.BatchNorm2d(width))
            self.net.add_module(f"relu{i - 1}", nn.ReLU(True))
            self.net.add_module(f"convt{i}", nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False))
            width //= 2
        self.net.add_module(f"bn{n_blocks}", nn.BatchNorm2d(width))
        self.net.add_module(f"relu{n_blocks}", nn.ReLU(True))
        self.net.add_module(f"convt{n_blocks + 1}", nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False))
        self.net.add_module("tanh", nn.Tanh())
        self.n_classes = n_classes

    def forward(self, z, y=None):
        if self.n_classes:
            z = torch.cat([z, F.one_hot(y, self.n_classes).float()], 1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN discriminator. x (N, C, S, S) [+ y as K one-hot planes] -> D(x) (N,) in (0, 1).
    S = 32: conv1 ndf x 16x16 -> conv2 2ndf x 8x8 -> conv3 4ndf x 4x4 -> conv4 1 x 1x1, all 4x4
    stride 2 (the last stride 1), BatchNorm (not after conv1) + LeakyReLU(0.2), sigmoid out."""

    def __init__(self, ndf, channels, size, n_classes=0):
        super().__init__()
        n_blocks = int(math.log2(size)) - 2
        self.net = nn.Sequential()
        self.net.add_module("conv1", nn.Conv2d(channels + n_classes, ndf, 4, 2, 1, bias=False))
        self.net.add_module("lrelu1", nn.LeakyReLU(0.2, True))
        width = ndf
        for i in range(2, n_blocks + 1):
            self.net.add_module(f"conv{i}", nn.Conv2d(width, width * 2, 4, 2, 1, bias=False))
            self.net.add_module(f"bn{i}", nn.BatchNorm2d(width * 2))
            self.net.add_module(f"lrelu{i}", nn.LeakyReLU(0.2, True))
            width *= 2
        self.net.add_module(f"conv{n_blocks + 1}", nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.net.add_module("sigmoid", nn.Sigmoid())
        self.n_classes = n_classes

    def forward(self, x, y=None):
        if self.n_classes:
            planes = F.one_hot(y, self.n_classes).float()[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], 1)
        return self.net(x).flatten()


class MLPGenerator(nn.Module):
    """Vanilla GAN generator: z (N, nz) -> fc1 256 -> fc2 512 -> fc3 1024 -> fc4 C*S*S, LeakyReLU(0.2)
    between, tanh out, reshaped to (N, C, S, S)."""

    def __init__(self, nz, channels, size, hidden=(256, 512, 1024)):
        super().__init__()
        dims = (nz,) + hidden + (channels * size * size,)
        self.net = nn.Sequential()
        for i in range(4):
            self.net.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
            self.net.add_module(f"lrelu{i + 1}" if i < 3 else "tanh", nn.LeakyReLU(0.2, True) if i < 3 else nn.Tanh())
        self.shape = (channels, size, size)

    def forward(self, z, y=None):
        return self.net(z).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    """Vanilla GAN discriminator: x (N, C, S, S) flattened -> fc1 1024 -> fc2 512 -> fc3 256 -> fc4 1,
    LeakyReLU(0.2) and dropout between; sigmoid out (D(x) in (0, 1)) or linear (a WGAN critic)."""

    def __init__(self, channels, size, dropout=0.0, sigmoid=True, hidden=(1024, 512, 256)):
        super().__init__()
        dims = (channels * size * size,) + hidden + (1,)
        self.net = nn.Sequential()
        for i in range(3):
            self.net.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
            self.net.add_module(f"lrelu{i + 1}", nn.LeakyReLU(0.2, True))
            if dropout:
                self.net.add_module(f"drop{i + 1}", nn.Dropout(dropout))
        self.net.add_module("fc4", nn.Linear(dims[3], 1))
        if sigmoid:
            self.net.add_module("sigmoid", nn.Sigmoid())

    def forward(self, x, y=None):
        return self.net(x.flatten(1)).flatten()


class ConvCritic(nn.Module):
    """WGAN critic: x (N, C, S, S) -> conv1 16 x S/2 -> conv2 32 x S/4 -> conv3 64 x S/8 -> conv4
    128 x S/16 (4x4 stride 2, LeakyReLU(0.2), no BatchNorm: the penalty is per sample) -> fc (N,)."""

    def __init__(self, channels, size):
        super().__init__()
        self.net = nn.Sequential()
        width_in = channels
        for i, width in enumerate((16, 32, 64, 128)):
            self.net.add_module(f"conv{i + 1}", nn.Conv2d(width_in, width, 4, 2, 1))
            self.net.add_module(f"lrelu{i + 1}", nn.LeakyReLU(0.2, True))
            width_in = width
        self.fc = nn.Linear(128 * (size // 16) ** 2, 1)

    def forward(self, x, y=None):
        return self.fc(self.net(x).flatten(1)).flatten()


class Classifier(nn.Module):
    """Metric network: x (N, C, 32, 32) -> conv1 16 x 16x16 -> conv2 32 x 8x8 -> conv3 64 x 4x4
    (3x3 conv, ReLU, 2x2 max-pool) -> fc1 128 (the feature space of the metrics) -> fc2 K logits."""

    def __init__(self, channels, n_classes):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(channels, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 16, 128), nn.Linear(128, n_classes)

    def forward(self, x, features=False):
        if x.shape[-1] != CLASSIFIER_SIZE:
            x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True, align_corners=False)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        h = F.relu(self.fc1(x.flatten(1)))
        return h if features else self.fc2(h)


def dcgan_init(m):
    # DCGAN §4: weights from N(0, 0.02); BatchNorm scales around 1 as in pytorch/examples, so
    # the first forward pass does not squash every activation to ~0
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_models(cfg, channels, n_classes):
    """cfg: the run's arguments as a dict (also how a checkpoint rebuilds its nets)."""
    lab, size = cfg["lab"], cfg["image_size"]
    if lab in ("dcgan", "cdcgan"):
        k = n_classes if lab == "cdcgan" else 0
        g = Generator(cfg["nz"], cfg["ngf"], channels, size, k)
        d = Discriminator(cfg["ndf"], channels, size, 0 if cfg.get("no_label_in_d") else k)
    elif lab == "vanilla":
        g, d = MLPGenerator(cfg["nz"], channels, size), MLPDiscriminator(channels, size, cfg["d_dropout"])
    else:
        mlp = cfg["critic"] == "mlp"
        g = MLPGenerator(cfg["nz"], channels, size) if mlp else Generator(cfg["nz"], cfg["ngf"], channels, size)
        d = MLPDiscriminator(channels, size, sigmoid=False) if mlp else ConvCritic(channels, size)
    if cfg["init"] == "dcgan":
        g.apply(dcgan_init)
        d.apply(dcgan_init)
    return g, d


# ----------------------------------------------------------------------------- WGAN mathematics
def gradient_penalty(critic, real, fake, lam):
    """WGAN-GP (Gulrajani et al., 2017, eq. 3): lam * E[(||grad D(x_hat)||_2 - 1)^2] on random
    interpolates x_hat = e x + (1 - e) G(z), e ~ U[0, 1] per sample. create_graph: the penalty
    itself is differentiated in the critic's step."""
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return lam * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@torch.no_grad()
def clip_weights(critic, c):
    for p in critic.parameters():
        p.clamp_(-c, c)


@torch.no_grad()
def lipschitz_bound(critic):
    """Upper bound on the critic's Lipschitz constant (LeakyReLU is 1-Lipschitz): prod_i ||W_i||_2,
    convolutions reshaped to (out, in*h*w). A strided convolution applies its matrix to
    overlapping patches, so a true bound multiplies each conv's norm by sqrt(overlaps per pixel)
    = ceil(kh/sh) * ceil(kw/sw) under the root (2 for 4x4 stride 2). Returns (product, bound),
    0-d tensors on the critic's device (read them at log steps only)."""
    product = bound = torch.ones((), device=next(critic.parameters()).device)
    for m in critic.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
            product = product * sigma
            overlap = 1
            if isinstance(m, nn.Conv2d):
                overlap = math.ceil(m.kernel_size[0] / m.stride[0]) * math.ceil(m.kernel_size[1] / m.stride[1])
            bound = bound * sigma * math.sqrt(overlap)
    return product, bound


# ----------------------------------------------------------------------------- training
def bce_step(lab, g, d, opt_g, opt_d, real, y, step, args, aug):
    """One D step of the BCE game, and a G step every --g-every steps. Returns detached device
    tensors (no host sync here)."""
    n, dev = real.shape[0], real.device
    y_fake = torch.randint(0, g.n_classes or 1, (n,), device=dev) if lab == "cdcgan" else None
    fake = g(torch.randn(n, args.nz, device=dev), y_fake)
    d_real = d(aug(real), y)
    d_fake = d(aug(fake.detach()), y_fake)
    loss_d = F.binary_cross_entropy(d_real, torch.ones_like(d_real)) + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    out = {"loss_d": loss_d.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}
    if step % getattr(args, "g_every", 1) == 0:
        d_gen = d(aug(fake), y_fake)
        if args.g_loss == "non-saturating":
            loss_g = F.binary_cross_entropy(d_gen, torch.ones_like(d_gen))  # -log D(G(z))
        else:
            loss_g = -F.binary_cross_entropy(d_gen, torch.zeros_like(d_gen))  # log(1 - D(G(z))), saturates when D wins
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        out["loss_g"] = loss_g.detach()
    return out


def wgan_step(g, d, opt_g, opt_d, real, step, args, aug):
    """One critic step: min D(G(z)) - D(x) [+ GP], then clipping; a G step (min -D(G(z))) every
    --n-critic critic steps."""
    n, dev = real.shape[0], real.device
    fake = g(torch.randn(n, args.nz, device=dev)).detach()
    real_a, fake_a = aug(real), aug(fake)
    d_real, d_fake = d(real_a).mean(), d(fake_a).mean()
    loss_d = d_fake - d_real
    out = {"d_real": d_real.detach(), "d_fake": d_fake.detach(), "wdist": (d_real - d_fake).detach()}
    if args.constraint == "gp":
        gp = gradient_penalty(d, real_a, fake_a, args.gp_lambda)
        loss_d = loss_d + gp
        out["gp"] = gp.detach()
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    if args.constraint == "clip":
        clip_weights(d, args.clip)
    out["loss_d"] = loss_d.detach()
    if step % args.n_critic == 0:
        loss_g = -d(aug(g(torch.randn(n, args.nz, device=dev)))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        out["loss_g"] = loss_g.detach()
    return out


def make_optimizers(args, g, d):
    if args.lab == "wgan" and args.constraint == "clip":  # WGAN Alg. 1: momentum hurts with clipping
        return torch.optim.RMSprop(g.parameters(), lr=args.lr_g), torch.optim.RMSprop(d.parameters(), lr=args.lr_d)
    beta2 = 0.9 if args.lab == "wgan" else 0.999
    return (torch.optim.Adam(g.parameters(), lr=args.lr_g, betas=(args.beta1, beta2)),
            torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=(args.beta1, beta2)))


def train(args, device):
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = load_checkpoint(ckpt_path, args.lab) if os.path.exists(ckpt_path) else None
    x_train, y_train, classes = load_data(args, "train", args.image_size, device, args.train_limit)
    channels, n_classes = x_train.shape[1], len(classes)
    if len(x_train) < args.batch_size:
        raise SystemExit(f"error: {len(x_train)} training images, fewer than --batch-size {args.batch_size}")
    g, d = build_models(vars(args), channels, n_classes)
    g, d = g.to(device), d.to(device)
    opt_g, opt_d = make_optimizers(args, g, d)
    gen = torch.Generator().manual_seed(args.seed)
    fixed_z = torch.randn(64, args.nz, generator=gen).to(device)  # the same z every epoch: watch one set of digits evolve
    start_epoch, history, wall = 0, [], 0.0
    if ckpt:
        try:
            g.load_state_dict(ckpt["g"]), d.load_state_dict(ckpt["d"])
            opt_g.load_state_dict(ckpt["opt_g"]), opt_d.load_state_dict(ckpt["opt_d"])
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: {ckpt_path} does not match these flags ({str(e).splitlines()[0]}); use another --out")
        start_epoch, history, wall = ckpt["epoch"], ckpt["history"], ckpt["wall_s"]
        torch.set_rng_state(ckpt["rng"])
        print(f"resuming {args.lab} from {ckpt_path} after epoch {start_epoch}")
    policy = [p for p in args.diffaug.split(",") if p]
    aug = (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)
    iters = len(x_train) // args.batch_size  # drop the last partial batch: BatchNorm stats stay comparable
    step = start_epoch * iters
    total = args.epochs * iters
    keys = ("loss_d", "loss_g", "d_real", "d_fake") + (("wdist", "gp") if args.lab == "wgan" else ())
    sums = {k: torch.zeros((), device=device) for k in keys}
    counts = dict.fromkeys(keys, 0)
    print(f"{args.lab}: {len(x_train)} images {tuple(x_train.shape[1:])}, {iters} iters/epoch, G {n_params(g):,} / D {n_params(d):,} params, {device}, out {args.out}")
    for epoch in range(start_epoch, args.epochs):
        g.train(), d.train()
        t_epoch = t_window = time.time()
        perm = torch.randperm(len(x_train), device=device)
        for i in range(iters):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            real, y = to_float(x_train[idx]), y_train[idx]
            step += 1
            if args.lab == "wgan":
                out = wgan_step(g, d, opt_g, opt_d, real, step, args, aug)
            else:
                out = bce_step(args.lab, g, d, opt_g, opt_d, real, y, step, args, aug)
            for k, v in out.items():
                sums[k] += v
                counts[k] += 1
            if step % args.log_every == 0 or i == iters - 1:
                row = {"iter": step, "epoch": epoch + (i + 1) / iters}
                row.update({k: (sums[k] / max(counts[k], 1)).item() if counts[k] else float("nan") for k in keys})
                if args.lab == "wgan":
                    row["lip_product"], row["lip_bound"] = (t.item() for t in lipschitz_bound(d))
                row["s_per_iter"] = (time.time() - t_window) / max(counts["loss_d"], 1)
                t_window = time.time()
                history.append(row)
                for k in keys:
                    sums[k].zero_()
                    counts[k] = 0
                eta = (total - step) * row["s_per_iter"]
                extra = f" | W {row['wdist']:.3f} GP {row['gp']:.3f} Lip<= {row['lip_bound']:.3g}" if args.lab == "wgan" else ""
                print(f"[{args.lab}] epoch {epoch + 1}/{args.epochs} iter {i + 1}/{iters} | loss_D {row['loss_d']:.3f} loss_G {row['loss_g']:.3f} "
                      f"| D(x) {row['d_real']:.3f} D(G(z)) {row['d_fake']:.3f}{extra} | {row['s_per_iter']:.3f} s/it | ETA {fmt_time(eta)}", flush=True)
        wall += time.time() - t_epoch
        save_grid(sample(g, fixed_z, fixed_labels(64, n_classes, device) if args.lab == "cdcgan" else None), os.path.join(args.out, f"samples_epoch{epoch + 1:02d}.png"))
        write_csv(os.path.join(args.out, "metrics.csv"), history)
        plot_curves(history, args.lab, os.path.join(args.out, "curves.png"))
        state = {"lab": args.lab, "epoch": epoch + 1, "args": vars(args), "g": g.state_dict(), "d": d.state_dict(),
                 "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "history": history, "wall_s": wall,
                 "rng": torch.get_rng_state(), "channels": channels, "classes": classes, "command": command_line()}
        atomic_save(ckpt_path, lambda tmp: torch.save(state, tmp))
    if ckpt and start_epoch >= args.epochs:
        print(f"{ckpt_path} already holds {start_epoch} epochs; writing the outputs again")
    cfg = dict(vars(args), channels=channels, classes=classes)
    finish_run(cfg, g, device, history, wall, args)


def finish_run(cfg, g, device, history, wall, args):
    """End-of-run outputs shared by a lab and `evaluate`: interpolation strip, class grid,
    metrics (eval.csv) and summary.json."""
    out = cfg["out"]
    interpolate_strip(g, cfg, device, os.path.join(out, "interpolation.png"), args.seed, getattr(args, "steps", 11))
    if cfg["lab"] == "cdcgan":
        save_class_grid(g, cfg, device, os.path.join(out, "class_grid.png"), args.seed)
    metrics = evaluate(cfg, g, device, args) if args.eval_samples > 0 else []
    if metrics:
        write_csv(os.path.join(out, "eval.csv"), metrics)
    summary = {"lab": cfg["lab"], "command": cfg.get("command", command_line()), "last_command": command_line(), "device": str(device),
               "threads": torch.get_num_threads(), "train_wall_s": round(wall, 1),
               "iterations": history[-1]["iter"] if history else 0, "epochs": cfg["epochs"],
               "s_per_iter": round(sum(r["s_per_iter"] for r in history[-10:]) / max(len(history[-10:]), 1), 4),
               "final": history[-1] if history else {}, "metrics": metrics,
               "args": {k: v for k, v in cfg.items() if k != "classes"}}
    atomic_save(os.path.join(out, "summary.json"), lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    print(f"wrote {out}/ (train wall time {fmt_time(wall)})")


# ----------------------------------------------------------------------------- sampling
def fixed_labels(n, n_classes, device):
    return torch.arange(n, device=device) % n_classes


@torch.no_grad()
def sample(g, z, y=None):
    # eval(): BatchNorm uses its running statistics, so a sample does not depend on which
    # other z share its batch (an interpolation strip would otherwise drift with the batch)
    g.eval()
    ys = y.split(1000) if y is not None else [None] * len(z.split(1000))
    x = torch.cat([g(zc, yc) for zc, yc in zip(z.split(1000), ys)])
    g.train()
    return x


def save_grid(x, path, nrow=8):
    atomic_save(path, lambda tmp: save_image(x * 0.5 + 0.5, tmp, nrow=nrow, padding=2, format="png"))


def interpolate_strip(g, cfg, device, path, seed, steps):
    gen = torch.Generator().manual_seed(seed + 1)
    z1, z2 = torch.randn(2, 1, cfg["nz"], generator=gen).to(device)
    alpha = torch.linspace(0, 1, steps, device=device)[:, None]
    z = alpha * z1 + (1 - alpha) * z2
    y = torch.full((steps,), int(torch.randint(0, len(cfg["classes"]), (1,), generator=gen)), device=device) if cfg["lab"] == "cdcgan" else None
    save_grid(sample(g, z, y), path, nrow=steps)


def save_class_grid(g, cfg, device, path, seed, n_z=8):
    """Rows: the classes; columns: fixed noise vectors. z carries the style, y the class."""
    k = len(cfg["classes"])
    z = torch.randn(n_z, cfg["nz"], generator=torch.Generator().manual_seed(seed + 2)).to(device)
    y = torch.arange(k, device=device).repeat_interleave(n_z)
    save_grid(sample(g, z.repeat(k, 1), y), path, nrow=n_z)


# ----------------------------------------------------------------------------- metrics
def train_classifier(args, device, path):
    """The metric network, trained once on the data's own labels and cached at `path`."""
    x, y, classes = load_data(args, "train", CLASSIFIER_SIZE, device)
    x_test, y_test, _ = load_data(args, "test", CLASSIFIER_SIZE, device)
    torch.manual_seed(args.seed)
    net = Classifier(x.shape[1], len(classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    epochs = args.epochs if args.lab == "classifier" else 2
    t0 = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), device=device)
        for idx in perm.split(128):
            loss = F.cross_entropy(net(to_float(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(net, x_test, y_test)
        print(f"[classifier] epoch {epoch + 1}/{epochs} | test accuracy {acc:.4f} | {fmt_time(time.time() - t0)}", flush=True)
    blob = {"state": net.state_dict(), "channels": x.shape[1], "classes": classes, "test_acc": acc, "data": args.data}
    atomic_save(path, lambda tmp: torch.save(blob, tmp))
    return net.eval()


@torch.no_grad()
def accuracy(net, x, y):
    net.eval()
    correct = sum((net(to_float(xc)).argmax(1) == yc).sum() for xc, yc in zip(x.split(1000), y.split(1000)))
    net.train()
    return (correct / len(x)).item()


def get_classifier(args, device, channels):
    path = args.classifier or os.path.join(args.cache_dir, "classifier_" + re.sub(r"\W+", "_", os.path.abspath(args.data) if os.path.isdir(args.data) else args.data).strip("_") + ".pt")
    if os.path.exists(path):
        blob = torch.load(path, map_location=device)
        if blob["channels"] == channels:
            net = Classifier(blob["channels"], len(blob["classes"])).to(device)
            net.load_state_dict(blob["state"])
            return net.eval(), path
        print(f"{path} was trained on {blob['channels']}-channel images; training a new one")
    print(f"training the metric classifier -> {path}")
    return train_classifier(args, device, path), path


@torch.no_grad()
def features(net, x_uint8_or_float):
    x = x_uint8_or_float
    return torch.cat([net(to_float(c) if c.dtype == torch.uint8 else c, features=True) for c in x.split(1000)]).double().cpu()


def psd_sqrt(m):
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(feat_a, feat_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) in float64 (the FID formula,
    Heusel et al., 2017). The symmetric product has the same trace root as (S_a S_b)^1/2 and is
    PSD, so eigh replaces scipy's sqrtm."""
    a, b = feat_a.double(), feat_b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum().item() + (cov_a.trace() + cov_b.trace() - 2 * tr_covmean).item()


def knn_radii(feats, k):
    # distance to the k-th nearest other point; column 0 of topk is the point itself
    return torch.cat([torch.cdist(c, feats).topk(k + 1, largest=False).values[:, k] for c in feats.split(1000)])


def coverage(queries, refs, radii):
    """Fraction of queries inside the union of balls B(ref, radius) (the k-NN manifold estimate)."""
    return torch.cat([(torch.cdist(c, refs) <= radii[None]).any(1) for c in queries.split(1000)]).double().mean().item()


def precision_recall(real, fake, k=3):
    """Kynkäänniemi et al., 2019 (k = 3): precision = share of fakes inside the real manifold,
    recall = share of reals inside the fake manifold."""
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def evaluate(cfg, g, device, args):
    """FID / precision / recall of generated vs real test images, and train vs test as the floor."""
    t0 = time.time()
    x_test, y_test, _ = load_data(args, "test", CLASSIFIER_SIZE, device)
    x_train, _, _ = load_data(args, "train", CLASSIFIER_SIZE, device)
    net, path = get_classifier(args, device, cfg["channels"])
    n = min(args.eval_samples, len(x_test), len(x_train))
    gen = torch.Generator().manual_seed(args.seed + 3)
    pick = lambda m: torch.randperm(m, generator=gen)[:n].to(device)  # noqa: E731
    f_test = features(net, x_test[pick(len(x_test))])
    real_train = x_train[pick(len(x_train))]
    f_train = features(net, real_train)
    z = torch.randn(n, cfg["nz"], generator=gen).to(device)
    y = fixed_labels(n, len(cfg["classes"]), device) if cfg["lab"] == "cdcgan" else None
    fake = sample(g, z, y)
    f_fake = features(net, fake)
    rows = []
    for name, f, x in (("generated vs test", f_fake, fake), ("train vs test (floor)", f_train, real_train)):
        p, r = precision_recall(f_test, f)
        # the class mix the classifier sees: a GAN that drops digits (mode collapse) shows a
        # share near 0 for some class; real MNIST has 9-11 % each
        with torch.no_grad():
            pred = torch.cat([net(to_float(c) if c.dtype == torch.uint8 else c).argmax(1) for c in x.split(1000)])
        share = torch.bincount(pred, minlength=len(cfg["classes"])).double() / len(pred)
        rows.append({"comparison": name, "n": n, "fid": round(frechet_distance(f, f_test), 4), "precision": round(p, 4), "recall": round(r, 4),
                     "class_share_min": round(share.min().item(), 4), "class_share_max": round(share.max().item(), 4)})
    rows[1]["classifier_test_acc"] = round(accuracy(net, x_test, y_test), 4)
    if y is not None:
        with torch.no_grad():
            pred = torch.cat([net(c).argmax(1) for c in fake.split(1000)])
        rows[0]["cond_acc"] = round((pred == y).double().mean().item(), 4)
    for r in rows:
        print(f"[evaluate] {r['comparison']:<22} n={n} FID {r['fid']:.3f} precision {r['precision']:.3f} recall {r['recall']:.3f} "
              f"| class share {r['class_share_min']:.3f}-{r['class_share_max']:.3f}"
              + (f" | classifier acc on samples vs their labels {r['cond_acc']:.3f}" if "cond_acc" in r else "")
              + (f" | classifier test acc {r['classifier_test_acc']:.4f}" if "classifier_test_acc" in r else ""))
    print(f"[evaluate] feature net {path}; {fmt_time(time.time() - t0)}")
    return rows


# ----------------------------------------------------------------------------- outputs
def atomic_save(path, write):
    """write(tmp) then os.replace: an interrupted run never leaves a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(path, rows):
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    atomic_save(path, write)


def plot_curves(history, lab, path):
    it = [r["iter"] for r in history]
    panels = [("loss", ("loss_d", "loss_g")), ("D output (mean)", ("d_real", "d_fake"))]
    if lab == "wgan":
        panels = [("loss", ("loss_d", "loss_g")), ("critic output (mean)", ("d_real", "d_fake")),
                  ("W estimate / GP", ("wdist", "gp")), ("Lipschitz upper bound (log)", ("lip_product", "lip_bound"))]
    labels = {"loss_d": "loss(D)", "loss_g": "loss(G)", "d_real": "D(x)", "d_fake": "D(G(z))", "wdist": "D(x) - D(G(z))",
              "gp": "gradient penalty", "lip_product": "prod ||W_i||_2 (reshaped)", "lip_bound": "with conv overlap factor"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            ax.plot(it, [r.get(k, float("nan")) for r in history], label=labels[k])
        if title.startswith("Lipschitz"):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def command_line():
    return " ".join(["python"] + sys.argv)


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def load_checkpoint(path, lab=None):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("lab") not in LABS:
        raise SystemExit(f"error: {path} is not a gan_labs.py checkpoint")
    if lab is not None and ckpt["lab"] != lab:
        raise SystemExit(f"error: {path} is a checkpoint of the {ckpt['lab']} lab, not {lab}; use another --out")
    return ckpt


def run_from_checkpoint(args, device):
    """`evaluate` and `interpolate`: rebuild G from the run's saved flags."""
    ckpt = load_checkpoint(os.path.join(args.out, "checkpoint.pt"))
    cfg = dict(ckpt["args"], out=args.out, channels=ckpt["channels"], classes=ckpt["classes"], command=ckpt.get("command", ""))
    g, _ = build_models(cfg, cfg["channels"], len(cfg["classes"]))
    g.load_state_dict(ckpt["g"])
    g.to(device)
    for key in ("data", "data_root"):  # the real images the run was trained on
        setattr(args, key, cfg[key])
    if args.lab == "interpolate":
        path = os.path.join(args.out, "interpolation.png")
        interpolate_strip(g, cfg, device, path, args.seed, args.steps)
        print(f"wrote {path}")
    else:
        finish_run(cfg, g, device, ckpt["history"], ckpt["wall_s"], args)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    try:
        if args.lab in LABS:
            train(args, device)
        elif args.lab == "classifier":
            x, _, _ = load_split(args, "train")
            net, path = get_classifier(args, device, x.shape[1])
            print(f"classifier {path}")
        else:
            run_from_checkpoint(args, device)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: every file in the run folder is complete; the checkpoint holds the last finished epoch")


if __name__ == "__main__":
    main()
