"""Stage 1 — pretrain the paper's CNN on a large dataset, once per seed.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the pretraining step:
five CNNs (seeds 0–4) are trained on the full CIFAR-100 training set; their convolution kernels
become the dataset of "real", patterned kernels that stage 2 (`collect_kernels.py`) collects.

The CNN (the authors' notebooks; "five hidden layers, kernels 7x7, 5x5 and 3x3"), 945,572
parameters for 100 classes:

    input           [B,   3, 32, 32]
    conv1 7x7 /2    [B,  64, 16, 16]   BatchNorm + ReLU     <- the 7x7 kernels of the bank
    conv2 5x5 /2    [B, 128,  8,  8]   BatchNorm + ReLU     <- the 5x5 kernels
    conv3 5x5 /2    [B, 128,  4,  4]   BatchNorm + ReLU
    conv4 3x3 /2    [B, 256,  2,  2]   BatchNorm + ReLU
    global avg pool [B, 256]
    fc              [B, classes]
    (every convolution: stride 2, padding k//2, no bias)

Run (the paper's setting; CIFAR-100 is downloaded by torchvision):
    python pretrain.py
The authors' notebook setting (batch 256, weight decay 1e-4):
    python pretrain.py --batch-size 256 --weight-decay 1e-4
Offline, on an ImageFolder tree PATH/{train,test}/<class>/<image>:
    python pretrain.py --data PATH
Quick run on a laptop CPU (2 epochs on 2,000 images, the real code end to end):
    python pretrain.py --data PATH --quick --seeds 0 1
Test accuracy of any checkpoints of the paper's CNN, ours or the authors' published models
(GitHub realfolkcode/AdversarialRegularization, models/model1_seed*.pt), on PATH/test:
    python pretrain.py --evaluate ~/models/model1_seed*.pt --data ~/data/cifar100-partial

Reads:  the dataset.
Writes: <out>/seed<N>.pt (weights, optimizer and random state, epochs done, per-epoch train loss
        and test accuracy; rewritten after every epoch, so an interrupted seed resumes where it
        stopped), <out>/summary.json (final test accuracy per seed, key "test_acc", with mean and
        std), <out>/training_curves.png. With --evaluate: <out>/evaluation.json.
"""
import argparse
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
        description="Stage 1: pretrain the paper's CNN on CIFAR-100 (or an ImageFolder), one run "
                    "per seed; or, with --evaluate, measure checkpoints on a test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar100",
                   help="cifar100 | cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper text: cifar100)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
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
                   help="use only this many training images, drawn at random (0 = all)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on only this many test images (0 = all)")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate test accuracy every N epochs")
    p.add_argument("--quick", action="store_true",
                   help="laptop-CPU smoke run: --epochs 2 --train-limit 2000 --test-limit 1000")
    p.add_argument("--evaluate", nargs="+", metavar="CKPT", default=None,
                   help="instead of training: test accuracy of these checkpoints (pretrain.py's or "
                        "the authors' model1_seed*.pt) on the --data test split")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="checkpoints",
                   help="folder for seed<N>.pt, summary.json, curves (or evaluation.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_limit, args.test_limit = 2, 2000, 1000
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_limit < 0 or args.test_limit < 0:
        p.error("--train-limit and --test-limit must be >= 0 (0 = all)")
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


def load_data(args, device):
    """(train_x, train_y, test_x, test_y, classes), the whole dataset on the device (CIFAR: 150 MB
    as uint8), so no data loader is needed."""
    train_x, train_y, classes = load_split(args.data, args.data_root, train=True)
    test_x, test_y, test_classes = load_split(args.data, args.data_root, train=False)
    if test_classes != classes:
        raise SystemExit(f"error: train and test class folders differ: {classes} vs {test_classes}")
    if args.train_limit:  # a fixed random subset, the same for every seed
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        train_x, train_y = train_x[keep[:args.train_limit]], train_y[keep[:args.train_limit]]
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


# The authors' published models (GitHub realfolkcode/AdversarialRegularization, models/*.pt) are
# plain state_dicts of an nn.Sequential; these are their names for the layers of the paper's CNN.
AUTHORS_LAYERS = {"features.0": "conv1", "features.1": "bn1", "features.3": "conv2",
                  "features.4": "bn2", "features.6": "conv3", "features.7": "bn3",
                  "features.9": "conv4", "features.10": "bn4", "classifier.2": "fc"}


def read_checkpoint(path):
    """A checkpoint of the paper's CNN as a dict with "model" (our layer names) and provenance:
    pretrain.py's own, or one of the authors' models (saved on a GPU: loaded to the CPU)."""
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


def evaluate_checkpoints(args, device):
    """--evaluate: test accuracy of each checkpoint on the --data test split."""
    test_x, test_y, classes = load_split(args.data, args.data_root, train=False)
    test_x, test_y = test_x.to(device), test_y.to(device)
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
    values = torch.tensor(list(accs.values()), dtype=torch.float64)
    std = values.std().item() if len(values) > 1 else 0.0
    print(f"mean ± std over {len(values)} checkpoints: {values.mean().item():.4f} ± {std:.4f}")
    os.makedirs(args.out, exist_ok=True)
    write_json({"data": args.data, "images": len(test_x), "test_acc": accs,
                "mean": values.mean().item(), "std": std},
               os.path.join(args.out, "evaluation.json"))


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


def plot_curves(histories, path):
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
def setup_run(seed, args, device, classes):
    """Model and optimizer of one seed, resumed from its checkpoint if there is one."""
    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    history = {"train_loss": [], "eval_epoch": [], "test_acc": [], "epoch_seconds": []}
    ckpt_path = os.path.join(args.out, f"seed{seed}.pt")
    ckpt = resume_checkpoint(ckpt_path, model, optimizer, classes)
    if ckpt is None:
        return model, optimizer, history, 0
    print(f"seed {seed}: resuming from {ckpt_path} after epoch {ckpt['epoch']}")
    return model, optimizer, ckpt["history"], ckpt["epoch"]


def train_one_seed(seed, args, device, data):
    """Train (or resume) one model; returns its history. A checkpoint after every epoch."""
    train_x, train_y, test_x, test_y, classes = data
    model, optimizer, history, start_epoch = setup_run(seed, args, device, classes)
    if start_epoch >= args.epochs:
        print(f"seed {seed}: already trained for {start_epoch} epochs, skipping")
        return history
    n, bs = len(train_x), args.batch_size
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)  # summed on the device; read once per epoch
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            loss = F.cross_entropy(model(normalize(images)), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
        history["train_loss"].append((loss_sum / n).item())
        stop_if_diverged(history["train_loss"][-1], epoch + 1, f"seed {seed}", "--lr")
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            history["eval_epoch"].append(epoch + 1)
            history["test_acc"].append(evaluate(model, test_x, test_y))
        history["epoch_seconds"].append(time.time() - t0)
        save_checkpoint(os.path.join(args.out, f"seed{seed}.pt"), model, optimizer,
                        epoch=epoch + 1, history=history, args=vars(args), seed=seed,
                        classes=classes, dataset=args.data)

        secs = history["epoch_seconds"][-1]
        acc = f"{history['test_acc'][-1]:.4f}" if history["eval_epoch"][-1:] == [epoch + 1] \
            else "  -   "
        print(f"seed {seed} | epoch {epoch + 1:3d}/{args.epochs} | loss "
              f"{history['train_loss'][-1]:.4f} | test acc {acc} | {secs:5.1f} s/epoch | "
              f"{n / secs:6.0f} img/s | ETA {secs * (args.epochs - epoch - 1) / 60:5.1f} min",
              flush=True)
    return history


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.evaluate:
        return evaluate_checkpoints(args, device)

    t0 = time.time()
    data = load_data(args, device)
    print(f"data: {args.data} | {len(data[0])} train / {len(data[2])} test images | "
          f"{len(data[4])} classes | loaded in {time.time() - t0:.1f} s | device {device}")
    os.makedirs(args.out, exist_ok=True)
    histories = {}
    for seed in args.seeds:
        histories[seed] = train_one_seed(seed, args, device, data)
        plot_curves(histories, os.path.join(args.out, "training_curves.png"))

    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    accs = torch.tensor(list(finals.values()), dtype=torch.float64)
    std = accs.std().item() if len(accs) > 1 else 0.0
    summary = {"dataset": args.data, "epochs": args.epochs, "test_acc": finals,
               "best_test_acc": {str(s): max(h["test_acc"]) for s, h in histories.items()},
               "mean": accs.mean().item(), "std": std}
    write_json(summary, os.path.join(args.out, "summary.json"))
    print("\nseed | final test acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:.4f}")
    print(f"mean ± std over {len(accs)} seeds: {summary['mean']:.4f} ± {std:.4f}")
    print(f"wrote {args.out}/seed<N>.pt, summary.json, training_curves.png")


if __name__ == "__main__":
    main()
