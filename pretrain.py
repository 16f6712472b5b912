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
Throughput of this script's tensor pipeline against a plain DataLoader + transforms loop:
    python pretrain.py --data PATH --benchmark

Reads:  the dataset.
Writes: <out>/seed<N>.pt (weights, args, epochs done, per-epoch train loss and test accuracy;
        rewritten atomically after every epoch, so an interrupted seed resumes where it stopped),
        <out>/summary.json (final test accuracy per seed, key "test_acc", with mean and std),
        <out>/training_curves.png.
"""
import argparse
import json
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


# ----------------------------------------------------------------------------- args
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 1: pretrain the paper's CNN on CIFAR-100 (or an ImageFolder), one run per seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar100",
                   help="cifar100 | cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper: cifar100)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="one model per seed (paper: 5 models, seeds 0-4)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per seed (paper: 100)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per step (paper text: 128; authors' notebook: 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: Adam defaults)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="Adam weight decay (paper text: 1e-3; authors' notebook: 1e-4)")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off random crop (padding 4) + horizontal flip (paper: on)")
    p.add_argument("--train-limit", type=int, default=0,
                   help="use only this many training images, drawn at random (0 = all)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on only this many test images (0 = all)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate test accuracy every N epochs")
    p.add_argument("--quick", action="store_true",
                   help="laptop-CPU smoke run: sets --epochs 2 --train-limit 2000 --test-limit 1000")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="checkpoints", help="folder for seed<N>.pt, summary.json, curves")
    p.add_argument("--benchmark", action="store_true",
                   help="measure images/s of this script's loop vs a DataLoader + transforms loop, then exit")
    p.add_argument("--benchmark-steps", type=int, default=50, help="training steps timed per pipeline")
    p.add_argument("--benchmark-workers", type=int, default=2, help="DataLoader workers of the reference loop")
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


# ----------------------------------------------------------------------------- model
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
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------- training
def train_one_seed(seed, args, device, train_x, train_y, test_x, test_y, classes):
    """Train (or resume) one model; returns its history dict. Checkpoint after every epoch."""
    ckpt_path = os.path.join(args.out, f"seed{seed}.pt")
    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    history = {"train_loss": [], "eval_epoch": [], "test_acc": [], "epoch_seconds": []}
    start_epoch = 0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("arch") != ARCH or ckpt.get("classes") != classes:
            raise SystemExit(f"error: {ckpt_path} is from another model or dataset "
                             f"({ckpt.get('arch')}, {len(ckpt.get('classes', []))} classes); "
                             f"use another --out or delete it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        print(f"seed {seed}: resuming from {ckpt_path} after epoch {start_epoch}")
    if start_epoch >= args.epochs:
        print(f"seed {seed}: already trained for {start_epoch} epochs (>= --epochs {args.epochs}), skipping")
        return history

    n, bs = len(train_x), args.batch_size
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
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
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            history["eval_epoch"].append(epoch + 1)
            history["test_acc"].append(evaluate(model, test_x, test_y))
        history["epoch_seconds"].append(time.time() - t0)

        ckpt = {"arch": ARCH, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1, "history": history, "args": vars(args), "seed": seed,
                "classes": classes, "dataset": args.data, "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            ckpt["rng_cuda"] = torch.cuda.get_rng_state()
        save_atomic(ckpt, ckpt_path)

        secs = history["epoch_seconds"][-1]
        eta = secs * (args.epochs - epoch - 1)
        acc = f"{history['test_acc'][-1]:.4f}" if history["eval_epoch"][-1:] == [epoch + 1] else "  -   "
        print(f"seed {seed} | epoch {epoch + 1:3d}/{args.epochs} | loss {history['train_loss'][-1]:.4f} | "
              f"test acc {acc} | {secs:5.1f} s/epoch | {n / secs:6.0f} img/s | ETA {eta / 60:5.1f} min",
              flush=True)
    return history


# ----------------------------------------------------------------------------- benchmark
def benchmark(args, device, train_x, train_y, num_classes):
    """Images/s of this script's loop vs a plain DataLoader + transforms loop, same model, one run."""
    import torchvision.transforms as T

    def time_steps(batches):
        torch.manual_seed(0)
        model = PaperCNN(num_classes).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        seen, t0 = 0, None
        for step, (images, labels) in enumerate(batches):
            if step == 5:  # warm-up steps (allocator, DataLoader workers) are not timed
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seen, t0 = 0, time.time()
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            if step == args.benchmark_steps + 4:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.time() - t0)

    def tensor_pipeline():
        while True:
            perm = torch.randperm(len(train_x), device=device)
            for i in range(0, len(train_x) - args.batch_size + 1, args.batch_size):
                idx = perm[i:i + args.batch_size]
                yield normalize(augment(train_x[idx])), train_y[idx]

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    if args.data in TORCHVISION_DATASETS:
        dataset = getattr(torchvision.datasets, TORCHVISION_DATASETS[args.data])(
            args.data_root, train=True, transform=transform)
    else:
        dataset = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.benchmark_workers, pin_memory=device.type == "cuda")

    def reference_pipeline():
        while True:
            for images, labels in loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    ours = time_steps(tensor_pipeline())
    reference = time_steps(reference_pipeline())
    result = {"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "steps": args.benchmark_steps, "dataloader_workers": args.benchmark_workers,
              "tensor_pipeline_img_per_s": ours, "dataloader_img_per_s": reference, "speedup": ours / reference}
    print(f"tensor pipeline (this script): {ours:8.0f} img/s")
    print(f"DataLoader + transforms ({args.benchmark_workers} workers): {reference:8.0f} img/s")
    print(f"speed-up: {ours / reference:.2f}x  ({args.benchmark_steps} steps of batch {args.batch_size}, "
          f"{device}, {torch.get_num_threads()} threads)")
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(result, os.path.join(args.out, "benchmark.json"))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    t0 = time.time()
    train_x, train_y, classes = load_split(args.data, args.data_root, train=True)
    test_x, test_y, test_classes = load_split(args.data, args.data_root, train=False)
    if test_classes != classes:
        raise SystemExit(f"error: train and test class folders differ: {classes} vs {test_classes}")
    if args.train_limit:  # a fixed random subset, the same for every seed
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:args.train_limit]
        train_x, train_y = train_x[keep], train_y[keep]
    if args.test_limit:
        keep = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))[:args.test_limit]
        test_x, test_y = test_x[keep], test_y[keep]
    # The whole dataset lives on the device (CIFAR: 150 MB as uint8), so no loader is needed.
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    print(f"data: {args.data} | {len(train_x)} train / {len(test_x)} test images | {len(classes)} classes | "
          f"loaded in {time.time() - t0:.1f} s | device {device}")

    if args.benchmark:
        return benchmark(args, device, train_x, train_y, len(classes))

    os.makedirs(args.out, exist_ok=True)
    histories = {}
    for seed in args.seeds:
        histories[seed] = train_one_seed(seed, args, device, train_x, train_y, test_x, test_y, classes)
        plot_curves(histories, os.path.join(args.out, "training_curves.png"))

    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    accs = torch.tensor(list(finals.values()), dtype=torch.float64)
    std = accs.std().item() if len(accs) > 1 else 0.0
    summary = {"dataset": args.data, "epochs": args.epochs, "test_acc": finals,
               "best_test_acc": {str(s): max(h["test_acc"]) for s, h in histories.items()},
               "mean": accs.mean().item(), "std": std}
    write_json_atomic(summary, os.path.join(args.out, "summary.json"))
    print("\nseed | final test acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:.4f}")
    print(f"mean ± std over {len(accs)} seeds: {summary['mean']:.4f} ± {std:.4f}")
    print(f"wrote {args.out}/seed<N>.pt, summary.json, training_curves.png")


if __name__ == "__main__":
    main()
