"""The GAN labs: DCGAN, conditional DCGAN, the MLP ("vanilla") GAN and WGAN, with offline metrics.

Adversarial regularization reuses the GAN game; this script teaches the game first, as
pytorch/examples dcgan/main.py does, plus resumable atomic checkpoints, metrics and one-line
errors. The lab handouts are "seed 003" (DCGAN, cDCGAN) and "seed 004" (MLP GAN, WGAN).
  dcgan      DCGAN (Radford et al., 2016): BCE game, Adam 2e-4, beta1 0.5, batch 128, nz 100,
             ngf = ndf = 32, N(0, 0.02) init, 32x32 (or 64x64); BatchNorm after D's first conv
             as in seed 003 (--no-first-bn: pytorch/examples' D).
  cdcgan     conditional DCGAN (Mirza & Osindero, 2014): one-hot y joins z in G and x in D.
  vanilla    seed 004's MLP GAN: 4 linear layers each side, LeakyReLU(0.2), dropout in D, 28x28.
  wgan       WGAN (Arjovsky et al., 2017): --constraint clip | gp (Gulrajani et al., 2017) | none;
             --critic conv|mlp and --generator dcgan|mlp chosen independently.
  classifier the small CNN whose 128-d penultimate layer is the metrics' feature space.
Every lab ends with Frechet distance (the FID formula) and k-NN precision / recall (Kynkaanniemi
et al., 2019) of samples vs test images, next to train vs test (the floor). nz = 100 as in the
DCGAN paper and pytorch/examples (seed 003 names both 100 and 1000). --g-every and --n-critic
count D steps, not epochs.

    python gan_labs.py dcgan --data ~/data/mnist          # seed 003's setting: 5 epochs
    python gan_labs.py wgan --generator mlp --data ~/data/mnist    # seed 004's conv critic
    python gan_labs.py dcgan --data ~/data/mnist --epochs 1 --threads 1 --out runs/gan/quick

Reads   --data mnist | cifar10 (torchvision download) or PATH/{train,test}/<class>/*.png|jpg.
Writes  in --out (default runs/gan/<data>/<lab>[_<flag>-<value>...]): per epoch samples_epochNN.png
        (64 samples of one fixed z), interpolation_epochNN.png, metrics.csv, curves.png and
        checkpoint.pt (resumed when present; on a finished run the command evaluates again); at
        the end eval.csv, summary.json, class_grid.png (cdcgan); the metric net in --cache-dir.
"""
import argparse
import functools
import json
import math
import os
import pathlib
import re
import sys
import time

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

LABS = ("dcgan", "cdcgan", "vanilla", "wgan")
CKPT_FORMAT = "gan_labs/2"  # older checkpoints (other layer names) are refused with one line
CLASSIFIER_SIZE = 32  # the metric network sees every image at 32x32, whatever the lab's size
# flags that do not change what a run trains: not in the run folder's name, free to change on resume
RUN_FLAGS = {"out", "epochs", "data_root", "cache_dir", "device", "threads", "eval_samples",
             "log_every"}


# ----------------------------------------------------------------------------- arguments
def add_train_args(p, lab):
    bce = lab != "wgan"
    p.add_argument("--out", default="", help="run folder (default: runs/gan/<data>/<lab>_<flags>)")
    p.add_argument("--epochs", type=int, default=5, help="seed 003: 5; more resumes a finished run")
    p.add_argument("--image-size", type=int, default=None, help="pixels; DCGAN nets: 32 (seed "
                   "003) or 64; default 32 with a DCGAN net, else 28 (seed 004)")
    p.add_argument("--batch-size", type=int, default=128 if bce else 64,
                   help="seed 003: 128; WGAN-GP Alg. 1: 64")
    p.add_argument("--nz", type=int, default=100, help="latent size (DCGAN paper: 100)")
    p.add_argument("--ngf", type=int, default=32, help="DCGAN generator width (seed 003: 32)")
    p.add_argument("--ndf", type=int, default=32, help="DCGAN discriminator width (seed 003: 32)")
    p.add_argument("--lr-g", type=float, default=None,
                   help="G's learning rate (default 2e-4; WGAN: 5e-5 with clip, else 1e-4)")
    p.add_argument("--lr-d", type=float, default=None, help="D's learning rate (same defaults)")
    p.add_argument("--beta1", type=float, default=0.5 if bce else 0.0,
                   help="Adam beta1 of both optimizers (DCGAN: 0.5; WGAN-GP: 0)")
    p.add_argument("--init", choices=["dcgan", "default"], default="default" if lab in ("vanilla",
                   "wgan") else "dcgan", help="dcgan: conv weights N(0, 0.02), BatchNorm scales "
                   "N(1, 0.02) (DCGAN paper); default: PyTorch's")
    p.add_argument("--diffaug", default="", help="DiffAugment policies: translation,cutout,color")
    p.add_argument("--log-every", type=int, default=25, help="steps per progress line and point")
    p.add_argument("--eval-samples", type=int, default=10000,
                   help="images per set for FID / precision / recall (0 = no metrics)")
    if bce:
        p.add_argument("--g-loss", choices=["non-saturating", "saturating"],
                       default="non-saturating",
                       help="G maximizes log D(G(z)), or minimizes log(1 - D(G(z))) (minimax)")
        p.add_argument("--g-every", type=int, default=1, metavar="N",
                       help="one G step every N D steps (counts D steps, not epochs)")
    if lab in ("dcgan", "cdcgan"):
        p.set_defaults(generator="dcgan", discriminator="dcgan")
        p.add_argument("--no-first-bn", dest="first_bn", action="store_false",
                       help="no BatchNorm after D's first conv (pytorch/examples; seed 003: BN)")
    if lab == "cdcgan":
        p.add_argument("--no-label-in-d", action="store_true", help="D sees x only; G keeps y")
    if lab == "vanilla":
        p.set_defaults(generator="mlp", discriminator="mlp")
        p.add_argument("--d-dropout", type=float, default=0.3,
                       help="dropout after D's hidden layers (seed 004's base run: 0)")
    if lab == "wgan":
        p.add_argument("--constraint", choices=["clip", "gp", "none"], default="gp",
                       help="how the critic is kept Lipschitz")
        p.add_argument("--critic", dest="discriminator", choices=["conv", "mlp"], default="conv",
                       help="conv: 4 strided convs, 16-128 filters; mlp: vanilla's D, linear out")
        p.add_argument("--generator", choices=["dcgan", "mlp"], default="dcgan",
                       help="the DCGAN generator or the vanilla lab's MLP (seed 004)")
        p.add_argument("--clip", type=float, default=0.01, help="c of weight clipping (WGAN: 0.01)")
        p.add_argument("--gp-lambda", type=float, default=10.0, help="gradient penalty weight")
        p.add_argument("--n-critic", dest="g_every", type=int, default=5, metavar="N",
                       help="one G step every N critic steps (WGAN: 5; counts D steps)")


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="lab", required=True)
    for name in LABS + ("classifier",):
        p = sub.add_parser(name, formatter_class=fmt)
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help="auto = cuda if available, else mps, else cpu")
        p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
        p.add_argument("--cache-dir", default="runs/gan/cache", help="metric classifiers")
        p.add_argument("--data", default="mnist",
                       help="mnist | cifar10 (torchvision) | PATH of an ImageFolder: train/, test/")
        p.add_argument("--data-root", default="data", help="torchvision's folder of the datasets")
        p.add_argument("--seed", type=int, default=0, help="init, batches, noise, fixed samples")
        if name == "classifier":
            p.add_argument("--epochs", type=int, default=2,
                           help="classifier epochs (a cached classifier is reused: delete it)")
        else:
            add_train_args(p, name)
    args = parser.parse_args(argv)
    if args.lab in LABS:
        check_lab_args(sub.choices[args.lab], args)
    return args


def check_lab_args(p, args):
    for name in ("epochs", "batch_size", "nz", "ngf", "ndf", "log_every", "g_every"):
        if getattr(args, name, 1) < 1:
            flag = "--g-every / --n-critic" if name == "g_every" else "--" + name.replace("_", "-")
            p.error(f"{flag} must be >= 1, got {getattr(args, name)}")
    if args.eval_samples < 0 or not 0 <= getattr(args, "d_dropout", 0) < 1:
        p.error("--eval-samples must be >= 0 and --d-dropout in [0, 1)")
    dcgan_net = "dcgan" in (args.generator, args.discriminator)
    size = args.image_size or (32 if dcgan_net else 28)
    if dcgan_net and size not in (32, 64):
        p.error(f"--image-size must be 32 or 64 for the DCGAN nets, got {size}")
    if size < (16 if args.discriminator == "conv" else 8):
        p.error(f"--image-size {size} is too small (conv critic: >= 16, MLP nets: >= 8)")
    bad = set(filter(None, args.diffaug.split(","))) - {"translation", "cutout", "color"}
    if bad:
        p.error(f"--diffaug: unknown policy {sorted(bad)}; choose from translation,cutout,color")
    if not args.out:  # the flags that differ from the lab's defaults name the folder
        name = args.lab
        for key, value in vars(args).items():
            if key not in RUN_FLAGS | {"lab", "data"} and value != p.get_default(key):
                name += "_" + key.replace("_", "-") + ("" if value is True else f"-{value}")
        args.out = os.path.join("runs", "gan", os.path.basename(os.path.normpath(args.data)), name)
    lab_lr = 2e-4 if args.lab != "wgan" else 5e-5 if args.constraint == "clip" else 1e-4
    args.lr_g = lab_lr if args.lr_g is None else args.lr_g
    args.lr_d = lab_lr if args.lr_d is None else args.lr_d
    args.image_size = size


def pick_device(name):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise SystemExit(f"error: --device {name} asked for, but torch cannot use it here "
                         f"(try --device cpu)")
    return torch.device(name)


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)  # a run reads each split up to three times: decode it once
def load_split(data, data_root, split):
    """(uint8 images N x C x H x W at the data's own size, int64 labels, class names)."""
    if data in ("mnist", "cifar10"):
        dataset = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}
        try:
            ds = dataset[data](data_root, train=split == "train", download=True)
        except Exception as e:  # offline: URLError, RuntimeError, ... all mean "could not download"
            raise SystemExit(f"error: cannot download {data} into {data_root} "
                             f"({type(e).__name__}); pass an ImageFolder: --data PATH")
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)
    split_dir = os.path.join(data, split)
    try:
        folder = torchvision.datasets.ImageFolder(split_dir)
    except FileNotFoundError:
        raise SystemExit(f"error: no images in {split_dir}/<class>/: --data PATH must hold "
                         f"train/ and test/ class folders of .png/.jpg files")
    print(f"decoding the {len(folder.samples)} images of {split_dir}", flush=True)
    with PIL.Image.open(folder.samples[0][0]) as first:  # grayscale trees (MNIST) stay 1-channel
        mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
    images = []
    for path, _ in folder.samples:
        try:
            with PIL.Image.open(path) as img:
                img = torchvision.transforms.functional.pil_to_tensor(img.convert(mode))
        except OSError as e:  # PIL's UnidentifiedImageError is one
            raise SystemExit(f"error: cannot read image {path} ({type(e).__name__})")
        if images and img.shape != images[0].shape:  # odd-sized images: match the first one
            img = resize_uint8(img[None], images[0].shape[-1])[0]
        images.append(img)
    return torch.stack(images), torch.tensor(folder.targets), folder.classes


def resize_uint8(x, size):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False) for c in x.split(8192)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def load_data(args, split, size, device):
    x, y, classes = load_split(args.data, args.data_root, split)
    return resize_uint8(x, size).to(device), y.to(device), classes


def to_float(x_uint8):
    return x_uint8.float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1], the range of G's tanh


def diff_augment(x, policy):
    """DiffAugment (Zhao et al., 2020): random translation (1/8 of the side, zero fill), cutout
    (a square of half the side) and colour jitter, differentiable in x: G learns through it."""
    n, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(n, device=dev)[:, None, None]
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
            gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev),
                                    indexing="ij")
            gy, gx = (gy + ty + 1).clamp(0, h + 1), (gx + tx + 1).clamp(0, w + 1)
            x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[rows, gy, gx].permute(0, 3, 1, 2)
        elif name == "cutout":
            ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
            oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=dev)
            ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=dev)
            gy, gx = torch.meshgrid(torch.arange(ch, device=dev), torch.arange(cw, device=dev),
                                    indexing="ij")
            gy, gx = (gy + oy - ch // 2).clamp(0, h - 1), (gx + ox - cw // 2).clamp(0, w - 1)
            mask = torch.ones(n, h, w, device=dev)
            mask[rows, gy, gx] = 0
            x = x * mask.unsqueeze(1)
    return x


# ----------------------------------------------------------------------------- models
# Every net is one nn.Sequential from a flat tensor or an image; S is the image side. The cDCGAN's
# label enters through with_label(), outside the nets.
def dcgan_generator(nz, ngf, channels, size):
    """pytorch/examples' generator; at S = 32 its first block (8 ngf, 4 x 4) is left out."""
    big = [nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8),
           nn.ReLU(True),
           # state size: (ngf*8) x 4 x 4
           nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False)]
    return nn.Sequential(
        nn.Unflatten(1, (nz, 1, 1)),
        # input: nz x 1 x 1   (nz includes the cDCGAN's one-hot label)
        *(big if size == 64 else [nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False)]),
        nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        # state size: (ngf*4) x S/8 x S/8   (4 x 4 at S = 32)
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        # state size: (ngf*2) x S/4 x S/4
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf), nn.ReLU(True),
        # state size: (ngf) x S/2 x S/2
        nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False),
        nn.Tanh(),
        # state size: (channels) x S x S
    )


def dcgan_discriminator(ndf, channels, size, first_bn=True):
    """pytorch/examples' discriminator, with BatchNorm after the first conv too as seed 003 has it
    (first_bn=False: pytorch/examples'); at S = 32 its last block (8 ndf) is left out."""
    big = [nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8),
           nn.LeakyReLU(0.2, inplace=True),
           # state size: (ndf*8) x 4 x 4
           nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False)]
    return nn.Sequential(
        # input: (channels) x S x S   (channels include the cDCGAN's label planes)
        nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf) if first_bn else nn.Identity(), nn.LeakyReLU(0.2, inplace=True),
        # state size: (ndf) x S/2 x S/2
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        # state size: (ndf*2) x S/4 x S/4
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        # state size: (ndf*4) x S/8 x S/8   (4 x 4 at S = 32)
        *(big if size == 64 else [nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False)]),
        nn.Sigmoid(), nn.Flatten(0),
        # output: D(x) in (0, 1), one per image
    )


def mlp_generator(nz, channels, size):
    """Seed 004's generator."""
    return nn.Sequential(
        # input: nz
        nn.Linear(nz, 256), nn.LeakyReLU(0.2, inplace=True),
        nn.Linear(256, 512), nn.LeakyReLU(0.2, inplace=True),
        nn.Linear(512, 1024), nn.LeakyReLU(0.2, inplace=True),
        nn.Linear(1024, channels * size * size), nn.Tanh(),
        nn.Unflatten(1, (channels, size, size)),
        # state size: (channels) x S x S
    )


def mlp_discriminator(channels, size, dropout=0.0, sigmoid=True):
    """Seed 004's discriminator; without the sigmoid, a WGAN critic."""
    return nn.Sequential(
        # input: (channels) x S x S, flattened
        nn.Flatten(), nn.Linear(channels * size * size, 1024), nn.LeakyReLU(0.2, inplace=True),
        nn.Dropout(dropout),
        nn.Linear(1024, 512), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
        nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
        nn.Linear(256, 1), nn.Sigmoid() if sigmoid else nn.Identity(), nn.Flatten(0),
        # output: one number per image
    )


def conv_critic(channels, size):
    """Seed 004's convolutional WGAN critic; no BatchNorm (the gradient penalty is per sample)."""
    return nn.Sequential(
        # input: (channels) x S x S
        nn.Conv2d(channels, 16, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 16 x S/2 x S/2
        nn.Conv2d(16, 32, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 32 x S/4 x S/4
        nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 64 x S/8 x S/8
        nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 128 x S/16 x S/16   (rounded down: 1 x 1 at S = 28, 2 x 2 at S = 32)
        nn.Flatten(), nn.Linear(128 * (size // 16) ** 2, 1), nn.Flatten(0),
    )


def with_label(t, y, n_classes):
    """cDCGAN: the one-hot label appended to z (N x nz) or, as constant planes, to images."""
    if y is None:
        return t
    onehot = F.one_hot(y, n_classes).float()
    if t.dim() == 4:
        onehot = onehot[:, :, None, None].expand(-1, -1, *t.shape[2:])
    return torch.cat([t, onehot], 1)


def dcgan_init(m):
    # DCGAN §4: weights from N(0, 0.02); BatchNorm scales around 1 as in pytorch/examples, so the
    # first forward pass does not squash every activation to ~0
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_models(args):
    """G and D from the run's flags (also how a checkpoint rebuilds its nets)."""
    k = len(args.classes) if args.lab == "cdcgan" else 0  # the cDCGAN's label inputs
    k_d = 0 if args.lab != "cdcgan" or args.no_label_in_d else k
    size, channels = args.image_size, args.channels
    if args.generator == "dcgan":
        g = dcgan_generator(args.nz + k, args.ngf, channels, size)
    else:
        g = mlp_generator(args.nz, channels, size)
    if args.discriminator == "dcgan":
        d = dcgan_discriminator(args.ndf, channels + k_d, size, args.first_bn)
    elif args.discriminator == "conv":
        d = conv_critic(channels, size)
    else:
        d = mlp_discriminator(channels, size, getattr(args, "d_dropout", 0.0), args.lab != "wgan")
    if args.init == "dcgan":
        g.apply(dcgan_init)
        d.apply(dcgan_init)
    return g, d


def metric_classifier(channels, n_classes):
    """The metrics' network: net[0] maps a 32 x 32 image to the 128-d feature space, net[1] to
    class logits."""
    return nn.Sequential(nn.Sequential(
        # input: (channels) x 32 x 32
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        # state size: 16 x 16 x 16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        # state size: 32 x 8 x 8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        # state size: 64 x 4 x 4
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        # state size: 128, the feature space
    ), nn.Linear(128, n_classes))


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
                overlap = (math.ceil(m.kernel_size[0] / m.stride[0])
                           * math.ceil(m.kernel_size[1] / m.stride[1]))
            bound = bound * sigma * math.sqrt(overlap)
    return product, bound


# ----------------------------------------------------------------------------- one step
def log_clamped(p):
    """log p, at least -100, as nn.BCELoss computes it: a saturated D gives a large, finite loss.
    The inner `where` keeps the gradient finite where p = 0 (log's gradient there is inf, and the
    clamp's 0 times inf is NaN); a NaN p stays NaN, so a diverged run is still caught."""
    tiny = p <= math.exp(-100)
    return torch.where(tiny, -100.0, torch.log(torch.where(tiny, 1.0, p)))


def gan_step(args, g, d, opt_g, opt_d, real, y, step, aug):
    """One D step and, every --g-every D steps, one G step: the BCE game as pytorch/examples plays
    it, or WGAN / WGAN-GP (their Alg. 1). Returns detached device tensors (no host sync here)."""
    n, k, wgan = real.shape[0], len(args.classes), args.lab == "wgan"
    y_fake = torch.randint(0, k, (n,), device=real.device) if args.lab == "cdcgan" else None
    fake = g(with_label(torch.randn(n, args.nz, device=real.device), y_fake, k))
    if args.lab != "cdcgan" or args.no_label_in_d:
        y = y_fake = None  # from here on: the labels D sees
    real_a, fake_a = with_label(aug(real), y, k), with_label(aug(fake.detach()), y_fake, k)
    d_real, d_fake = d(real_a), d(fake_a)
    if wgan:  # (1) update the critic: maximize D(x) - D(G(z)) [- lambda (||grad D(x_hat)|| - 1)^2]
        loss_d = d_fake.mean() - d_real.mean()
        gp = gradient_penalty(d, real_a, fake_a, args.gp_lambda) if args.constraint == "gp" else 0
        loss_d = loss_d + gp
    else:  # (1) update D: maximize log D(x) + log(1 - D(G(z)))
        loss_d = -(log_clamped(d_real).mean() + log_clamped(1 - d_fake).mean())
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    if wgan and args.constraint == "clip":
        clip_weights(d, args.clip)
    out = {"loss_d": loss_d.detach(), "d_real": d_real.detach().mean(),
           "d_fake": d_fake.detach().mean()}
    if wgan:
        out["wdist"] = out["d_real"] - out["d_fake"]
        if args.constraint == "gp":
            out["gp"] = gp.detach()
    # (2) update G once every --g-every D steps: maximize log D(G(z)) (non-saturating), or
    # minimize log(1 - D(G(z))) (saturating: the minimax game's own loss); WGAN: maximize D(G(z))
    if step % args.g_every == 0:
        if wgan:  # WGAN Alg. 1 draws a fresh batch of z for G's step
            fake = g(torch.randn(n, args.nz, device=real.device))
        d_gen = d(with_label(aug(fake), y_fake, k))
        if wgan:
            loss_g = -d_gen.mean()
        elif args.g_loss == "non-saturating":
            loss_g = -log_clamped(d_gen).mean()
        else:
            loss_g = log_clamped(1 - d_gen).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        out["loss_g"] = loss_g.detach()
    return out


def make_optimizers(args, g, d):
    if args.lab == "wgan" and args.constraint == "clip":  # WGAN Alg. 1: momentum hurts clipping
        return (torch.optim.RMSprop(g.parameters(), lr=args.lr_g),
                torch.optim.RMSprop(d.parameters(), lr=args.lr_d))
    betas = (args.beta1, 0.9 if args.lab == "wgan" else 0.999)
    return (torch.optim.Adam(g.parameters(), lr=args.lr_g, betas=betas),
            torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=betas))


# ----------------------------------------------------------------------------- training
def train(args, device):
    """A lab end to end: data, nets, resume, the epochs, the end-of-run outputs."""
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = load_checkpoint(ckpt_path, args) if os.path.exists(ckpt_path) else None
    x_train, y_train, args.classes = load_data(args, "train", args.image_size, device)
    args.channels = x_train.shape[1]
    if len(x_train) < args.batch_size:
        raise SystemExit(f"error: {len(x_train)} training images, fewer than --batch-size "
                         f"{args.batch_size}")
    torch.manual_seed(args.seed)
    g, d = (net.to(device) for net in build_models(args))
    opt_g, opt_d = make_optimizers(args, g, d)
    start_epoch, history, wall = 0, [], 0.0
    if ckpt:
        for name, obj in (("g", g), ("d", d), ("opt_g", opt_g), ("opt_d", opt_d)):
            obj.load_state_dict(ckpt[name])
        start_epoch, history, wall = ckpt["epoch"], ckpt["history"], ckpt["wall_s"]
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        print(f"resuming {args.lab} from {ckpt_path} after epoch {start_epoch}")
    os.makedirs(args.out, exist_ok=True)
    n_g, n_d = (sum(p.numel() for p in net.parameters()) for net in (g, d))
    print(f"{args.lab}: {len(x_train)} images {tuple(x_train.shape[1:])}, G {n_g:,} / D {n_d:,} "
          f"parameters, {device}, out {args.out}")
    policy = [p for p in args.diffaug.split(",") if p]
    aug = (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        history += train_epoch(args, epoch, g, d, opt_g, opt_d, x_train, y_train, aug)
        wall += time.time() - t0
        save_epoch(args, epoch, g, d, opt_g, opt_d, history, wall, device)
    if start_epoch >= args.epochs:
        print(f"{ckpt_path} already holds {start_epoch} epochs; writing the outputs again")
    finish_run(args, g, device, history, wall)


def train_epoch(args, epoch, g, d, opt_g, opt_d, x_train, y_train, aug):
    """One pass over the shuffled training set; returns the log rows (means over --log-every)."""
    iters = len(x_train) // args.batch_size  # no partial last batch: BatchNorm stats comparable
    perm = torch.randperm(len(x_train), device=x_train.device)
    sums, rows, t_log = {}, [], time.time()
    for i in range(iters):
        step = epoch * iters + i + 1
        idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
        out = gan_step(args, g, d, opt_g, opt_d, to_float(x_train[idx]), y_train[idx], step, aug)
        for key, value in out.items():  # summed on the device; read once per log step
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value, count + 1)
        if step % args.log_every == 0 or i == iters - 1:
            seconds = (time.time() - t_log) / sums["loss_d"][1]
            rows.append(log_row(args, d, sums, step, epoch + (i + 1) / iters, seconds,
                                seconds * (args.epochs * iters - step)))
            sums, t_log = {}, time.time()
    return rows


def log_row(args, d, sums, step, epoch, s_per_iter, eta):
    """The means since the last row, one progress line; a non-finite loss ends the run here."""
    keys = ["loss_d", "loss_g", "d_real", "d_fake"]
    keys += ["wdist", "gp"] if args.lab == "wgan" else []
    row = {"iter": step, "epoch": epoch}
    for key in keys:  # nan: no G step in this window (--g-every, --n-critic), or no penalty
        row[key] = (sums[key][0] / sums[key][1]).item() if key in sums else float("nan")
    bad = [key for key in keys if key in sums and not math.isfinite(row[key])]
    if bad:
        done = math.ceil(epoch) - 1
        kept = f"the checkpoint keeps epoch {done}" if done else "no checkpoint was written"
        fix = " or --constraint gp" if args.lab == "wgan" and args.constraint == "none" else ""
        raise SystemExit(f"error: {bad[0]} became {row[bad[0]]} in epoch {done + 1} (iteration "
                         f"{step}); stopped, {kept}. Try a lower --lr-d / --lr-g{fix}")
    if args.lab == "wgan":
        row["lip_product"], row["lip_bound"] = (t.item() for t in lipschitz_bound(d))
    row["s_per_iter"] = s_per_iter
    print(f"[{args.lab}] epoch {math.ceil(epoch)}/{args.epochs} iter {step} | " + " ".join(
        f"{k} {v:.3g}" for k, v in row.items() if k not in ("iter", "epoch", "s_per_iter"))
        + f" | {s_per_iter:.3f} s/it | ETA {fmt_time(eta)}", flush=True)
    return row


def save_epoch(args, epoch, g, d, opt_g, opt_d, history, wall, device):
    """This epoch's samples, interpolation strip and curves, then the checkpoint (last: a
    checkpoint of epoch N means every file of epoch N is complete)."""
    z = torch.randn(64, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    y = torch.arange(64, device=device) % len(args.classes) if args.lab == "cdcgan" else None
    save_grid(sample(args, g, z, y), os.path.join(args.out, f"samples_epoch{epoch + 1:02d}.png"))
    save_strip(args, g, device, os.path.join(args.out, f"interpolation_epoch{epoch + 1:02d}.png"))
    write_csv(os.path.join(args.out, "metrics.csv"), history)
    plot_curves(history, args.lab, os.path.join(args.out, "curves.png"))
    ckpt = {"format": CKPT_FORMAT, "epoch": epoch + 1, "args": vars(args), "g": g.state_dict(),
            "d": d.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "history": history, "wall_s": wall, "command": " ".join(["python"] + sys.argv),
            "rng": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    write_atomic(os.path.join(args.out, "checkpoint.pt"), lambda tmp: torch.save(ckpt, tmp))


def finish_run(args, g, device, history, wall):
    """End-of-run outputs (again when a finished run's command runs again): class grid, metrics
    (eval.csv), summary.json."""
    if args.lab == "cdcgan":  # rows: the classes; columns: 8 fixed z (z carries the style)
        k = len(args.classes)
        z = torch.randn(8, args.nz, generator=torch.Generator().manual_seed(args.seed + 2))
        y = torch.arange(k, device=device).repeat_interleave(8)
        save_grid(sample(args, g, z.to(device).repeat(k, 1), y),
                  os.path.join(args.out, "class_grid.png"))
    metrics = evaluate(args, g, device) if args.eval_samples > 0 else []
    if metrics:
        write_csv(os.path.join(args.out, "eval.csv"), metrics)
    last = history[-10:]
    summary = {"lab": args.lab, "command": " ".join(["python"] + sys.argv), "device": str(device),
               "threads": torch.get_num_threads(), "train_wall_s": round(wall, 1),
               "iterations": history[-1]["iter"] if history else 0, "epochs": args.epochs,
               "s_per_iter": round(sum(r["s_per_iter"] for r in last) / max(len(last), 1), 4),
               "final": history[-1] if history else {}, "metrics": metrics, "args": vars(args)}
    text = json.dumps(summary, indent=1)
    path = os.path.join(args.out, "summary.json")
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))
    print(f"wrote {args.out}/ (train wall time {fmt_time(wall)})")


def load_checkpoint(path, args):
    """The checkpoint of the run these flags describe, or one clear line: a damaged file, another
    program's, or a run with another lab, net or learning rate is not resumed."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): it is damaged or not "
                         f"a checkpoint; delete it or use another --out")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint of this version of gan_labs.py; "
                         f"use another --out")
    saved = ckpt["args"]
    for key, value in vars(args).items():
        if key not in RUN_FLAGS and saved.get(key) != value:
            raise SystemExit(f"error: {path} is a run with {key} = {saved.get(key)!r}, not "
                             f"{value!r}; use another --out")
    return ckpt


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(args, g, z, y=None):
    # eval(): BatchNorm uses its running statistics, so a sample does not depend on which
    # other z share its batch (an interpolation strip would otherwise drift with the batch)
    g.eval()
    x = torch.cat([g(with_label(zc, None if y is None else y[i:i + 1000], len(args.classes)))
                   for i, zc in zip(range(0, len(z), 1000), z.split(1000))])
    g.train()
    return x


def save_grid(x, path, nrow=8):
    write_atomic(path, lambda tmp: torchvision.utils.save_image(x * 0.5 + 0.5, tmp, nrow=nrow))


def save_strip(args, g, device, path, steps=11):
    """G(a z1 + (1 - a) z2) for a = 0 ... 1; the same z1, z2 (and class) after every epoch."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    z1, z2 = torch.randn(2, 1, args.nz, generator=gen).to(device)
    alpha = torch.linspace(0, 1, steps, device=device)[:, None]
    y = torch.randint(0, len(args.classes), (1,), generator=gen).to(device).expand(steps)
    save_grid(sample(args, g, alpha * z1 + (1 - alpha) * z2, y if args.lab == "cdcgan" else None),
              path, nrow=steps)


# ----------------------------------------------------------------------------- metrics
def train_classifier(args, device, path):
    """The metric network, trained once on the data's own labels and saved at `path`."""
    x, y, classes = load_data(args, "train", CLASSIFIER_SIZE, device)
    x_test, y_test, _ = load_data(args, "test", CLASSIFIER_SIZE, device)
    torch.manual_seed(args.seed)
    net = metric_classifier(x.shape[1], len(classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    epochs = args.epochs if args.lab == "classifier" else 2
    t0 = time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), device=device).split(128):
            loss = F.cross_entropy(net(to_float(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(net, x_test, y_test)
        print(f"[classifier] epoch {epoch + 1}/{epochs} | test accuracy {acc:.4f} | "
              f"{fmt_time(time.time() - t0)}", flush=True)
    blob = {"state": net.state_dict(), "channels": x.shape[1], "classes": classes, "test_acc": acc}
    os.makedirs(args.cache_dir, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(blob, tmp))
    return net


def accuracy(net, x, y):
    return (features(net, x, logits=True).argmax(1) == y.cpu()).double().mean().item()


def get_classifier(args, device):
    """The cached metric network of --data (trained on first use), or one clear line."""
    key = re.sub(r"\W+", "_", os.path.abspath(args.data) if os.path.isdir(args.data) else args.data)
    path = os.path.join(args.cache_dir, f"classifier_{key.strip('_')}.pt")
    if not os.path.exists(path):
        print(f"training the metric classifier -> {path}")
        return train_classifier(args, device, path), path
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        net = metric_classifier(blob["channels"], len(blob["classes"])).to(device)
        net.load_state_dict(blob["state"])
    except Exception as e:
        raise SystemExit(f"error: {path} is not a metric classifier this script can read "
                         f"({type(e).__name__}); delete it to train a new one")
    if blob["channels"] != args.channels:
        raise SystemExit(f"error: {path} was trained on {blob['channels']}-channel images, these "
                         f"have {args.channels}; delete it to train a new one")
    return net, path


@torch.no_grad()
def features(net, x, logits=False):
    """128-d features (or logits) of uint8 images or of G's float images in [-1, 1], on the CPU in
    float64; images of another size are resized to 32 x 32 first."""
    out = []
    for c in x.split(1000):
        c = to_float(c) if c.dtype == torch.uint8 else c
        if c.shape[-1] != CLASSIFIER_SIZE:
            c = F.interpolate(c, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear",
                              antialias=True, align_corners=False)
        out.append((net if logits else net[0])(c))
    return torch.cat(out).double().cpu()


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
    return (((a.mean(0) - b.mean(0)) ** 2).sum().item()
            + (cov_a.trace() + cov_b.trace() - 2 * tr_covmean).item())


def knn_radii(feats, k):
    # distance to the k-th nearest other point; column 0 of topk is the point itself
    return torch.cat([torch.cdist(c, feats).topk(k + 1, largest=False).values[:, k]
                      for c in feats.split(1000)])


def coverage(queries, refs, radii):
    """Fraction of queries inside the union of balls B(ref, radius) (the k-NN manifold estimate)."""
    return torch.cat([(torch.cdist(c, refs) <= radii[None]).any(1)
                      for c in queries.split(1000)]).double().mean().item()


def precision_recall(real, fake, k=3):
    """Kynkäänniemi et al., 2019 (k = 3): precision = share of fakes inside the real manifold,
    recall = share of reals inside the fake manifold."""
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def evaluate(args, g, device):
    """FID / precision / recall of generated vs real test images, and train vs test as the floor.
    The class shares show mode collapse: a GAN that drops a digit has a share near 0 for it."""
    t0 = time.time()
    x_test, y_test, _ = load_data(args, "test", CLASSIFIER_SIZE, device)
    x_train, _, _ = load_data(args, "train", CLASSIFIER_SIZE, device)
    net, path = get_classifier(args, device)
    n = min(args.eval_samples, len(x_test), len(x_train))
    gen = torch.Generator().manual_seed(args.seed + 3)
    f_test = features(net, x_test[torch.randperm(len(x_test), generator=gen)[:n].to(device)])
    real_train = x_train[torch.randperm(len(x_train), generator=gen)[:n].to(device)]
    z = torch.randn(n, args.nz, generator=gen).to(device)
    y = torch.arange(n, device=device) % len(args.classes) if args.lab == "cdcgan" else None
    fake = sample(args, g, z, y)
    rows = []
    for name, x in (("generated vs test", fake), ("train vs test (floor)", real_train)):
        f, pred = features(net, x), features(net, x, logits=True).argmax(1)
        p, r = precision_recall(f_test, f)
        share = torch.bincount(pred, minlength=len(args.classes)).double() / n
        rows.append({"comparison": name, "n": n, "fid": round(frechet_distance(f, f_test), 4),
                     "precision": round(p, 4), "recall": round(r, 4),
                     "class_share_min": round(share.min().item(), 4),
                     "class_share_max": round(share.max().item(), 4)})
        if y is not None and name.startswith("generated"):  # does the classifier read y back?
            rows[-1]["cond_acc"] = round((pred == y.cpu()).double().mean().item(), 4)
    rows[1]["classifier_test_acc"] = round(accuracy(net, x_test, y_test), 4)
    for r in rows:
        print("[evaluate] " + ", ".join(f"{k} {v}" for k, v in r.items()))
    print(f"[evaluate] feature net {path}; {fmt_time(time.time() - t0)}")
    return rows


# ----------------------------------------------------------------------------- outputs
def write_atomic(path, write):
    """Write a file under a temporary name, then rename it: a Ctrl-C or a kill never leaves half a
    file. `write(tmp)` writes to the name it is given (torch.save, fig.savefig, ...)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"  # keep the extension: savefig and save_image read the format from it
    write(tmp)
    os.replace(tmp, path)


def write_csv(path, rows):
    fields = list(dict.fromkeys(k for r in rows for k in r))  # no value holds a comma
    lines = [fields] + [[r.get(k, "") for k in fields] for r in rows]
    text = "".join(",".join(map(str, line)) + "\n" for line in lines)
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def plot_curves(history, lab, path):
    panels = {"loss": ("loss_d", "loss_g"), "D output (mean)": ("d_real", "d_fake")}
    if lab == "wgan":
        panels.update({"W estimate D(x) - D(G(z)) / GP": ("wdist", "gp"),
                       "Lipschitz bound (log)": ("lip_product", "lip_bound")})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:  # lip_product: prod ||W_i||_2 reshaped; lip_bound: x conv overlap factor
            ax.plot([r["iter"] for r in history], [r[key] for r in history], label=key)
        ax.set(title=title, xlabel="iteration", yscale="log" if "Lipschitz" in title else "linear")
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    try:
        if args.lab in LABS:
            train(args, device)
        else:
            args.channels = load_split(args.data, args.data_root, "train")[0].shape[1]
            print(f"classifier {get_classifier(args, device)[1]}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted: every file in the run folder is complete; the checkpoint "
                         "holds the last finished epoch")


if __name__ == "__main__":
    main()
