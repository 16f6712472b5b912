"""Stage 4 — adversarial regularization of convolution kernels (the paper's Algorithm 1).

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), Algorithm 1, the
experiments and Figures 4, 5, 7, 9, 10. The classifier is trained on 100 CIFAR-10 images (as in
`train_small.py`) while a discriminator D learns to tell kernels of the bank (pretrained models,
`collect_kernels.py`) from the classifier's own kernels. The classifier plays the generator, with
G(z) = z: the "fake" samples are its own current kernels, so the generator's loss reaches its
weights directly.

For every batch of images (Algorithm 1):
    cls_loss  = cross-entropy of the classifier on the batch
    fake      = a random batch of --d-batch kernels of the regularized layer (k x k slices of its
                weight; differentiable), real = a random batch of --d-batch bank kernels
    reg_loss  = -log D(fake)          (non-saturating generator loss: maximize log D(G(z)))
    classifier step on  cls_loss + lam * reg_loss
    D step on  disc_loss = lam * (-log D(real) - log(1 - D(fake.detach())))
With `--layers conv1 conv2` each layer has its own discriminator and bank and the reg losses add
up. lam = 0 trains the baseline with this same code (no discriminator at all).

The discriminator is the authors' notebook's (see KernelDiscriminator), with DCGAN init and its own
Adam (lr 2e-4, weight decay 1e-4, betas (0.5, 0.999)); fake batch 128 of conv1's 192 slices,
real batch 128, lam = 1. --d-input chooses what D sees: the raw kernels (the notebook), or each
kernel standardized to zero mean and unit std (this project's default). Raw bank kernels and a
fresh conv1 differ in scale, and BatchNorm lets the classifier rescale its filters for free, so on
raw kernels D can win, and the generator can answer, on scale alone; standardized kernels leave D
only the shape. README "Results" gives the measurements behind the default.

Run (the paper's setting, lam = 1):
    python train_advreg.py --bank kernels/conv1_7x7.pt --lam 1 --seeds 0 --out runs/advreg
A sweep over lam and seeds (lam = 0 is the baseline), plus the runs of the "bank as a starting
point" control, then its table (one row per lam, mean ± std over seeds); an animation per seed:
    python train_advreg.py --lam 0 0.01 0.1 1 --seeds 0 1 2 3 4 --init-bank kernels/conv1_7x7.pt
    python collect_kernels.py --compare runs/advreg/*/model.pt --bank kernels/conv1_7x7.pt \
        --out runs/advreg/compare
    python train_advreg.py --lam 0 1 --seeds 0 --gif-every 10
Quick run on a laptop CPU:
    python train_advreg.py --data PATH --bank kernels/conv1_7x7.pt --epochs 50 --eval-every 25 \
        --test-limit 1000

Reads:  the dataset; the banks written by collect_kernels.py.
Writes: per run <out>/lam<lam>_seed<N>[_bankinit]/: model.pt (classifier and discriminators,
        rewritten at every evaluation, so an interrupted run resumes), metrics.csv (per
        iteration: losses, D(real), D(fake); test accuracy at evaluations), losses.png (Fig. 4),
        d_outputs.png (Fig. 5), kernels_<layer>.png (Fig. 7/10), test_acc.png (Fig. 9),
        summary.json (accuracy, D outputs, kernel metrics); with --gif-every,
        <out>/kernels_seed<N>.gif (conv1's kernels of every lam of that seed, side by side).
"""
import argparse
import csv
import io
import json
import math
import os
import pathlib
import time

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.animation
import matplotlib.pyplot as plt
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCH = "PaperCNN"  # stored in checkpoints; collect_kernels.py refuses anything else
# The paper's CNN: layer name -> weight shape [out, in, k, k] (see pretrain.py).
CONV_SHAPES = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 5, 5), "conv3": (128, 128, 5, 5),
               "conv4": (256, 128, 3, 3)}
LOG_COLUMNS = ("cls_loss", "reg_loss", "disc_loss", "d_real", "d_fake")  # logged every iteration


# ----------------------------------------------------------------------------- args
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 4: train on 100 CIFAR-10 images with adversarial kernel "
                    "regularization (Algorithm 1); a grid over --lam and --seeds (its table: "
                    "collect_kernels.py --compare).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bank", nargs="+", default=["kernels/conv1_7x7.pt"],
                   help="kernel bank(s) from collect_kernels.py, one per --layers entry, in order")
    p.add_argument("--layers", nargs="+", default=["conv1"],
                   help=f"regularized layers, one discriminator each (paper text: conv1); "
                        f"allowed: {', '.join(CONV_SHAPES)}")
    p.add_argument("--lam", type=float, nargs="+", default=[1.0],
                   help="regularization weight(s) lambda; several values run a sweep "
                        "(authors' notebook: 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and lambda")
    p.add_argument("--init-bank", default=None, metavar="BANK",
                   help="also run every lambda with conv1 initialized from this bank (extra rows)")
    p.add_argument("--d-input", default="standardized", choices=["standardized", "raw"],
                   help="kernels shown to D as they are (raw: authors' notebook) or each scaled to "
                        "zero mean, unit std (standardized: this project, measured in README)")
    p.add_argument("--d-batch", type=int, default=128,
                   help="kernels per real and per fake D batch (authors' notebook: 128)")
    p.add_argument("--d-lr", type=float, default=2e-4,
                   help="discriminator Adam learning rate (authors' notebook: 2e-4)")
    p.add_argument("--d-weight-decay", type=float, default=1e-4,
                   help="discriminator Adam weight decay (authors' notebook: 1e-4)")
    p.add_argument("--d-betas", type=float, nargs=2, default=[0.5, 0.999],
                   help="discriminator Adam betas (authors' notebook: 0.5 0.999)")
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper: cifar10)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--per-class", type=int, default=10,
                   help="training images per class (paper text: 10, i.e. 100 images)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that draws the training images")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on only this many test images (0 = all 10,000)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (paper text: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (paper text: 16)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="classifier Adam learning rate (paper text: 2e-3; authors' notebook: 2e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="classifier Adam weight decay (paper text: 1e-3; authors' notebook: 1e-4)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.999],
                   help="classifier Adam betas (paper text and notebook: 0.5 0.999)")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off random crop (padding 4) + flip (paper text: on; notebook: off)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate test accuracy every N epochs")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N epochs")
    p.add_argument("--gif-every", type=int, default=0, metavar="N",
                   help="keep conv1's kernels every N epochs and write <out>/kernels_seed<S>.gif "
                        "with every lambda of seed S side by side (0 = off)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="runs/advreg", help="output folder of the grid")
    args = p.parse_args(argv)
    unknown = [layer for layer in args.layers if layer not in CONV_SHAPES]
    if unknown:
        p.error(f"unknown layer(s) {unknown}; the paper's CNN has {', '.join(CONV_SHAPES)}")
    if len(set(args.layers)) != len(args.layers):
        p.error(f"--layers has duplicates: {args.layers}")
    if len(args.bank) != len(args.layers):
        p.error(f"give one --bank per --layers entry: {len(args.layers)} layer(s) {args.layers}, "
                f"{len(args.bank)} bank(s)")
    negative = [lam for lam in args.lam if not lam >= 0]
    if negative:
        p.error(f"--lam must be >= 0, got {negative}")
    for name in ("d_batch", "per_class", "epochs", "batch_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_limit < 0 or args.gif_every < 0:
        p.error("--test-limit and --gif-every must be >= 0 (0 = all / off)")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.lam)) != len(args.lam):
        p.error("--seeds and --lam must not repeat a value")
    return args


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
TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def load_split(data, root, train):
    """One split as (uint8 images [N, 3, 32, 32], int64 labels [N], class names).

    `data` is a torchvision name (downloaded into `root`) or the path of an ImageFolder tree.
    Every image is decoded once here; training then only indexes these tensors.
    """
    split = "train" if train else "test"
    if data in TORCHVISION_DATASETS:
        try:
            dataset_class = getattr(torchvision.datasets, TORCHVISION_DATASETS[data])
            ds = dataset_class(root, train, download=True)
        except Exception as e:  # offline: URLError, RuntimeError, ... all mean "could not download"
            raise SystemExit(f"error: could not download {data} into {root!r} ({type(e).__name__})."
                             f" Offline? Pass an ImageFolder tree instead: --data PATH with "
                             f"PATH/train/<class>/*.png and PATH/test/<class>/*.png")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets), list(ds.classes)
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data!r} is neither a known dataset "
                         f"({', '.join(TORCHVISION_DATASETS)}) nor an existing folder")
    try:  # ImageFolder finds the class folders (sorted) and the image files in them
        ds = torchvision.datasets.ImageFolder(os.path.join(data, split))
    except (FileNotFoundError, OSError):
        raise SystemExit(f"error: no images in {os.path.join(data, split)!r}; expected an "
                         f"ImageFolder tree {data}/{split}/<class>/<image>.png")
    images = torch.empty(len(ds), 3, 32, 32, dtype=torch.uint8)
    for n, (path, _) in enumerate(ds.samples):
        try:
            img = ds.loader(path)  # PIL image, RGB
        except Exception:
            raise SystemExit(f"error: cannot read image {path!r} (not an image, or corrupt)")
        if img.size != (32, 32):  # the CNN is built for 32x32 inputs, like CIFAR
            img = img.resize((32, 32), PIL.Image.BILINEAR)
        images[n] = torchvision.transforms.functional.pil_to_tensor(img)
    return images, torch.tensor(ds.targets), ds.classes


def normalize(images_uint8):
    """uint8 [0, 255] -> float, per-channel mean 0.5 / std 0.5 (paper), i.e. [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def augment(images, pad=4):
    """Random crop with zero padding `pad` and random horizontal flip, for a whole uint8 batch.

    The same as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip per image, but done
    on the device in one gather: each image gets its own offset (dy, dx) into the padded batch.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=dev)
    rows = dy + torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = dx + torch.arange(w, device=dev).view(1, 1, 1, w)
    flip = torch.rand(b, 1, 1, 1, device=dev) < 0.5
    cols = torch.where(flip, dx + (w - 1) - torch.arange(w, device=dev).view(1, 1, 1, w), cols)
    batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
    channel = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


def small_subset(labels, per_class, subset_seed):
    """Indices of `per_class` images of every class, drawn at random by `subset_seed`."""
    g = torch.Generator().manual_seed(subset_seed)
    chosen = []
    for c in labels.unique().tolist():
        of_class = (labels == c).nonzero().flatten()
        if len(of_class) < per_class:
            raise SystemExit(f"error: class {c} has only {len(of_class)} training images, "
                             f"--per-class is {per_class}")
        chosen.append(of_class[torch.randperm(len(of_class), generator=g)[:per_class]])
    return torch.cat(chosen)


def load_small_data(args, device):
    """(train_x, train_y, test_x, test_y, classes) on the device; train = the small subset."""
    train_x, train_y, classes = load_split(args.data, args.data_root, train=True)
    test_x, test_y, test_classes = load_split(args.data, args.data_root, train=False)
    if test_classes != classes:
        raise SystemExit(f"error: train and test class folders differ: {classes} vs {test_classes}")
    keep = small_subset(train_y, args.per_class, args.subset_seed)
    train_x, train_y = train_x[keep], train_y[keep]
    if args.test_limit:
        keep = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
        test_x, test_y = test_x[keep[:args.test_limit]], test_y[keep[:args.test_limit]]
    return (*(t.to(device) for t in (train_x, train_y, test_x, test_y)), classes)


# ----------------------------------------------------------------------------- models
class PaperCNN(nn.Module):
    """The paper's CNN (the authors' notebooks): four conv blocks and a linear classifier."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)  # 64 x 16 x 16
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, 5, stride=2, padding=2, bias=False)  # 128 x 8 x 8
        self.bn2 = nn.BatchNorm2d(128)
        self.conv3 = nn.Conv2d(128, 128, 5, stride=2, padding=2, bias=False)  # 128 x 4 x 4
        self.bn3 = nn.BatchNorm2d(128)
        self.conv4 = nn.Conv2d(128, 256, 3, stride=2, padding=1, bias=False)  # 256 x 2 x 2
        self.bn4 = nn.BatchNorm2d(256)
        self.fc = nn.Linear(256, num_classes)  # after global average pooling: 256

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


class KernelDiscriminator(nn.Module):
    """D(kernel) = probability that a k x k kernel comes from the bank (the authors' notebook).
    A kernel is a 1-channel k x k image."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)  # 64 x k x k
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)  # 128 x k x k
        self.bn2 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, 1)  # after global average pooling: 128
        for m in self.modules():  # DCGAN init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, kernels):
        x = F.leaky_relu(self.bn1(self.conv1(kernels)), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return torch.sigmoid(self.fc(x.mean(dim=(2, 3)))).squeeze(1)


def to_d_input(kernels, mode):
    """[B, k, k] -> [B, 1, k, k] as D sees it: raw, or each kernel standardized (differentiably)."""
    if mode == "standardized":
        kernels = kernels - kernels.mean(dim=(1, 2), keepdim=True)
        kernels = kernels / (kernels.std(dim=(1, 2), keepdim=True) + 1e-8)
    return kernels[:, None]


def kernels_of(weight):
    """Every (out, in) slice of a conv weight as one kernel: [out, in, k, k] -> [out*in, k, k]."""
    return weight.reshape(-1, weight.shape[-2], weight.shape[-1])


def load_bank(path, kernel_size=None):
    """A bank written by collect_kernels.py ("kernels" [N, k, k] as float), checked against k."""
    if not os.path.exists(path):
        raise SystemExit(f"error: kernel bank {path!r} not found; make it with `python "
                         f"collect_kernels.py --checkpoints checkpoints/ --out "
                         f"{os.path.dirname(path) or '.'}`")
    try:
        bank = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        bank = None
    if not isinstance(bank, dict) or not isinstance(bank.get("kernels"), torch.Tensor) \
            or bank["kernels"].dim() != 3:
        raise SystemExit(f"error: {path!r} is not a kernel bank (corrupt or another format); "
                         f"banks are written by collect_kernels.py")
    k = bank["kernels"].shape[-1]
    if kernel_size is not None and k != kernel_size:
        raise SystemExit(f"error: bank {path!r} holds {k}x{k} kernels, but the layer it is for "
                         f"has {kernel_size}x{kernel_size} kernels")
    return dict(bank, kernels=bank["kernels"].float())


def init_conv1_from_bank(model, bank_kernels, seed):
    """Overwrite conv1's 64*3 kernels with kernels drawn at random from the bank."""
    weight = model.conv1.weight
    count = weight.shape[0] * weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    if len(bank_kernels) >= count:
        idx = torch.randperm(len(bank_kernels), generator=g)[:count]
    else:
        idx = torch.randint(len(bank_kernels), (count,), generator=g)
    with torch.no_grad():
        weight.copy_(bank_kernels[idx].reshape(weight.shape).to(weight.device))


# ----------------------------------------------------------------------------- Algorithm 1, parts
def sample_fakes(model, discs, d_batch, d_gen):
    """G(z) = z: per regularized layer, a random batch of the classifier's own kernels (still
    attached to its weights, so the generator loss reaches them)."""
    fakes = {}
    for layer in discs:
        kernels = kernels_of(getattr(model, layer).weight)
        pick = torch.randperm(len(kernels), generator=d_gen, device=kernels.device)[:d_batch]
        fakes[layer] = kernels[pick]
    return fakes


def generator_loss(discs, fakes, d_input):
    """Non-saturating generator loss -log D(G(z)), summed over layers (0 without a D)."""
    reg_loss = torch.zeros((), device=next(iter(fakes.values())).device) if fakes else 0.0
    for layer, disc in discs.items():
        disc.requires_grad_(False)  # the generator step needs dD/d(kernels), not D's own gradients
        d_fake = disc(to_d_input(fakes[layer], d_input))
        disc.requires_grad_(True)
        reg_loss = reg_loss + F.binary_cross_entropy(d_fake, torch.ones_like(d_fake))
    return reg_loss


def discriminator_step(discs, d_optimizers, banks, fakes, lam, args, d_gen):
    """One D update per layer on real (bank) vs fake (detached) kernels; returns a dict of
    disc_loss, d_real, d_fake (means over layers for D's outputs)."""
    out = {"disc_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    for layer, disc in discs.items():
        bank = banks[layer]
        real = bank[torch.randint(len(bank), (args.d_batch,), generator=d_gen, device=bank.device)]
        d_real = disc(to_d_input(real, args.d_input))
        d_fake = disc(to_d_input(fakes[layer].detach(), args.d_input))
        disc_loss = lam * (F.binary_cross_entropy(d_real, torch.ones_like(d_real))
                           + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake)))
        d_optimizers[layer].zero_grad(set_to_none=True)
        disc_loss.backward()
        d_optimizers[layer].step()
        out["disc_loss"] = out["disc_loss"] + disc_loss.detach()
        out["d_real"] = out["d_real"] + d_real.detach().mean() / len(discs)
        out["d_fake"] = out["d_fake"] + d_fake.detach().mean() / len(discs)
    return out


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000):
    """Test accuracy in [0, 1]; one host sync at the end."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i:i + batch_size]))
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum()
    model.train()
    return correct.item() / len(images)


def standardize_kernels(kernels):
    """[N, k, k] -> [N, k*k] float64, each kernel with zero mean and unit std: shape, not scale."""
    flat = kernels.reshape(len(kernels), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to the rows of a [N, d] and b [M, d].

    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), with tr (C_a C_b)^(1/2) computed as the
    sum of square roots of the eigenvalues of the symmetric matrix C_a^(1/2) C_b C_a^(1/2).
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return (mean_term + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def low_freq_share(kernels, cutoff=0.25):
    """Mean share of each kernel's energy (mean removed) at spatial frequencies of radius <= cutoff
    cycles/pixel. White noise scores about 1/6; smooth, patterned kernels score high."""
    k = kernels.shape[-1]
    centered = kernels.double() - kernels.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centered).abs() ** 2
    freq = torch.fft.fftfreq(k, dtype=torch.float64)
    low = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt() <= cutoff
    return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)).mean().item()


def kernel_metrics(model, banks):
    """Per regularized layer: Frechet distance of its standardized kernels to the bank's, and the
    low-frequency share."""
    out = {}
    for layer, bank in banks.items():
        kernels = kernels_of(getattr(model, layer).weight).detach().cpu()
        out[f"{layer}_frechet"] = frechet_distance(standardize_kernels(kernels),
                                                   standardize_kernels(bank.cpu()))
        out[f"{layer}_low_freq"] = low_freq_share(kernels)
    return out


# ----------------------------------------------------------------------------- outputs
def write_atomic(path, write):
    """Write a file under a temporary name, then rename it: a Ctrl-C or a kill never leaves half a
    file. `write(tmp)` writes to the name it is given (torch.save, fig.savefig, ...)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"  # keep the extension: savefig and save_image read the format from it
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def write_json(obj, path):
    write_text(path, json.dumps(obj, indent=2))


def save_figure(fig, path):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def kernel_grid(kernels, nrow=8, scale=8):
    """[N, k, k] -> image [3, H, W] of the kernels, each scaled to its own range, enlarged."""
    big = F.interpolate(kernels[:, None].float(), scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(big, nrow=nrow, padding=scale // 2, normalize=True,
                                       scale_each=True, pad_value=1.0)


def save_kernel_grid(kernels, path, nrow=16):
    write_atomic(path, lambda tmp: torchvision.utils.save_image(kernel_grid(kernels, nrow), tmp))


def smooth(values, window):
    """Moving average that ignores NaN (lam = 0 has no D values); same length as `values`."""
    v = torch.as_tensor(values, dtype=torch.float64)
    ok = ~torch.isnan(v)
    kernel = torch.ones(1, 1, window, dtype=torch.float64)
    num = F.conv1d(torch.where(ok, v, 0.0)[None, None], kernel, padding=window // 2)
    den = F.conv1d(ok.double()[None, None], kernel, padding=window // 2)
    return (num / den)[0, 0, :len(v)].tolist()


def write_metrics_csv(path, log, history):
    iters_per_epoch = len(log["cls_loss"]) // max(history["epoch_done"], 1)
    acc_at = {e * iters_per_epoch: a for e, a in zip(history["eval_epoch"], history["test_acc"])}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["iteration", "epoch", *LOG_COLUMNS, "test_acc"])
    columns = [log[name].tolist() for name in LOG_COLUMNS]
    for i, row in enumerate(zip(*columns), start=1):
        writer.writerow([i, (i - 1) // iters_per_epoch + 1, *(f"{v:.5f}" for v in row),
                         f"{acc_at[i]:.4f}" if i in acc_at else ""])
    write_text(path, text.getvalue())


def write_run_outputs(run_dir, model, log, history, banks, title):
    """metrics.csv and the paper's figures for one run."""
    write_metrics_csv(os.path.join(run_dir, "metrics.csv"), log, history)
    iters = range(1, len(log["cls_loss"]) + 1)
    window = max(1, len(iters) // 100) | 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))  # Fig. 4
    for ax, name, label in ((axes[0], "reg_loss", "regularization loss  -log D(G(z))"),
                            (axes[1], "disc_loss", "discriminator loss")):
        ax.plot(iters, log[name].tolist(), alpha=0.25, lw=0.5)
        ax.plot(iters, smooth(log[name].tolist(), window), lw=1.5)
        ax.set(xlabel="iteration", title=label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Fig. 4 — {title}", fontsize=9)
    save_figure(fig, os.path.join(run_dir, "losses.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))  # Fig. 5
    for name, label in (("d_real", "D(real) = D(bank kernel)"), ("d_fake", "D(fake) = D(G(z))")):
        ax.plot(iters, smooth(log[name].tolist(), window), label=label)
    ax.axhline(0.5, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="iteration", ylabel="mean D output", ylim=(0, 1), title=f"Fig. 5 — {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, os.path.join(run_dir, "d_outputs.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))  # Fig. 9
    ax.plot(history["eval_epoch"], history["test_acc"], marker=".")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"Fig. 9 — {title}")
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(run_dir, "test_acc.png"))

    for layer in ["conv1"] + [layer for layer in banks if layer != "conv1"]:  # Fig. 7 / 10
        kernels = kernels_of(getattr(model, layer).weight).detach().cpu()
        if len(kernels) > 256:  # conv2 has 8192 slices: show a fixed random sample
            pick = torch.randperm(len(kernels), generator=torch.Generator().manual_seed(0))
            kernels = kernels[pick[:256]]
        save_kernel_grid(kernels, os.path.join(run_dir, f"kernels_{layer}.png"))


def write_gif(path, frames_per_run, every, count=64):
    """One animation: the first `count` conv1 kernels of several runs side by side, a frame every
    `every` epochs (each kernel scaled to its own range in every frame)."""
    titles, frames = list(frames_per_run), list(frames_per_run.values())
    fig, axes = plt.subplots(1, len(frames), figsize=(4 * len(frames), 4.3), squeeze=False)
    grids = [[kernel_grid(k[:count]).permute(1, 2, 0) for k in f] for f in frames]
    images = [ax.imshow(g[0]) for ax, g in zip(axes[0], grids)]
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    label = fig.suptitle("")

    def show(i):
        for image, g in zip(images, grids):
            image.set_data(g[min(i, len(g) - 1)])
        label.set_text(f"conv1 kernels, epoch {(i + 1) * every}")

    animation = matplotlib.animation.FuncAnimation(fig, show, frames=max(map(len, grids)))
    write_atomic(path, lambda tmp: animation.save(tmp, writer=matplotlib.animation.PillowWriter(4),
                                                  dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, optimizer, **fields):
    """Weights, optimizer state and the random generators' state (so batch order and augmentation
    continue exactly where they stopped), plus the caller's fields."""
    ckpt = {"arch": ARCH, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(), **fields}
    if torch.cuda.is_available():
        ckpt["rng_cuda"] = torch.cuda.get_rng_state()
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def resume_checkpoint(path, model, optimizer, classes):
    """Load a run's checkpoint into model and optimizer and restore the random generators;
    returns the checkpoint's dict, or None if the run has none yet."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    except Exception:
        ckpt = None
    if not isinstance(ckpt, dict) or ckpt.get("arch") != ARCH or ckpt.get("classes") != classes:
        raise SystemExit(f"error: {path} is not a checkpoint of this run (corrupt, another format, "
                         f"model or dataset); use another --out or delete it")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if torch.cuda.is_available() and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())
    return ckpt


def stop_if_diverged(loss, epoch, name, flags):
    """A run whose loss is not finite stops here, before it overwrites the last good checkpoint."""
    if not math.isfinite(loss):
        raise SystemExit(f"error: {name}: the training loss is {loss} at epoch {epoch}; the run "
                         f"diverged. Its last good checkpoint is kept. Lower {flags} and run "
                         f"again with another --out")


# ----------------------------------------------------------------------------- training
def setup_run(lam, seed, bank_init, args, device, classes, banks, init_kernels):
    """Classifier, discriminators, their optimizers and the run's state, resumed if possible."""
    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    if bank_init:
        init_conv1_from_bank(model, init_kernels, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 betas=tuple(args.betas))
    # D's init and its kernel sampling use their own random streams, so that for one seed every
    # lam sees the same classifier init, batch order and augmentation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003)
        discs = {layer: KernelDiscriminator().to(device) for layer in banks} if lam > 0 else {}
    d_gen = torch.Generator(device=device).manual_seed(seed + 2_000_003)
    d_optimizers = {layer: torch.optim.Adam(d.parameters(), lr=args.d_lr, betas=tuple(args.d_betas),
                                            weight_decay=args.d_weight_decay)
                    for layer, d in discs.items()}
    run = {"name": run_name(lam, seed, bank_init), "lam": lam, "seed": seed, "bank_init": bank_init,
           "model": model, "optimizer": optimizer, "discs": discs, "d_optimizers": d_optimizers,
           "d_gen": d_gen, "frames": [],
           "history": {"eval_epoch": [], "test_acc": [], "epoch_done": 0, "seconds": 0.0}}
    ckpt_path = os.path.join(args.out, run["name"], "model.pt")
    ckpt = resume_checkpoint(ckpt_path, model, optimizer, classes)
    if ckpt is None:
        return run, None
    if sorted(ckpt["discs"]) != sorted(discs):
        raise SystemExit(f"error: {ckpt_path} regularized other layers ({sorted(ckpt['discs'])}); "
                         f"use another --out or delete it")
    for layer in discs:
        discs[layer].load_state_dict(ckpt["discs"][layer])
        d_optimizers[layer].load_state_dict(ckpt["d_optimizers"][layer])
    d_gen.set_state(ckpt["rng_d"])
    run["history"], run["frames"] = ckpt["history"], list(ckpt.get("frames", []))
    if run["history"]["epoch_done"] > args.epochs:
        raise SystemExit(f"error: {ckpt_path} already has {run['history']['epoch_done']} epochs, "
                         f"more than --epochs {args.epochs}; pass a larger --epochs or another "
                         f"--out")
    return run, ckpt["log"]


def run_name(lam, seed, bank_init):
    return f"lam{lam:g}_seed{seed}" + ("_bankinit" if bank_init else "")


def train_run(lam, seed, bank_init, args, device, data, banks, init_kernels):
    """One run of Algorithm 1 (resumable); returns its summary dict."""
    train_x, train_y, test_x, test_y, classes = data
    run, saved_log = setup_run(lam, seed, bank_init, args, device, classes, banks, init_kernels)
    name = run["name"]
    model, optimizer, discs, history = run["model"], run["optimizer"], run["discs"], run["history"]
    n, bs = len(train_x), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    log = {c: torch.full((args.epochs * iters_per_epoch,), math.nan, device=device)
           for c in LOG_COLUMNS}
    if saved_log is not None:
        if history["epoch_done"] < args.epochs:
            print(f"{name}: resuming after epoch {history['epoch_done']}")
        for j, c in enumerate(LOG_COLUMNS):
            log[c][:len(saved_log)] = saved_log[:, j].to(device)
    os.makedirs(os.path.join(args.out, name), exist_ok=True)

    t_start = t_log = time.time()
    start_epoch = logged_epoch = history["epoch_done"]
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(n, device=device)
        for step, i in enumerate(range(0, n, bs)):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            # Algorithm 1, one iteration:
            cls_loss = F.cross_entropy(model(normalize(images)), train_y[idx])  # classifier loss
            fakes = sample_fakes(model, discs, args.d_batch, run["d_gen"])      # G(z) = z
            reg_loss = generator_loss(discs, fakes, args.d_input)               # -log D(G(z))
            optimizer.zero_grad(set_to_none=True)                               # classifier step
            (cls_loss + lam * reg_loss).backward()
            optimizer.step()
            it = epoch * iters_per_epoch + step
            log["cls_loss"][it] = cls_loss.detach()
            if discs:                                                           # D step
                d_out = discriminator_step(discs, run["d_optimizers"], banks, fakes, lam, args,
                                           run["d_gen"])
                log["reg_loss"][it] = reg_loss.detach()
                for c in ("disc_loss", "d_real", "d_fake"):
                    log[c][it] = d_out[c]

        done = epoch + 1
        if args.gif_every and done % args.gif_every == 0:
            run["frames"].append(model.conv1.weight.detach().cpu().reshape(-1, 7, 7).clone())
        if done % args.eval_every == 0 or done == args.epochs:
            t_start = end_of_eval_period(run, log, done, iters_per_epoch, args, data, t_start)
        if done % args.log_every == 0 or done == args.epochs:
            print_progress(name, log, history, done, iters_per_epoch, args, t_log, logged_epoch)
            t_log, logged_epoch = time.time(), done

    return finish_run(run, log, args, banks)


def end_of_eval_period(run, log, done, iters_per_epoch, args, data, t_start):
    """Check the run did not diverge, evaluate, checkpoint; returns the new period's start time."""
    history, name = run["history"], run["name"]
    period = slice(history["epoch_done"] * iters_per_epoch, done * iters_per_epoch)
    stop_if_diverged(log["cls_loss"][period].sum().item(), done, name, "--lr (or --lam, --d-lr)")
    history["eval_epoch"].append(done)
    history["test_acc"].append(evaluate(run["model"], data[2], data[3]))
    history["epoch_done"], history["seconds"] = done, history["seconds"] + time.time() - t_start
    log_table = torch.stack([log[c][:done * iters_per_epoch] for c in LOG_COLUMNS], 1).cpu()
    save_checkpoint(os.path.join(args.out, name, "model.pt"), run["model"], run["optimizer"],
                    discs={layer: d.state_dict() for layer, d in run["discs"].items()},
                    d_optimizers={layer: opt.state_dict()
                                  for layer, opt in run["d_optimizers"].items()},
                    history=history, log=log_table, args=vars(args), lam=run["lam"],
                    seed=run["seed"], bank_init=run["bank_init"], classes=data[4],
                    dataset=args.data,
                    rng_d=run["d_gen"].get_state(), frames=run["frames"])
    return time.time()


def print_progress(name, log, history, done, iters_per_epoch, args, t_log, logged_epoch):
    secs = (time.time() - t_log) / max(done - logged_epoch, 1)
    last_epoch = slice((done - 1) * iters_per_epoch, done * iters_per_epoch)
    recent = {c: v.item() for c, v in zip(LOG_COLUMNS, torch.stack(
        [log[c][last_epoch].mean() for c in LOG_COLUMNS]).cpu())}  # one host sync
    acc = f"{history['test_acc'][-1]:.4f}" if history["test_acc"] else "-"
    print(f"{name} | epoch {done:4d}/{args.epochs} | cls {recent['cls_loss']:.3f} "
          f"reg {recent['reg_loss']:.3f} disc {recent['disc_loss']:.3f} | "
          f"D(real) {recent['d_real']:.2f} D(fake) {recent['d_fake']:.2f} | test acc {acc} | "
          f"{secs * 1000:5.0f} ms/epoch | ETA {secs * (args.epochs - done) / 60:5.1f} min",
          flush=True)


def finish_run(run, log, args, banks):
    """The run's figures, metrics.csv and summary.json; returns the summary."""
    log = {c: v.cpu() for c, v in log.items()}
    history, name = run["history"], run["name"]
    lam, seed, bank_init = run["lam"], run["seed"], run["bank_init"]
    title = f"lam={lam:g}, seed {seed}" + (", conv1 from bank" if bank_init else "")
    write_run_outputs(os.path.join(args.out, name), run["model"], log, history, banks, title)
    last = slice(-max(1, len(log["cls_loss"]) // 10), None)  # the last 10% of iterations
    d_last = {c: log[c][last].mean().item() for c in ("d_real", "d_fake")}
    summary = {"run": name, "lam": lam, "seed": seed, "init": "bank" if bank_init else "default",
               "final_test_acc": history["test_acc"][-1], "best_test_acc": max(history["test_acc"]),
               # lam = 0 has no D: null in JSON
               **{f"{c}_last10pct": None if math.isnan(v) else v for c, v in d_last.items()},
               "seconds": history["seconds"], **kernel_metrics(run["model"], banks)}
    write_json(summary, os.path.join(args.out, name, "summary.json"))
    return summary


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # Every input is checked before any run starts: a mistake costs nothing, overwrites nothing.
    banks = {layer: load_bank(path, CONV_SHAPES[layer][-1])["kernels"].to(device)
             for layer, path in zip(args.layers, args.bank)}
    init_kernels = load_bank(args.init_bank, 7)["kernels"] if args.init_bank else None
    t0 = time.time()
    data = load_small_data(args, device)
    print(f"data: {args.data} | {len(data[0])} train images ({args.per_class} per class) / "
          f"{len(data[2])} test | loaded in {time.time() - t0:.1f} s | device {device} | banks: "
          + ", ".join(f"{layer} {list(b.shape)}" for layer, b in banks.items()))

    os.makedirs(args.out, exist_ok=True)
    for bank_init in [False] + ([True] if args.init_bank else []):
        for lam in args.lam:
            for seed in args.seeds:
                train_run(lam, seed, bank_init, args, device, data, banks, init_kernels)
    if args.gif_every:
        for seed in args.seeds:
            frames = {}
            for lam in args.lam:
                path = os.path.join(args.out, run_name(lam, seed, False), "model.pt")
                frames[f"λ = {lam:g}"] = torch.load(path, weights_only=True)["frames"]
            write_gif(os.path.join(args.out, f"kernels_seed{seed}.gif"), frames, args.gif_every)
    print(f"wrote per-run folders under {args.out}/; the table of every run there, mean ± std "
          f"over seeds:\n  python collect_kernels.py --compare {args.out}/*/model.pt --bank "
          f"{args.bank[0]} --out {args.out}/compare")


if __name__ == "__main__":
    main()
