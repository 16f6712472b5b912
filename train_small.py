"""Stage 3 — the 100-image baseline: the paper's CNN trained on 10 images per class of CIFAR-10.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the 100-image experiment,
Figures 6 and 8. Trained on 100 images, the 7x7 kernels of conv1 look like noise (Fig. 6) and the
test accuracy stays near 0.20 (Fig. 8). This script is the baseline that stage 4
(`train_advreg.py`) regularizes. Same CNN as `pretrain.py` (the definition is copied here; a test
asserts that the copies agree), with 10 output classes.

Data: 10 training images per class drawn by --subset-seed (the same 100 images for every --seeds
value), augmented on the device with random crop (padding 4) and horizontal flip; the full 10,000
test images, normalised only (mean 0.5, std 0.5).

Run (the paper's text: 1000 epochs, batch 16, Adam lr 2e-3, weight decay 1e-3, betas (0.5, 0.999)):
    python train_small.py --data cifar10 --seeds 0 --out runs/small
The authors' notebook setting (lr 2e-4, weight decay 1e-4, no augmentation):
    python train_small.py --lr 2e-4 --weight-decay 1e-4 --no-augment --out runs/small_notebook
The control "bank as a starting point" (conv1 initialised with kernels drawn from a bank):
    python train_small.py --init-bank kernels/conv1_7x7.pt --out runs/small_bankinit
Quick run on a laptop CPU:
    python train_small.py --data PATH --epochs 50 --eval-every 10 --test-limit 1000

Reads:  the dataset; with --init-bank, a bank written by collect_kernels.py.
Writes: <out>/seed<N>/model.pt (weights, optimizer, history; written atomically at every evaluation,
        so an interrupted run resumes), <out>/seed<N>/metrics.csv (epoch, train loss, test accuracy),
        <out>/seed<N>/test_acc.png (Fig. 8), <out>/seed<N>/kernels.png (Fig. 6: conv1's 192 kernels),
        <out>/summary.json (final test accuracy per seed, key "test_acc", with mean and std).
"""
import argparse
import csv
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
        description="Stage 3: train the paper's CNN on 100 CIFAR-10 images (10 per class), the baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper: cifar10)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--per-class", type=int, default=10, help="training images per class (paper: 10, i.e. 100 images)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that draws the training images")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on only this many test images (0 = all 10,000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (init, batch order, augmentation)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (paper: 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (paper: 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (paper text: 2e-3; authors' notebook: 2e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-3,
                   help="Adam weight decay (paper text: 1e-3; authors' notebook: 1e-4)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.999], help="Adam betas (paper: 0.5 0.999)")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off random crop (padding 4) + flip (paper text: on; authors' notebook: off)")
    p.add_argument("--init-bank", default=None, metavar="BANK",
                   help="initialise conv1 with kernels drawn from this bank (collect_kernels.py) instead of "
                        "the default init: the 'bank as a starting point' control")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate test accuracy every N epochs")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N epochs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="runs/small", help="output folder")
    args = p.parse_args(argv)
    for name in ("per_class", "epochs", "batch_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_limit < 0:
        p.error("--test-limit must be >= 0 (0 = all)")
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


def kernel_grid(kernels, nrow=8, scale=8):
    """[N, k, k] -> an image [3, H, W] of the kernels, each scaled to its own range, enlarged `scale`x."""
    big = F.interpolate(kernels[:, None].float(), scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(big, nrow=nrow, padding=scale // 2, normalize=True,
                                       scale_each=True, pad_value=1.0)


def save_figures(model, history, run_dir, title):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["eval_epoch"], history["test_acc"], marker=".")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"test accuracy (Fig. 8) — {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "test_acc.tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(os.path.join(run_dir, "test_acc.tmp.png"), os.path.join(run_dir, "test_acc.png"))
    conv1 = model.conv1.weight.detach().cpu()
    torchvision.utils.save_image(kernel_grid(conv1.reshape(-1, 7, 7), nrow=16), os.path.join(run_dir, "kernels.tmp.png"))
    os.replace(os.path.join(run_dir, "kernels.tmp.png"), os.path.join(run_dir, "kernels.png"))


def write_metrics_csv(history, path):
    acc_at = dict(zip(history["eval_epoch"], history["test_acc"]))
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "test_acc"])
        for epoch, loss in enumerate(history["train_loss"], start=1):
            writer.writerow([epoch, f"{loss:.5f}", f"{acc_at[epoch]:.4f}" if epoch in acc_at else ""])
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- training
def train_one_seed(seed, args, device, train_x, train_y, test_x, test_y, classes, bank_kernels):
    run_dir = os.path.join(args.out, f"seed{seed}")
    ckpt_path = os.path.join(run_dir, "model.pt")
    torch.manual_seed(seed)
    model = PaperCNN(len(classes)).to(device)
    if bank_kernels is not None:
        init_conv1_from_bank(model, bank_kernels, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                 betas=tuple(args.betas))
    history = {"train_loss": [], "eval_epoch": [], "test_acc": []}
    start_epoch = 0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("arch") != ARCH or ckpt.get("classes") != classes:
            raise SystemExit(f"error: {ckpt_path} is from another model or dataset; use another --out or delete it")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu())
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        print(f"seed {seed}: resuming from {ckpt_path} after epoch {start_epoch}")
    os.makedirs(run_dir, exist_ok=True)

    n, bs = len(train_x), args.batch_size
    loss_sums = torch.zeros(args.epochs, device=device)  # per-epoch loss, summed on the device
    t_log, logged_epoch = time.time(), start_epoch
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            loss = F.cross_entropy(model(normalize(images)), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sums[epoch] += loss.detach() * len(idx)

        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:
            history["train_loss"] += (loss_sums[len(history["train_loss"]):done] / n).tolist()
            history["eval_epoch"].append(done)
            history["test_acc"].append(evaluate(model, test_x, test_y))
            ckpt = {"arch": ARCH, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": done, "history": history, "args": vars(args), "seed": seed, "classes": classes,
                    "dataset": args.data, "rng_cpu": torch.get_rng_state()}
            if device.type == "cuda":
                ckpt["rng_cuda"] = torch.cuda.get_rng_state()
            save_atomic(ckpt, ckpt_path)
        if done % args.log_every == 0 or done == args.epochs:
            secs = (time.time() - t_log) / (done - logged_epoch)
            t_log, logged_epoch = time.time(), done
            acc = f"{history['test_acc'][-1]:.4f} (epoch {history['eval_epoch'][-1]})" if history["test_acc"] else "-"
            print(f"seed {seed} | epoch {done:4d}/{args.epochs} | loss {loss_sums[epoch].item() / n:.4f} | "
                  f"test acc {acc} | {secs * 1000:6.1f} ms/epoch | ETA {secs * (args.epochs - done) / 60:5.1f} min",
                  flush=True)

    write_metrics_csv(history, os.path.join(run_dir, "metrics.csv"))
    save_figures(model, history, run_dir, f"seed {seed}")
    return history


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    bank_kernels = load_bank(args.init_bank, kernel_size=7)["kernels"] if args.init_bank else None
    t0 = time.time()
    train_x, train_y, test_x, test_y, classes = load_small_data(args, device)
    print(f"data: {args.data} | {len(train_x)} train images ({args.per_class} per class, subset seed "
          f"{args.subset_seed}) / {len(test_x)} test | loaded in {time.time() - t0:.1f} s | device {device}")

    os.makedirs(args.out, exist_ok=True)
    histories = {seed: train_one_seed(seed, args, device, train_x, train_y, test_x, test_y, classes, bank_kernels)
                 for seed in args.seeds}
    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    accs = torch.tensor(list(finals.values()), dtype=torch.float64)
    std = accs.std().item() if len(accs) > 1 else 0.0
    summary = {"dataset": args.data, "epochs": args.epochs, "init_bank": args.init_bank, "test_acc": finals,
               "best_test_acc": {str(s): max(h["test_acc"]) for s, h in histories.items()},
               "mean": accs.mean().item(), "std": std}
    write_json_atomic(summary, os.path.join(args.out, "summary.json"))
    print("\nseed | final test acc | best test acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:14.4f} | {summary['best_test_acc'][s]:.4f}")
    print(f"mean ± std over {len(accs)} seeds: {summary['mean']:.4f} ± {std:.4f}")
    print(f"wrote {args.out}/seed<N>/{{model.pt,metrics.csv,test_acc.png,kernels.png}} and {args.out}/summary.json")


if __name__ == "__main__":
    main()
