"""Stage 4 — adversarial regularization of convolution kernels (the paper's Algorithm 1).

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), Algorithm 1, the experiments and
Figures 4, 5, 7, 9, 10. The classifier is trained on 100 CIFAR-10 images (as in `train_small.py`)
while a discriminator D learns to tell kernels of the bank (pretrained models, `collect_kernels.py`)
from the classifier's own kernels. The classifier plays the generator, with G(z) = z: the "fake"
samples are its own current kernels, so the generator's loss reaches its weights directly.

For every batch of images (Algorithm 1):
    cls_loss  = cross-entropy of the classifier on the batch
    fake      = a random batch of --d-batch kernels of the regularized layer (k x k slices of its
                weight; differentiable), real = a random batch of --d-batch bank kernels
    reg_loss  = -log D(fake)                  (non-saturating generator loss: maximize log D(G(z)))
    classifier step on  cls_loss + lam * reg_loss
    D step on  disc_loss = lam * (-log D(real) - log(1 - D(fake.detach())))
With `--layers conv1 conv2` each layer has its own discriminator and bank and the reg losses add up.
lam = 0 trains the baseline with this same code (no discriminator at all).

The discriminator (the authors' notebook): one k x k kernel is a 1-channel image;
    [B, 1, k, k] conv 3x3 1->64, BatchNorm, LeakyReLU(0.2) -> [B, 64, k, k]
                 conv 3x3 64->128, BatchNorm, LeakyReLU(0.2) -> [B, 128, k, k]
                 global average pooling -> [B, 128] -> linear 128->1 -> sigmoid
DCGAN init (N(0, 0.02) conv weights, N(1, 0.02) BatchNorm weights), its own Adam (lr 2e-4, weight
decay 1e-4, betas (0.5, 0.999)), fake batch 128 of conv1's 192 slices, real batch 128, lam = 1.
--d-input chooses what D sees: the raw kernels, or each kernel standardized (zero mean, unit std).
Raw bank kernels and a fresh conv1 differ in scale, and BatchNorm lets the classifier rescale its
filters for free, so on raw kernels D can win, and the generator can answer, on scale alone;
standardized kernels leave D only the shape. README "Results" gives the measurements behind the default.

Run (the paper's setting, lam = 1):
    python train_advreg.py --bank kernels/conv1_7x7.pt --lam 1 --seeds 0 --out runs/advreg
The sweep (one results row per lam, mean ± std over seeds; lam = 0 is the baseline), plus the
rows of the "bank as a starting point" control:
    python train_advreg.py --lam 0 0.01 0.1 1 --seeds 0 1 2 3 4 --init-bank kernels/conv1_7x7.pt
Quick run on a laptop CPU:
    python train_advreg.py --data PATH --bank kernels/conv1_7x7.pt --epochs 50 --eval-every 25 --test-limit 1000

Reads:  the dataset; the banks written by collect_kernels.py.
Writes: per run <out>/lam<lam>_seed<N>[_bankinit]/: model.pt (classifier and discriminators,
        written atomically at every evaluation, so an interrupted run resumes), metrics.csv (per
        iteration: losses, D(real), D(fake); test accuracy at evaluations), losses.png (Fig. 4),
        d_outputs.png (Fig. 5), kernels_<layer>.png (Fig. 7/10), test_acc.png (Fig. 9), summary.json;
        for the whole grid <out>/results.csv, <out>/results.md (mean ± std over seeds per row) and
        <out>/results.png (accuracy and kernel metrics against lambda).
"""
import argparse
import csv
import json
import math
import os
import time

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCH = "PaperCNN"  # stored in checkpoints; collect_kernels.py refuses anything else
KERNEL_SIZE = {"conv1": 7, "conv2": 5, "conv3": 5, "conv4": 3}  # the paper's CNN, see pretrain.py


# ----------------------------------------------------------------------------- args
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 4: train on 100 CIFAR-10 images with adversarial kernel regularization "
                    "(Algorithm 1); a grid over --lam and --seeds gives a results table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bank", nargs="+", default=["kernels/conv1_7x7.pt"],
                   help="kernel bank(s) from collect_kernels.py, one per --layers entry, in the same order")
    p.add_argument("--layers", nargs="+", default=["conv1"],
                   help=f"regularized layers, one discriminator each (paper: conv1); allowed: {', '.join(KERNEL_SIZE)}")
    p.add_argument("--lam", type=float, nargs="+", default=[1.0],
                   help="regularization weight(s) lambda; several values run a sweep (authors' notebook: 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and lambda")
    p.add_argument("--init-bank", default=None, metavar="BANK",
                   help="also run every lambda with conv1 initialised from this bank (extra rows in the table)")
    p.add_argument("--d-input", default="standardized", choices=["standardized", "raw"],
                   help="kernels shown to D as they are (raw) or each scaled to zero mean, unit std")
    p.add_argument("--d-batch", type=int, default=128, help="kernels per real and per fake D batch (notebook: 128)")
    p.add_argument("--d-lr", type=float, default=2e-4, help="discriminator Adam learning rate (notebook: 2e-4)")
    p.add_argument("--d-weight-decay", type=float, default=1e-4, help="discriminator Adam weight decay (notebook: 1e-4)")
    p.add_argument("--d-betas", type=float, nargs=2, default=[0.5, 0.999], help="discriminator Adam betas")
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper: cifar10)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--per-class", type=int, default=10, help="training images per class (paper: 10, i.e. 100 images)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that draws the training images")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on only this many test images (0 = all 10,000)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (paper: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (paper: 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="classifier Adam learning rate (paper text: 2e-3; notebook: 2e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="classifier Adam weight decay (paper text: 1e-3; notebook: 1e-4)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.999], help="classifier Adam betas (paper: 0.5 0.999)")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off random crop (padding 4) + flip (paper text: on; authors' notebook: off)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate test accuracy every N epochs")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N epochs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="runs/advreg", help="output folder of the grid")
    args = p.parse_args(argv)
    unknown = [layer for layer in args.layers if layer not in KERNEL_SIZE]
    if unknown:
        p.error(f"unknown layer(s) {unknown}; the paper's CNN has {', '.join(KERNEL_SIZE)}")
    if len(set(args.layers)) != len(args.layers):
        p.error(f"--layers has duplicates: {args.layers}")
    if len(args.bank) != len(args.layers):
        p.error(f"give one --bank per --layers entry: {len(args.layers)} layer(s) {args.layers}, "
                f"{len(args.bank)} bank(s)")
    negative = [lam for lam in args.lam if lam < 0 or math.isnan(lam)]
    if negative:
        p.error(f"--lam must be >= 0, got {negative}")
    for name in ("d_batch", "per_class", "epochs", "batch_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_limit < 0:
        p.error("--test-limit must be >= 0 (0 = all)")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.lam)) != len(args.lam):
        p.error("--seeds and --lam must not repeat a value")
    return args


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA GPU (try --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit("error: --device mps asked for, but MPS is not available (try --device cpu)")
    return torch.device(name)


# ----------------------------------------------------------------------------- data
TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff")


def load_split(data, root, train):
    """One split as (uint8 images [N, 3, 32, 32], int64 labels [N], class names).

    `data` is a torchvision name (downloaded into `root`) or the path of an ImageFolder tree.
    Every image is decoded once here; training then only indexes these tensors.
    """
    split = "train" if train else "test"
    if data in TORCHVISION_DATASETS:
        cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[data])
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:  # offline: URLError, RuntimeError, ... all mean "could not download"
            raise SystemExit(f"error: could not download {data} into {root!r} ({type(e).__name__}: {e}). "
                             f"Offline? Pass an ImageFolder tree instead: --data PATH with "
                             f"PATH/train/<class>/*.png and PATH/test/<class>/*.png")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data!r} is neither a known dataset "
                         f"({', '.join(TORCHVISION_DATASETS)}) nor an existing folder")
    folder = os.path.join(data, split)
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) \
        if os.path.isdir(folder) else []
    files = [(os.path.join(folder, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(folder, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise SystemExit(f"error: no images in {folder!r}; expected an ImageFolder tree "
                         f"{data}/{split}/<class>/<image>.png")
    images = torch.empty(len(files), 3, 32, 32, dtype=torch.uint8)
    for n, (path, _) in enumerate(files):
        try:
            with PIL.Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as e:
            raise SystemExit(f"error: cannot read image {path!r}: {e}")
        if img.size != (32, 32):  # the CNN is built for 32x32 inputs, like CIFAR
            img = img.resize((32, 32), PIL.Image.BILINEAR)
        images[n] = torchvision.transforms.functional.pil_to_tensor(img)
    return images, torch.tensor([label for _, label in files]), classes


def normalize(images_uint8):
    """uint8 [0, 255] -> float, per-channel mean 0.5 / std 0.5 (paper), i.e. [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def augment(images, pad=4):
    """Random crop with zero padding `pad` and random horizontal flip, for a whole uint8 batch.

    The same as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip per image, but done
    on the device in one gather: each image gets its own offset (dy, dx) into the padded batch.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device).view(1, 1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, 1, w)
    flip = torch.rand(b, 1, 1, 1, device=images.device) < 0.5
    cols = torch.where(flip, dx + (w - 1) - torch.arange(w, device=images.device).view(1, 1, 1, w), cols)
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


def small_subset(labels, per_class, subset_seed):
    """Indices of `per_class` images of every class, drawn at random by `subset_seed`."""
    g = torch.Generator().manual_seed(subset_seed)
    chosen = []
    for c in labels.unique().tolist():
        of_class = (labels == c).nonzero().flatten()
        if len(of_class) < per_class:
            raise SystemExit(f"error: class {c} has only {len(of_class)} training images, --per-class is {per_class}")
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
        keep = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))[:args.test_limit]
        test_x, test_y = test_x[keep], test_y[keep]
    return (*(t.to(device) for t in (train_x, train_y, test_x, test_y)), classes)


def load_bank(path, kernel_size=None):
    """A bank written by collect_kernels.py (dict; "kernels" [N, k, k] as float), checked against the layer's k."""
    if not os.path.exists(path):
        raise SystemExit(f"error: kernel bank {path!r} not found; make it with "
                         f"`python collect_kernels.py --checkpoints checkpoints/ --out {os.path.dirname(path) or '.'}`")
    try:
        bank = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read kernel bank {path!r}: {e}")
    if not isinstance(bank, dict) or not isinstance(bank.get("kernels"), torch.Tensor) or bank["kernels"].dim() != 3:
        raise SystemExit(f"error: {path!r} is not a kernel bank written by collect_kernels.py")
    k = bank["kernels"].shape[-1]
    if kernel_size is not None and k != kernel_size:
        raise SystemExit(f"error: bank {path!r} holds {k}x{k} kernels, but the layer it is for has "
                         f"{kernel_size}x{kernel_size} kernels")
    return dict(bank, kernels=bank["kernels"].float())


def init_conv1_from_bank(model, bank_kernels, seed):
    """Overwrite conv1's 64*3 kernels with kernels drawn at random from the bank (Deep Weight Prior's control)."""
    weight = model.conv1.weight
    count = weight.shape[0] * weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    if len(bank_kernels) >= count:
        idx = torch.randperm(len(bank_kernels), generator=g)[:count]
    else:
        idx = torch.randint(len(bank_kernels), (count,), generator=g)
    with torch.no_grad():
        weight.copy_(bank_kernels[idx].reshape(weight.shape).to(weight.device))


# ----------------------------------------------------------------------------- models
class PaperCNN(nn.Module):
    """conv1 7x7 3->64, conv2 5x5 64->128, conv3 5x5 128->128, conv4 3x3 128->256 (stride 2,
    padding k//2, no bias, each followed by BatchNorm + ReLU), global average pooling, fc.
    [B, 3, 32, 32] -> [B, 64, 16, 16] -> [B, 128, 8, 8] -> [B, 128, 4, 4] -> [B, 256, 2, 2] -> [B, classes]
    """

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, 5, stride=2, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(128)
        self.conv3 = nn.Conv2d(128, 128, 5, stride=2, padding=2, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.conv4 = nn.Conv2d(128, 256, 3, stride=2, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(256)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


class KernelDiscriminator(nn.Module):
    """D(kernel) = probability that a k x k kernel comes from the bank (the authors' notebook).
    [B, 1, k, k] -> conv 3x3 -> [B, 64, k, k] -> conv 3x3 -> [B, 128, k, k] -> mean over k x k -> [B, 128] -> [B]
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, 1)
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


def kernels_of_layer(model, layer):
    """The layer's weight [out, in, k, k] as out*in kernels [N, k, k]: G(z) = z, still differentiable."""
    weight = getattr(model, layer).weight
    return weight.reshape(-1, weight.shape[-2], weight.shape[-1])


# ----------------------------------------------------------------------------- Algorithm 1, one step
def classifier_loss(model, discs, images, labels, lam, d_batch, d_input, d_gen):
    """cls_loss + lam * sum over layers of -log D(fake); returns (loss, cls_loss, reg_loss, fakes).

    `fakes[layer]` is the detached fake batch, for the discriminator step that follows.
    """
    cls_loss = F.cross_entropy(model(normalize(images)), labels)
    reg_loss = torch.zeros((), device=images.device)
    fakes = {}
    for layer, disc in discs.items():
        kernels = kernels_of_layer(model, layer)
        fake = kernels[torch.randperm(len(kernels), generator=d_gen, device=kernels.device)[:d_batch]]
        disc.requires_grad_(False)  # this step needs dD/d(kernels) only, not D's own weight gradients
        d_fake = disc(to_d_input(fake, d_input))
        disc.requires_grad_(True)
        reg_loss = reg_loss + F.binary_cross_entropy(d_fake, torch.ones_like(d_fake))  # -log D(G(z))
        fakes[layer] = fake.detach()
    return cls_loss + lam * reg_loss, cls_loss, reg_loss, fakes


def discriminator_step(discs, d_optimizers, banks, fakes, lam, d_batch, d_input, d_gen):
    """One D update per layer on real (bank) vs fake (detached) kernels; returns (disc_loss, D(real), D(fake))."""
    disc_loss = d_real_mean = d_fake_mean = 0.0
    for layer, disc in discs.items():
        bank = banks[layer]
        real = bank[torch.randint(len(bank), (d_batch,), generator=d_gen, device=bank.device)]
        d_real = disc(to_d_input(real, d_input))
        d_fake = disc(to_d_input(fakes[layer], d_input))
        loss = lam * (F.binary_cross_entropy(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake)))
        d_optimizers[layer].zero_grad(set_to_none=True)
        loss.backward()
        d_optimizers[layer].step()
        disc_loss = disc_loss + loss.detach()
        d_real_mean = d_real_mean + d_real.detach().mean() / len(discs)
        d_fake_mean = d_fake_mean + d_fake.detach().mean() / len(discs)
    return disc_loss, d_real_mean, d_fake_mean


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
    """[N, k, k] -> [N, k*k] float64, each kernel with zero mean and unit std: compares shape, not scale."""
    flat = kernels.reshape(len(kernels), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to the rows of a [N, d] and b [M, d].

    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), with tr (C_a C_b)^(1/2) computed as the sum
    of square roots of the eigenvalues of the symmetric matrix C_a^(1/2) C_b C_a^(1/2).
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum().item() + (cov_a.trace() + cov_b.trace() - 2 * cross).item()


def low_freq_share(kernels, cutoff=0.25):
    """Mean share of each kernel's energy (mean removed) at spatial frequency radius <= cutoff cycles/pixel."""
    k = kernels.shape[-1]
    centered = kernels.double() - kernels.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centered).abs() ** 2
    freq = torch.fft.fftfreq(k, dtype=torch.float64)
    low = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt() <= cutoff
    return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)).mean().item()


def bank_reference(bank):
    """Metrics of each source model's kernels against the other sources' (mean over sources)."""
    kernels, counts = bank["kernels"], bank.get("source_counts") or [len(bank["kernels"])]
    if len(counts) < 2:
        return None
    parts = torch.split(kernels, counts)
    fds = [frechet_distance(standardize_kernels(p), standardize_kernels(torch.cat(parts[:i] + parts[i + 1:])))
           for i, p in enumerate(parts)]
    return sum(fds) / len(fds)


def kernel_metrics(model, banks):
    """Per regularized layer: Frechet distance of its standardized kernels to the bank's, and low-frequency share."""
    out = {}
    for layer, bank in banks.items():
        kernels = kernels_of_layer(model, layer).detach().cpu()
        out[f"{layer}_frechet"] = frechet_distance(standardize_kernels(kernels), standardize_kernels(bank.cpu()))
        out[f"{layer}_low_freq"] = low_freq_share(kernels)
    return out


# ----------------------------------------------------------------------------- outputs
def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a Ctrl-C never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def kernel_grid(kernels, nrow=8, scale=8):
    """[N, k, k] -> an image [3, H, W] of the kernels, each scaled to its own range, enlarged `scale`x."""
    big = F.interpolate(kernels[:, None].float(), scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(big, nrow=nrow, padding=scale // 2, normalize=True,
                                       scale_each=True, pad_value=1.0)


def save_png(fig, path):
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def smooth(values, window):
    """Moving average that ignores NaN (lam = 0 has no D values); same length as `values`."""
    v = torch.as_tensor(values, dtype=torch.float64)
    ok = ~torch.isnan(v)
    kernel = torch.ones(1, 1, window, dtype=torch.float64)
    num = F.conv1d(torch.where(ok, v, 0.0)[None, None], kernel, padding=window // 2)[0, 0, :len(v)]
    den = F.conv1d(ok.double()[None, None], kernel, padding=window // 2)[0, 0, :len(v)]
    return (num / den).tolist()


def save_run_outputs(run_dir, model, log, history, banks, title):
    """metrics.csv and the paper's figures for one run."""
    names = ["cls_loss", "reg_loss", "disc_loss", "d_real", "d_fake"]
    iters_per_epoch = len(log) // max(history["epoch_done"], 1)
    acc_at = {e * iters_per_epoch: a for e, a in zip(history["eval_epoch"], history["test_acc"])}
    with open(os.path.join(run_dir, "metrics.csv.tmp"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "epoch"] + names + ["test_acc"])
        for i, row in enumerate(log.tolist(), start=1):
            writer.writerow([i, (i - 1) // iters_per_epoch + 1] + [f"{v:.5f}" for v in row]
                            + [f"{acc_at[i]:.4f}" if i in acc_at else ""])
    os.replace(os.path.join(run_dir, "metrics.csv.tmp"), os.path.join(run_dir, "metrics.csv"))

    iters = range(1, len(log) + 1)
    window = max(1, len(log) // 100) | 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))  # Fig. 4
    for ax, col, label in ((axes[0], 1, "regularization loss  -log D(G(z))"), (axes[1], 2, "discriminator loss")):
        ax.plot(iters, log[:, col].tolist(), alpha=0.25, lw=0.5)
        ax.plot(iters, smooth(log[:, col].tolist(), window), lw=1.5)
        ax.set(xlabel="iteration", title=label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Fig. 4 — {title}", fontsize=9)
    save_png(fig, os.path.join(run_dir, "losses.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))  # Fig. 5
    for col, label in ((3, "D(real) = D(bank kernel)"), (4, "D(fake) = D(G(z))")):
        ax.plot(iters, smooth(log[:, col].tolist(), window), label=label)
    ax.axhline(0.5, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="iteration", ylabel="mean D output", ylim=(0, 1), title=f"Fig. 5 — {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, os.path.join(run_dir, "d_outputs.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))  # Fig. 9
    ax.plot(history["eval_epoch"], history["test_acc"], marker=".")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"Fig. 9 — {title}")
    ax.grid(alpha=0.3)
    save_png(fig, os.path.join(run_dir, "test_acc.png"))

    for layer in ["conv1"] + [layer for layer in banks if layer != "conv1"]:  # Fig. 7 / 10
        kernels = kernels_of_layer(model, layer).detach().cpu()
        if len(kernels) > 256:  # conv2 has 8192 slices: show a fixed random sample
            kernels = kernels[torch.randperm(len(kernels), generator=torch.Generator().manual_seed(0))[:256]]
        torchvision.utils.save_image(kernel_grid(kernels, nrow=16), os.path.join(run_dir, f"kernels_{layer}.tmp.png"))
        os.replace(os.path.join(run_dir, f"kernels_{layer}.tmp.png"), os.path.join(run_dir, f"kernels_{layer}.png"))


# ----------------------------------------------------------------------------- training
def train_run(lam, seed, bank_init, args, device, data, banks, init_kernels):
    """One run of Algorithm 1 (resumable); returns its summary dict."""
    train_x, train_y, test_x, test_y, classes = data
    name = f"lam{lam:g}_seed{seed}" + ("_bankinit" if bank_init else "")
    run_dir = os.path.join(args.out, name)
    ckpt_path = os.path.join(run_dir, "model.pt")

    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    if bank_init:
        init_conv1_from_bank(model, init_kernels, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 betas=tuple(args.betas))
    # D's init and its kernel sampling use their own random streams, so that for one seed every lam
    # sees the same classifier init, batch order and augmentation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003)
        discs = {layer: KernelDiscriminator().to(device) for layer in banks} if lam > 0 else {}
    d_gen = torch.Generator(device=device).manual_seed(seed + 2_000_003)
    d_optimizers = {layer: torch.optim.Adam(d.parameters(), lr=args.d_lr, weight_decay=args.d_weight_decay,
                                            betas=tuple(args.d_betas)) for layer, d in discs.items()}

    n, bs = len(train_x), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    log = torch.full((args.epochs * iters_per_epoch, 5), float("nan"), device=device)  # see save_run_outputs
    history = {"eval_epoch": [], "test_acc": [], "epoch_done": 0, "seconds": 0.0}
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("arch") != ARCH or ckpt.get("classes") != classes or sorted(ckpt["discs"]) != sorted(discs):
            raise SystemExit(f"error: {ckpt_path} is from another model, dataset or set of layers; "
                             f"use another --out or delete it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for layer in discs:
            discs[layer].load_state_dict(ckpt["discs"][layer])
            d_optimizers[layer].load_state_dict(ckpt["d_optimizers"][layer])
        history = ckpt["history"]
        if history["epoch_done"] > args.epochs:
            raise SystemExit(f"error: {ckpt_path} already has {history['epoch_done']} epochs, more than "
                             f"--epochs {args.epochs}; pass --epochs >= {history['epoch_done']} or another --out")
        done_iters = history["epoch_done"] * iters_per_epoch
        log[:min(done_iters, len(log))] = ckpt["log"][:len(log)].to(device)
        torch.set_rng_state(ckpt["rng_cpu"])
        d_gen.set_state(ckpt["rng_d"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())
        if history["epoch_done"] < args.epochs:
            print(f"{name}: resuming from {ckpt_path} after epoch {history['epoch_done']}")
    os.makedirs(run_dir, exist_ok=True)

    start_epoch = history["epoch_done"]
    t_start = t_log = time.time()
    logged_epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(n, device=device)
        for step, i in enumerate(range(0, n, bs)):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            loss, cls_loss, reg_loss, fakes = classifier_loss(model, discs, images, train_y[idx], lam,
                                                              args.d_batch, args.d_input, d_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it = epoch * iters_per_epoch + step
            if discs:
                disc_loss, d_real, d_fake = discriminator_step(discs, d_optimizers, banks, fakes, lam,
                                                               args.d_batch, args.d_input, d_gen)
                log[it] = torch.stack([cls_loss.detach(), reg_loss.detach(), disc_loss, d_real, d_fake])
            else:
                log[it, 0] = cls_loss.detach()

        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:
            history["eval_epoch"].append(done)
            history["test_acc"].append(evaluate(model, test_x, test_y))
            history["epoch_done"], history["seconds"] = done, history["seconds"] + time.time() - t_start
            t_start = time.time()
            ckpt = {"arch": ARCH, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "discs": {layer: d.state_dict() for layer, d in discs.items()},
                    "d_optimizers": {layer: o.state_dict() for layer, o in d_optimizers.items()},
                    "history": history, "log": log[:done * iters_per_epoch].cpu(), "args": vars(args),
                    "lam": lam, "seed": seed, "bank_init": bank_init, "classes": classes, "dataset": args.data,
                    "rng_cpu": torch.get_rng_state(), "rng_d": d_gen.get_state()}
            if device.type == "cuda":
                ckpt["rng_cuda"] = torch.cuda.get_rng_state()
            save_atomic(ckpt, ckpt_path)
        if done % args.log_every == 0 or done == args.epochs:
            secs = (time.time() - t_log) / (done - logged_epoch)
            t_log, logged_epoch = time.time(), done
            recent = log[(done - 1) * iters_per_epoch:done * iters_per_epoch].mean(0).tolist()  # one host sync
            acc = f"{history['test_acc'][-1]:.4f}" if history["test_acc"] else "-"
            print(f"{name} | epoch {done:4d}/{args.epochs} | cls {recent[0]:.3f} reg {recent[1]:.3f} "
                  f"disc {recent[2]:.3f} | D(real) {recent[3]:.2f} D(fake) {recent[4]:.2f} | test acc {acc} | "
                  f"{secs * 1000:5.0f} ms/epoch | ETA {secs * (args.epochs - done) / 60:5.1f} min", flush=True)

    log = log.cpu()
    title = f"lam={lam:g}, seed {seed}" + (", conv1 from bank" if bank_init else "")
    save_run_outputs(run_dir, model, log, history, banks, title)
    last = log[-max(1, len(log) // 10):].mean(0).tolist()  # D outputs over the last 10% of iterations
    d_real, d_fake = (None if math.isnan(v) else v for v in last[3:5])  # lam = 0 has no D: null in JSON
    summary = {"run": name, "lam": lam, "seed": seed, "init": "bank" if bank_init else "default",
               "final_test_acc": history["test_acc"][-1], "best_test_acc": max(history["test_acc"]),
               "d_real_last10pct": d_real, "d_fake_last10pct": d_fake,
               "seconds": history["seconds"], **kernel_metrics(model, banks)}
    write_json_atomic(summary, os.path.join(run_dir, "summary.json"))
    return summary


# ----------------------------------------------------------------------------- results table
def mean_std(values):
    v = torch.tensor([x for x in values if x is not None and not math.isnan(x)], dtype=torch.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def write_results(summaries, references, args):
    """results.csv and results.md: one row per (init, lam), mean ± std over seeds, plus the bank's reference."""
    metric_names = ["final_test_acc", "best_test_acc"] + [f"{layer}_{m}" for layer in args.layers
                                                          for m in ("frechet", "low_freq")] \
        + ["d_real_last10pct", "d_fake_last10pct", "seconds"]
    rows = []
    for init in dict.fromkeys(s["init"] for s in summaries):
        for lam in dict.fromkeys(s["lam"] for s in summaries):
            group = [s for s in summaries if s["init"] == init and s["lam"] == lam]
            if group:
                row = {"init": init, "lam": lam, "seeds": len(group)}
                for m in metric_names:
                    row[m], row[m + "_std"] = mean_std([s[m] for s in group])
                rows.append(row)
    with open(os.path.join(args.out, "results.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(os.path.join(args.out, "results.csv.tmp"), os.path.join(args.out, "results.csv"))

    short = {"final_test_acc": "final acc", "best_test_acc": "best acc", "d_real_last10pct": "D(real)",
             "d_fake_last10pct": "D(fake)", "seconds": "s/run"}
    header = [short.get(m, m.replace("_", " ")) for m in metric_names]
    lines = ["| init | λ | seeds | " + " | ".join(header) + " |", "|---" * (3 + len(header)) + "|"]
    for r in rows:
        cells = ["-" if math.isnan(r[m]) else f"{r[m]:.0f}" if m == "seconds" else f"{r[m]:.3f} ± {r[m + '_std']:.3f}"
                 for m in metric_names]
        lines.append(f"| {r['init']} | {r['lam']:g} | {r['seeds']} | " + " | ".join(cells) + " |")
    ref_cells = []
    for m in metric_names:
        layer = m.split("_")[0]
        ref_cells.append(f"{references[layer][m.split('_', 1)[1]]:.3f}" if layer in references
                         and m.split("_", 1)[1] in references[layer] and references[layer][m.split("_", 1)[1]] is not None
                         else "")
    lines.append("| bank (reference) | | | " + " | ".join(ref_cells) + " |")
    text = (f"Results of {args.out}: mean ± std over seeds; D outputs averaged over the last 10% of iterations; "
            f"Frechet = distance of standardized kernels to the bank (lower = closer); low freq = share of "
            f"kernel energy at radius <= 0.25 cycles/pixel (white noise: 0.167).\n\n" + "\n".join(lines) + "\n")
    plot_results(rows, args)
    with open(os.path.join(args.out, "results.md.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(args.out, "results.md.tmp"), os.path.join(args.out, "results.md"))
    print("\n" + text)


def plot_results(rows, args):
    """results.png: test accuracy and the conv1 kernel metrics against lambda, mean ± std over seeds."""
    panels = [("final_test_acc", "final test accuracy"), (f"{args.layers[0]}_frechet", f"{args.layers[0]} Frechet to bank"),
              (f"{args.layers[0]}_low_freq", f"{args.layers[0]} low-frequency share")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (metric, label) in zip(axes, panels):
        for init in dict.fromkeys(r["init"] for r in rows):
            group = [r for r in rows if r["init"] == init]
            ax.errorbar(range(len(group)), [r[metric] for r in group], yerr=[r[metric + "_std"] for r in group],
                        marker="o", capsize=3, label=f"conv1 init: {init}")
            ax.set_xticks(range(len(group)), [f"{r['lam']:g}" for r in group])
        ax.set(xlabel="λ", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_png(fig, os.path.join(args.out, "results.png"))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # Every input is checked before any run starts, so a mistake costs nothing and overwrites nothing.
    bank_dicts = {layer: load_bank(path, KERNEL_SIZE[layer]) for layer, path in zip(args.layers, args.bank)}
    banks = {layer: bank["kernels"].to(device) for layer, bank in bank_dicts.items()}
    references = {layer: {"frechet": bank_reference(bank), "low_freq": low_freq_share(bank["kernels"])}
                  for layer, bank in bank_dicts.items()}
    init_kernels = load_bank(args.init_bank, kernel_size=7)["kernels"] if args.init_bank else None
    t0 = time.time()
    data = load_small_data(args, device)
    print(f"data: {args.data} | {len(data[0])} train images ({args.per_class} per class) / {len(data[2])} test | "
          f"loaded in {time.time() - t0:.1f} s | device {device} | banks: "
          + ", ".join(f"{layer} {list(b.shape)}" for layer, b in banks.items()))

    os.makedirs(args.out, exist_ok=True)
    summaries = []
    for bank_init in [False] + ([True] if args.init_bank else []):
        for lam in args.lam:
            for seed in args.seeds:
                summaries.append(train_run(lam, seed, bank_init, args, device, data, banks, init_kernels))
    write_results(summaries, references, args)
    print(f"wrote per-run folders under {args.out}/ and {args.out}/results.csv, results.md")


if __name__ == "__main__":
    main()
