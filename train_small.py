"""Stage 3 — the 100-image baseline: the paper's CNN trained on 10 images per class of CIFAR-10.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the 100-image experiment,
Figures 6 and 8. Trained on 100 images, the 7x7 kernels of conv1 look like noise (Fig. 6) and the
test accuracy stays near 0.20 (Fig. 8). This is the baseline that stage 4 (`train_advreg.py`)
regularizes. Same CNN as `pretrain.py` (copied here; a test asserts that the copies agree).

Data: 10 training images per class drawn by --subset-seed (the same 100 images for every seed),
augmented on the device with random crop (padding 4) and horizontal flip; the full 10,000 test
images, normalized only (mean 0.5, std 0.5).

A generic regularizer to compare with the kernel prior: Adversarial Model Perturbation (AMP; Zheng
et al., CVPR 2021) minimizes the loss at the worst nearby weights, max over ||delta|| <= eps of
L(theta + delta). Per batch: gradient ascent from theta to theta + delta (norm over all
parameters, projected back onto the ball), the gradient of the loss at theta + delta, theta
restored, then the optimizer step with that gradient. --amp-epsilon turns it on.

Run (the paper's text: 1000 epochs, batch 16, Adam lr 2e-3, weight decay 1e-3, betas (0.5, 0.999)):
    python train_small.py --data cifar10 --seeds 0 --out runs/small
The authors' notebook setting (lr 2e-4, weight decay 1e-4, no augmentation):
    python train_small.py --lr 2e-4 --weight-decay 1e-4 --no-augment --out runs/small_notebook
The control "bank as a starting point" (conv1 initialized with kernels drawn from a bank):
    python train_small.py --init-bank kernels/conv1_7x7.pt --out runs/small_bankinit
AMP with radius 0.5:
    python train_small.py --amp-epsilon 0.5 --out runs/small_amp0.5
Quick run on a laptop CPU:
    python train_small.py --data PATH --epochs 50 --eval-every 10 --test-limit 1000

Reads:  the dataset; with --init-bank, a bank written by collect_kernels.py.
Writes: <out>/seed<N>/model.pt (weights, optimizer, history; rewritten at every evaluation, so an
        interrupted run resumes), <out>/seed<N>/metrics.csv (epoch, train loss, test accuracy),
        <out>/seed<N>/test_acc.png (Fig. 8), <out>/seed<N>/kernels.png (Fig. 6: conv1's 192
        kernels), <out>/summary.json (final and best test accuracy per seed, mean and std).
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
import matplotlib.pyplot as plt
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCH = "PaperCNN"  # stored in checkpoints; collect_kernels.py refuses anything else


# ----------------------------------------------------------------------------- args
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 3: train the paper's CNN on 100 CIFAR-10 images (10 per class), "
                    "the baseline; optionally with AMP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper: cifar10)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--per-class", type=int, default=10,
                   help="training images per class (paper text: 10, i.e. 100 images)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that draws the training images")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on only this many test images (0 = all 10,000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (init, batch order, augmentation)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (paper text: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (paper text: 16)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="Adam learning rate (paper text: 2e-3; authors' notebook: 2e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="Adam weight decay (paper text: 1e-3; authors' notebook: 1e-4)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.999],
                   help="Adam betas (paper text and notebook: 0.5 0.999)")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off random crop (padding 4) + flip (paper text: on; notebook: off)")
    p.add_argument("--init-bank", default=None, metavar="BANK",
                   help="initialize conv1 with kernels drawn from this bank (collect_kernels.py) "
                        "instead of the default init: the 'bank as a starting point' control")
    p.add_argument("--amp-epsilon", type=float, default=None, metavar="EPS",
                   help="turn on AMP with this radius of the perturbation ball (norm over all "
                        "parameters); off by default (this project's 300-epoch sweep picked "
                        "0.3: README)")
    p.add_argument("--amp-inner-lr", type=float, default=1.0,
                   help="AMP's inner (ascent) step size (the AMP authors' code: 1)")
    p.add_argument("--amp-inner-steps", type=int, default=1,
                   help="AMP's inner ascent steps per batch (the AMP authors' code: 1)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate test accuracy every N epochs")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N epochs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="runs/small", help="output folder")
    args = p.parse_args(argv)
    for name in ("per_class", "epochs", "batch_size", "eval_every", "log_every", "amp_inner_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_limit < 0:
        p.error("--test-limit must be >= 0 (0 = all)")
    if args.amp_epsilon is not None and not args.amp_epsilon >= 0:
        p.error(f"--amp-epsilon must be >= 0, got {args.amp_epsilon}")
    if not args.amp_inner_lr >= 0:
        p.error(f"--amp-inner-lr must be >= 0, got {args.amp_inner_lr}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}")
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


# ----------------------------------------------------------------------------- model
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


def write_run_outputs(run_dir, model, history, title):
    """metrics.csv, Fig. 8 (test accuracy) and Fig. 6 (conv1's kernels) of one run."""
    acc_at = dict(zip(history["eval_epoch"], history["test_acc"]))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["epoch", "train_loss", "test_acc"])
    for epoch, loss in enumerate(history["train_loss"], start=1):
        writer.writerow([epoch, f"{loss:.5f}", f"{acc_at[epoch]:.4f}" if epoch in acc_at else ""])
    write_text(os.path.join(run_dir, "metrics.csv"), text.getvalue())

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["eval_epoch"], history["test_acc"], marker=".")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"test accuracy (Fig. 8) — {title}")
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(run_dir, "test_acc.png"))
    save_kernel_grid(model.conv1.weight.detach().cpu().reshape(-1, 7, 7),
                     os.path.join(run_dir, "kernels.png"))


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


# ----------------------------------------------------------------------------- AMP
def perturb_adversarially(params, loss_fn, epsilon, inner_lr, inner_steps):
    """AMP's inner maximization: move the parameters from theta to theta + delta, with
    ||delta|| <= epsilon (one norm over all parameters), by `inner_steps` steps of gradient ascent
    on the loss. Returns (theta, delta); the caller puts theta back after the outer gradient."""
    theta = [p.detach().clone() for p in params]
    delta = [torch.zeros_like(p) for p in params]
    for _ in range(inner_steps):
        grads = torch.autograd.grad(loss_fn(), params)  # (this forward pass also updates BN stats)
        with torch.no_grad():
            for d, g in zip(delta, grads):
                d.add_(g, alpha=inner_lr)  # ascend: delta += inner_lr * grad L(theta + delta)
            norm = torch.sqrt(sum((d ** 2).sum() for d in delta))
            shrink = torch.clamp(epsilon / (norm + 1e-12), max=1.0)  # project onto the ball
            for p, t, d in zip(params, theta, delta):
                d.mul_(shrink)
                p.copy_(t + d)
    return theta, delta


def train_step(model, optimizer, images, labels, args):
    """One optimizer step on a batch; with AMP the gradient is taken at theta + delta."""
    params = list(model.parameters())
    loss_fn = lambda: F.cross_entropy(model(normalize(images)), labels)  # noqa: E731
    if args.amp_epsilon is not None:
        theta, _ = perturb_adversarially(params, loss_fn, args.amp_epsilon, args.amp_inner_lr,
                                         args.amp_inner_steps)
    loss = loss_fn()  # at theta + delta with AMP, at theta without
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.amp_epsilon is not None:
        with torch.no_grad():  # back to theta; the step uses the gradient at theta + delta
            for p, t in zip(params, theta):
                p.copy_(t)
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------- training
def setup_run(seed, args, device, classes, bank_kernels):
    """Model and optimizer of one seed, resumed from its checkpoint if there is one."""
    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    if bank_kernels is not None:
        init_conv1_from_bank(model, bank_kernels, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 betas=tuple(args.betas))
    history = {"train_loss": [], "eval_epoch": [], "test_acc": []}
    ckpt_path = os.path.join(args.out, f"seed{seed}", "model.pt")
    ckpt = resume_checkpoint(ckpt_path, model, optimizer, classes)
    if ckpt is None:
        return model, optimizer, history, 0
    if ckpt["epoch"] > args.epochs:
        raise SystemExit(f"error: {ckpt_path} already has {ckpt['epoch']} epochs, more than "
                         f"--epochs {args.epochs}; pass a larger --epochs or another --out")
    print(f"seed {seed}: resuming from {ckpt_path} after epoch {ckpt['epoch']}")
    return model, optimizer, ckpt["history"], ckpt["epoch"]


def train_one_seed(seed, args, device, data, bank_kernels):
    train_x, train_y, test_x, test_y, classes = data
    model, optimizer, history, start_epoch = setup_run(seed, args, device, classes, bank_kernels)
    run_dir = os.path.join(args.out, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    fix = "--lr" + (" or --amp-epsilon" if args.amp_epsilon is not None else "")
    chance = math.log(len(classes))  # the cross-entropy of a uniform guess; twice that: diverging
    n, bs = len(train_x), args.batch_size
    loss_sums = torch.zeros(args.epochs, device=device)  # per epoch, summed on the device
    t_log, logged_epoch = time.time(), start_epoch
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            loss_sums[epoch] += train_step(model, optimizer, images, train_y[idx], args) * len(idx)

        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:  # evaluate, then checkpoint
            new_losses = (loss_sums[len(history["train_loss"]):done] / n).tolist()
            stop_if_diverged(sum(new_losses), done, f"seed {seed}", fix)
            history["train_loss"] += new_losses
            history["eval_epoch"].append(done)
            history["test_acc"].append(evaluate(model, test_x, test_y))
            save_checkpoint(os.path.join(run_dir, "model.pt"), model, optimizer, epoch=done,
                            history=history, args=vars(args), seed=seed, classes=classes,
                            dataset=args.data)
        if done % args.log_every == 0 or done == args.epochs:
            secs = (time.time() - t_log) / (done - logged_epoch)
            t_log, logged_epoch = time.time(), done
            loss = loss_sums[epoch].item() / n  # one host sync per progress line
            stop_if_diverged(loss, done, f"seed {seed}", fix)
            warn = f" | loss above 2 x chance ({chance:.2f}): diverging? lower {fix}" \
                if loss > 2 * chance else ""
            acc = f"{history['test_acc'][-1]:.4f}" if history["test_acc"] else "-"
            print(f"seed {seed} | epoch {done:4d}/{args.epochs} | loss {loss:.4f} | test acc "
                  f"{acc} | {secs * 1000:6.1f} ms/epoch | ETA "
                  f"{secs * (args.epochs - done) / 60:5.1f} min{warn}", flush=True)

    write_run_outputs(run_dir, model, history, f"seed {seed}")
    return history


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    bank_kernels = load_bank(args.init_bank, 7)["kernels"] if args.init_bank else None
    t0 = time.time()
    data = load_small_data(args, device)
    print(f"data: {args.data} | {len(data[0])} train images ({args.per_class} per class, subset "
          f"seed {args.subset_seed}) / {len(data[2])} test | loaded in {time.time() - t0:.1f} s | "
          f"device {device}")

    os.makedirs(args.out, exist_ok=True)
    histories = {seed: train_one_seed(seed, args, device, data, bank_kernels)
                 for seed in args.seeds}
    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    accs = torch.tensor(list(finals.values()), dtype=torch.float64)
    std = accs.std().item() if len(accs) > 1 else 0.0
    summary = {"dataset": args.data, "epochs": args.epochs, "init_bank": args.init_bank,
               "amp_epsilon": args.amp_epsilon, "test_acc": finals,
               "best_test_acc": {str(s): max(h["test_acc"]) for s, h in histories.items()},
               "mean": accs.mean().item(), "std": std}
    write_json(summary, os.path.join(args.out, "summary.json"))
    print("\nseed | final test acc | best test acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:14.4f} | {summary['best_test_acc'][s]:.4f}")
    print(f"mean ± std over {len(accs)} seeds: {summary['mean']:.4f} ± {std:.4f}")
    print(f"wrote {args.out}/seed<N>/{{model.pt,metrics.csv,test_acc.png,kernels.png}} and "
          f"{args.out}/summary.json")


if __name__ == "__main__":
    main()
