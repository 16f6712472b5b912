"""Stage 1: pretrain the paper's CNN on a large dataset, one model per seed.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the pretraining step: five
CNNs (seeds 0-4) are trained on all of CIFAR-100; their convolution kernels become the "real",
patterned kernels that stage 2 (collect_kernels.py) collects into banks.

The paper's setting (CIFAR-100, downloaded by torchvision; the authors' notebook trained their
published models with --batch-size 256 --weight-decay 1e-4):
    python pretrain.py
A quick CPU run on an ImageFolder tree PATH/{train,test}/<class>/<image> (2 epochs, 2,000 images):
    python pretrain.py --data PATH --quick --seeds 0 1
Test accuracy of checkpoints of the paper's CNN, ours or the authors' models/model1_seed*.pt:
    python pretrain.py --evaluate ~/models/model1_seed*.pt --data ~/data/cifar100-partial

Reads:  the dataset (with --evaluate, the checkpoints too).
Writes: <out>/seed<N>.pt (weights, optimizer and random state, epochs done, history; rewritten
        after every epoch, so an interrupted seed resumes where it stopped, and a folder holding a
        run with other training flags is refused), <out>/summary.json (final test accuracy per
        seed, "test_acc", with mean and std), <out>/training_curves.png; with --evaluate,
        <out>/evaluation.json.
Results: docs/pretrain.md
"""
import argparse
import functools
import json
import math
import os
import pathlib
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


# ----------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 1: pretrain the paper's CNN on CIFAR-100 (or an ImageFolder), one run "
                    "per seed; or, with --evaluate, measure checkpoints on a test set.",
        formatter_class=HelpFormatter)
    p.add_argument("--data", default="cifar100",
                   help="cifar100 | cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper text: cifar100)")
    p.add_argument("--data-root", default="data",
                   help="where torchvision datasets are downloaded (this project)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="one model per seed (paper text: 5 models, seeds 0-4)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per seed (paper text: 100)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per step (paper text: 128; authors' notebook: 256)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (paper text: Adam's defaults)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="Adam weight decay (paper text: 1e-3; authors' notebook: 1e-4)")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off random crop (padding 4) + horizontal flip (on: the authors' "
                        "notebook, which trained their published models; paper text: normalized "
                        "only)")
    p.add_argument("--train-limit", type=int, default=0,
                   help="use only this many training images, drawn at random (0 = all; this "
                        "project: docs/pretrain.md)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on only this many test images (0 = all; this project: "
                        "docs/pretrain.md)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate test accuracy every N epochs (this project: docs/pretrain.md)")
    p.add_argument("--quick", action="store_true",
                   help="laptop-CPU smoke run: --epochs 2 --train-limit 2000 --test-limit 1000, "
                        "over any of those given (this project: docs/pretrain.md)")
    p.add_argument("--evaluate", nargs="+", metavar="CKPT", default=None,
                   help="instead of training: test accuracy of these checkpoints (pretrain.py's or "
                        "the authors' model1_seed*.pt) on the --data test split")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast forward passes (float32 weights and optimizer state); "
                        "faster on CPUs with AVX512-BF16 / AMX and on recent GPUs, much slower "
                        "on CPUs without native bf16 (this project: docs/pretrain.md)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu (this project)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default; this project)")
    p.add_argument("--out", default="checkpoints",
                   help="folder for seed<N>.pt, summary.json, curves or evaluation.json (this "
                        "project)")
    args = p.parse_args(argv)
    if args.quick:  # the quick budget, as if given last on the command line
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        args = p.parse_args(argv + ["--epochs", "2", "--train-limit", "2000",
                                    "--test-limit", "1000"])
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_limit < 0 or args.test_limit < 0:
        p.error("--train-limit and --test-limit must be >= 0 (0 = all)")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}")
    return args


# The flags that cannot change what a seed's run computes: a run may be resumed with other values
# of these (more --epochs, another --device); any other flag must be the checkpoint's own.
FREE_FLAGS = {"epochs", "threads", "device", "out", "eval_every", "data_root", "seeds", "quick",
              "evaluate"}


# ----------------------------------------------------------------------------- the model
# The paper's CNN (the authors' notebooks; "five hidden layers, kernels 7x7, 5x5 and 3x3"),
# 945,572 parameters for 100 classes; every convolution has stride 2, padding k//2, no bias:
#     input           [B,   3, 32, 32]
#     conv1 7x7 /2    [B,  64, 16, 16]   BatchNorm + ReLU     <- the 7x7 kernels of the bank
#     conv2 5x5 /2    [B, 128,  8,  8]   BatchNorm + ReLU     <- the 5x5 kernels
#     conv3 5x5 /2    [B, 128,  4,  4]   BatchNorm + ReLU
#     conv4 3x3 /2    [B, 256,  2,  2]   BatchNorm + ReLU
#     global avg pool [B, 256]  ->  fc  [B, classes]
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


# ----------------------------------------------------------------------------- training
def train(seed, args, data, device):
    """Train one seed's model with Adam on cross-entropy (or resume it); returns its history."""
    train_x, train_y, test_x, test_y, classes = data
    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    path = os.path.join(args.out, f"seed{seed}.pt")
    start_epoch, history = resume_seed(path, model, optimizer, args, seed, classes)
    n = len(train_x)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)  # summed on the device: one host sync an epoch
        perm = torch.randperm(n, device=device)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])  # crop + flip
            with autocast(args.precision, device):  # bf16 forward with --precision bf16
                loss = F.cross_entropy(model(normalize(images)), train_y[idx])  # in [-1, 1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
        history["train_loss"].append((loss_sum / n).item())
        # a NaN loss stops the run here, before it overwrites the last good checkpoint
        stop_if_diverged(history["train_loss"][-1], f"epoch {epoch} of seed {seed}", "--lr")
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            history["eval_epoch"].append(epoch)
            with autocast(args.precision, device):
                history["test_acc"].append(evaluate(model, test_x, test_y))
        history["epoch_seconds"].append(time.time() - t0)
        # weights, optimizer and random state after every epoch: an interrupted run resumes
        save_checkpoint(path, {"model": model, "optimizer": optimizer}, arch=ARCH, epoch=epoch,
                        history=history, args=vars(args), flags=run_flags(args, FREE_FLAGS),
                        seed=seed, classes=classes, dataset=args.data)
        print_epoch(seed, epoch, args.epochs, history, n)
    return history


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    warn_if_bf16_is_slow(args.precision, device)
    if args.evaluate:
        return evaluate_checkpoints(args, device)
    data = load_pretraining_data(args, device)
    os.makedirs(args.out, exist_ok=True)
    histories = {}
    for seed in args.seeds:
        histories[seed] = train(seed, args, data, device)
        plot_training_curves(histories, os.path.join(args.out, "training_curves.png"))
    write_pretraining_summary(histories, args)


# ==== plumbing: the same in every script, checked by test_smoke.py; skip on a first read ====
# ----------------------------------------------------------------------------- device, data
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

TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST"}


@functools.lru_cache(maxsize=4)  # a run may read a split more than once: decode it once
def load_split(data, root, split):
    """One split ("train" or "test") as (uint8 images [N, C, H, W] at the data's own size, int64
    labels [N], class names). `data` is a torchvision name (downloaded into `root`) or the path of
    an ImageFolder tree data/{train,test}/<class>/<image>; grayscale trees (MNIST) stay 1-channel,
    and an image of another size than the first is resized to it. Every image is decoded once here;
    training then only indexes these tensors."""
    if data in TORCHVISION_DATASETS:
        try:
            dataset_class = getattr(torchvision.datasets, TORCHVISION_DATASETS[data])
            ds = dataset_class(root, train=split == "train", download=True)
        except Exception as e:  # offline: URLError, RuntimeError, ... all mean "could not download"
            raise SystemExit(f"error: could not download {data} into {root!r} ({type(e).__name__})."
                             f" Offline? Pass an ImageFolder tree instead: --data PATH with "
                             f"PATH/train/<class>/*.png and PATH/test/<class>/*.png")
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data!r} is neither a known dataset "
                         f"({', '.join(TORCHVISION_DATASETS)}) nor an existing folder")
    folder = os.path.join(data, split)
    try:  # ImageFolder finds the class folders (sorted) and the image files in them
        ds = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, OSError):
        raise SystemExit(f"error: no images in {folder!r}; expected an ImageFolder tree "
                         f"{data}/{split}/<class>/<image>.png")
    print(f"decoding the {len(ds.samples)} images of {folder}", flush=True)
    with PIL.Image.open(ds.samples[0][0]) as first:
        mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
    images = []
    for path, _ in ds.samples:
        try:
            with PIL.Image.open(path) as img:
                img = torchvision.transforms.functional.pil_to_tensor(img.convert(mode))
        except OSError as e:  # PIL's UnidentifiedImageError is one
            raise SystemExit(f"error: cannot read image {path!r} ({type(e).__name__}): not an "
                             f"image, or corrupt")
        if images and img.shape != images[0].shape:
            img = resize_uint8(img[None], images[0].shape[-1])[0]
        images.append(img)
    return torch.stack(images), torch.tensor(ds.targets), ds.classes


def resize_uint8(x, size):
    """uint8 images [N, C, H, W] -> [N, C, size, size] (bilinear, antialiased), in chunks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False) for c in x.split(8192)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def as_cifar_images(images):
    """uint8 [N, C, H, W] -> [N, 3, 32, 32], what the paper's CNN takes (gray -> RGB, resized)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return resize_uint8(images, 32)


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


def load_pretraining_data(args, device):
    """(train_x, train_y, test_x, test_y, classes), the whole dataset on the device as uint8
    [N, 3, 32, 32] (CIFAR: 150 MB), so no data loader is needed."""
    t0 = time.time()
    train_x, train_y, classes = load_split(args.data, args.data_root, "train")
    test_x, test_y, test_classes = load_split(args.data, args.data_root, "test")
    if test_classes != classes:
        raise SystemExit(f"error: train and test class folders differ: {classes} vs {test_classes}")
    if args.train_limit:  # a fixed random subset, the same for every seed
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        train_x, train_y = train_x[keep[:args.train_limit]], train_y[keep[:args.train_limit]]
    if args.test_limit:
        keep = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
        test_x, test_y = test_x[keep[:args.test_limit]], test_y[keep[:args.test_limit]]
    train_x, test_x = as_cifar_images(train_x), as_cifar_images(test_x)
    print(f"data: {args.data} | {len(train_x)} train / {len(test_x)} test images | "
          f"{len(classes)} classes | loaded in {time.time() - t0:.1f} s | device {device}")
    return (*(t.to(device) for t in (train_x, train_y, test_x, test_y)), classes)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000):
    """Accuracy in [0, 1] of the model in eval mode (BatchNorm's running statistics); one host
    sync at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i:i + batch_size]))
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(len(images), 1)


def evaluate_checkpoints(args, device):
    """--evaluate: test accuracy of each checkpoint on the --data test split."""
    test_x, test_y, classes = load_split(args.data, args.data_root, "test")
    test_x, test_y = as_cifar_images(test_x).to(device), test_y.to(device)
    accs = {}
    for path in args.evaluate:
        state = read_checkpoint(path)["model"]
        num_classes = state["fc.weight"].shape[0]
        if num_classes != len(classes):
            raise SystemExit(f"error: {path} classifies {num_classes} classes, but {args.data}'s "
                             f"test split has {len(classes)} class folders")
        model = PaperCNN(num_classes).to(device)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            raise SystemExit(f"error: {path} holds another architecture than the paper's CNN")
        accs[path] = evaluate(model, test_x, test_y)
        print(f"{path}: test accuracy {accs[path]:.4f} on {len(test_x)} images of {args.data}")
    mean, std = mean_std(list(accs.values()))
    print(f"mean ± std over {len(accs)} checkpoints: {mean:.4f} ± {std:.4f}")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "evaluation.json"),
               {"data": args.data, "images": len(test_x), "test_acc": accs, "mean": mean,
                "std": std})


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.std().item() if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- checkpoints
ARCH = "PaperCNN"  # stored in checkpoints; collect_kernels.py refuses anything else

AUTHORS_LAYERS = {"features.0": "conv1", "features.1": "bn1", "features.3": "conv2",
                  "features.4": "bn2", "features.6": "conv3", "features.7": "bn3",
                  "features.9": "conv4", "features.10": "bn4", "classifier.2": "fc"}


def read_checkpoint(path):
    """A checkpoint of the paper's CNN as a dict with "model" (our layer names) and provenance:
    ours (pretrain.py, train_small.py, train_advreg.py), or one of the authors' models (saved on a
    GPU: loaded to the CPU)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        ckpt = None
    if isinstance(ckpt, dict) and "features.0.weight" in ckpt:  # the authors' layout
        model = {}
        for key, value in ckpt.items():
            module, _, param = key.rpartition(".")
            model[f"{AUTHORS_LAYERS.get(module, module)}.{param}"] = value
        seed = "".join(c for c in os.path.basename(path).rpartition("seed")[2] if c.isdigit())
        ckpt = {"arch": ARCH, "model": model, "seed": int(seed) if seed else None,
                "dataset": "cifar100 (the authors' models)", "format": "authors"}
    if not isinstance(ckpt, dict) or ckpt.get("arch") != ARCH or "model" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of the paper's CNN (corrupt or "
                         f"another format); pretrain.py, train_small.py and train_advreg.py "
                         f"write them, and the authors' models/model1_seed*.pt are read too")
    return ckpt


def state_of(obj):
    """state_dict of a module or optimizer, or of each one in a dict of them."""
    if isinstance(obj, dict):
        return {name: o.state_dict() for name, o in obj.items()}
    return obj.state_dict()


def save_checkpoint(path, states, **fields):
    """The state of every model and optimizer in `states` (name -> object, or name -> dict of
    objects), the random generators' state (so batch order, augmentation and noise continue exactly
    where they stopped) and the caller's fields, written atomically."""
    ckpt = {name: state_of(obj) for name, obj in states.items()}
    ckpt.update(fields, rng_cpu=torch.get_rng_state())
    if torch.cuda.is_available():
        ckpt["rng_cuda"] = torch.cuda.get_rng_state()
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def resume(path, states, flags, **expected):
    """Load the checkpoint at `path` into `states` (as save_checkpoint wrote them) and restore the
    random generators; returns its dict, or None if there is none yet. One clear line instead, with
    nothing loaded, for a damaged file, another program's (a field of `expected` differs: format,
    architecture, classes) or a run made with other training flags (`flags`: name -> value, the
    flags that change what a run computes; the checkpoint keeps its own under "flags")."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): it is damaged or not a "
                         f"checkpoint; delete it or use another --out")
    if not isinstance(ckpt, dict) or any(ckpt.get(k) != v for k, v in expected.items()):
        raise SystemExit(f"error: {path} is not a checkpoint of this run (another format, model "
                         f"or dataset); use another --out or delete it")
    saved = ckpt.get("flags") or {k: ckpt.get("args", {}).get(k) for k in flags}  # older: args
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})"
               for k, v in flags.items() if saved.get(k) != v]
    if changed:
        raise SystemExit(f"error: {path} is a run with other flags: {', '.join(changed)}; use "
                         f"another --out, or the same flags to resume it")
    for name, obj in states.items():
        if isinstance(obj, dict):
            for key, o in obj.items():
                o.load_state_dict(ckpt[name][key])
        else:
            obj.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng_cpu"])
    if torch.cuda.is_available() and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())
    return ckpt


def run_flags(args, free):
    """The flags that define a run (stored in its checkpoint, compared on resume): every flag but
    those in `free`, which cannot change what the run computes (--epochs, --threads, --device)."""
    return {k: v for k, v in vars(args).items() if k not in free}


def resume_seed(path, model, optimizer, args, seed, classes):
    """(epochs done, history) of a seed's run: resumed from its checkpoint, or a fresh start."""
    ckpt = resume(path, {"model": model, "optimizer": optimizer}, run_flags(args, FREE_FLAGS),
                  arch=ARCH, classes=classes)
    if ckpt is None:
        return 0, {"train_loss": [], "eval_epoch": [], "test_acc": [], "epoch_seconds": []}
    print(f"seed {seed}: resuming from {path} after epoch {ckpt['epoch']}")
    if ckpt["epoch"] >= args.epochs:
        print(f"seed {seed}: already trained for {ckpt['epoch']} epochs, skipping")
    return ckpt["epoch"], ckpt["history"]


def stop_if_diverged(loss, where, flags):
    """A run whose loss is not finite stops here, before it overwrites its last good checkpoint."""
    if not math.isfinite(loss):
        raise SystemExit(f"error: the training loss is {loss} at {where}; the run diverged. Its "
                         f"last good checkpoint is kept. Lower {flags} and run again with "
                         f"another --out")


# ----------------------------------------------------------------------------- progress, outputs
def print_epoch(seed, epoch, epochs, history, images):
    secs = history["epoch_seconds"][-1]
    evaluated = history["eval_epoch"][-1:] == [epoch]
    acc = f"{history['test_acc'][-1]:.4f}" if evaluated else "  -   "
    print(f"seed {seed} | epoch {epoch:3d}/{epochs} | loss {history['train_loss'][-1]:.4f} | "
          f"test acc {acc} | {secs:5.1f} s/epoch | {images / secs:6.0f} img/s | "
          f"ETA {secs * (epochs - epoch) / 60:5.1f} min", flush=True)


def write_pretraining_summary(histories, args):
    """summary.json (final and best test accuracy per seed, mean ± std) and the table printed."""
    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    mean, std = mean_std(list(finals.values()))
    summary = {"dataset": args.data, "epochs": args.epochs, "test_acc": finals,
               "best_test_acc": {str(s): max(h["test_acc"]) for s, h in histories.items()},
               "mean": mean, "std": std}
    write_json(os.path.join(args.out, "summary.json"), summary)
    print("\nseed | final test acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:.4f}")
    print(f"mean ± std over {len(finals)} seeds: {mean:.4f} ± {std:.4f}")
    print(f"wrote {args.out}/seed<N>.pt, summary.json, training_curves.png")


def plot_training_curves(histories, path):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for seed, h in histories.items():
        ax_loss.plot(range(1, len(h["train_loss"]) + 1), h["train_loss"], label=f"seed {seed}")
        ax_acc.plot(h["eval_epoch"], h["test_acc"], marker=".", label=f"seed {seed}")
    ax_loss.set(xlabel="epoch", ylabel="train cross-entropy", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def write_atomic(path, write):
    """Write a file under a temporary name, then rename it: a Ctrl-C, a kill or a full disk never
    leaves half a file, and the previous version stays until the new one is complete.
    `write(tmp)` writes to the name it is given (torch.save, fig.savefig, ...)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"  # keep the extension: savefig and save_image read the format from it
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        torch_write = any(s in str(e) for s in ("inline_container", "PytorchStreamWriter"))
        if isinstance(e, RuntimeError) and not torch_write:
            raise  # not a write error: a bug, shown as one
        reason = getattr(e, "strerror", None) or "the write failed: is the disk full?"
        raise SystemExit(f"error: could not write {path} ({reason}); its previous version, if "
                         f"any, is kept")
    except BaseException:  # Ctrl-C, SystemExit: no temporary file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def save_figure(fig, path, dpi=100):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    plt.close(fig)


def autocast(precision, device):
    """--precision bf16: forward passes and losses in bfloat16 where torch's autocast deems it
    safe; weights, gradients and optimizer state stay float32. fp32: a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 in hardware: AVX512-BF16 or AMX on x86, BF16 on Arm.
    Without it torch emulates bf16, many times slower than fp32. Asks torch.cpu.get_capabilities
    (torch 2.14 has it), else Linux's /proc/cpuinfo; True when neither can tell (no warning)."""
    flags = {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"}
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return any(capabilities.get(flag, False) for flag in flags)
    try:
        return bool(flags & set(pathlib.Path("/proc/cpuinfo").read_text().split()))
    except OSError:
        return True


def warn_if_bf16_is_slow(precision, device):
    """One line to stderr at the start of a run: --precision bf16 on a CPU without native bf16."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX), so --precision bf16 "
              "runs many times slower than fp32 (13x measured: docs/train_small.md); drop it "
              "and use --precision fp32, the default", file=sys.stderr, flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each default once: a flag that is off or unset by default, or whose help
    already says its default, gets no "(default: ...)" appended."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


if __name__ == "__main__":  # at the very end, so that the plumbing above is defined
    main()
