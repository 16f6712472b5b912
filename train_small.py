"""Stage 3 — the 100-image task: the paper's CNN on 10 images per class of CIFAR-10, and what else
those 100 images can be given: a generic regularizer (AMP), or the pretrained models themselves.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the 100-image experiment,
Figures 6 and 8: trained on 100 images, conv1's 7x7 kernels look like noise (Fig. 6) and the test
accuracy stays near 0.20 (Fig. 8). Stage 4 (`train_advreg.py`) regularizes this baseline.
  * AMP (Adversarial Model Perturbation; Zheng et al., CVPR 2021): the loss at the worst weights
    in a ball, max over ||delta|| <= eps of L(theta + delta) (`perturb_adversarially`).
  * Transfer: layers of a pretrained CNN (pretrain.py's or the authors' CIFAR-100 models) copied
    in (`transfer`), some of them frozen (`freeze`); all four convs frozen is the linear probe;
    --probe-after convN probes the pooled features after block N (`Probe`).
  * --val-size: images from the rest of the training split for choosing what the paper does not
    fix (a learning rate, AMP's epsilon); never the 100 training images, never the test set.

    python train_small.py --data cifar10 --seeds 0 --out runs/small          # the paper's text
    python train_small.py --amp-epsilon 1 --val-size 1000 --out runs/small_amp1   # AMP
    python train_small.py --init-from "models/model1_seed{seed}.pt" --freeze conv1 conv2 conv3 \
        conv4 --out runs/linear_probe                                        # transfer
    python train_small.py --data PATH --epochs 50 --eval-every 10 --test-limit 1000   # quick CPU

Reads:  the dataset; --init-bank: a bank of collect_kernels.py; --init-from: checkpoints.
Writes: <out>/seed<N>/model.pt (rewritten at every evaluation: an interrupted run resumes),
        metrics.csv (epoch, train loss, train / val / test accuracy), test_acc.png (Fig. 8),
        kernels.png (Fig. 6: conv1's 192 kernels); <out>/summary.json (per seed, mean, std).
Results and the commands behind them: docs/train_small.md.
"""
import argparse
import csv
import functools
import io
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

LAYERS = ("conv1", "conv2", "conv3", "conv4", "fc")  # what --transfer and --freeze name
# flags that cannot change what a run computes: free to differ when a run is resumed
FREE_FLAGS = {"epochs", "seeds", "eval_every", "log_every", "curve_size", "device", "threads",
              "out", "data_root"}


# ----------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 3: train the paper's CNN on 100 CIFAR-10 images (10 per class), "
                    "the baseline; optionally with AMP, or from a pretrained model.",
        formatter_class=HelpFormatter)
    p.add_argument("--data", default="cifar10",
                   help="cifar10 (torchvision download) or PATH of an ImageFolder tree "
                        "PATH/train/<class>/* and PATH/test/<class>/* (paper: cifar10)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--per-class", type=int, default=10,
                   help="training images per class (paper text: 10, i.e. 100 images)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that draws the training images")
    p.add_argument("--val-size", type=int, default=0, metavar="N",
                   help="validation images drawn from the rest of the training split (this "
                        "project; the paper has none: 0 = no validation split)")
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
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from a checkpoint of the paper's CNN (ours or the authors' "
                        "layout); {seed} in the path becomes the run's seed (this project)")
    p.add_argument("--transfer", nargs="+", choices=LAYERS, default=None, metavar="LAYER",
                   help="layers copied from --init-from; convN brings its BatchNorm along, fc "
                        "needs the same classes (default with --init-from: conv1 conv2 conv3 "
                        "conv4, a new head)")
    p.add_argument("--freeze", nargs="+", choices=LAYERS, default=[], metavar="LAYER",
                   help="layers that do not train (their BatchNorm keeps its statistics: eval "
                        "mode); conv1 conv2 conv3 conv4 = the linear probe")
    p.add_argument("--probe-after", choices=LAYERS[:4], default=None, metavar="LAYER",
                   help="the linear probe at a depth (seed 003's transfer lab, Q8): --init-from's "
                        "network up to and including this block, frozen, average-pooled, a new "
                        "linear head of its width; conv4 = the linear probe (default: none)")
    p.add_argument("--amp-epsilon", type=float, default=None, metavar="EPS",
                   help="turn on AMP with this radius of the perturbation ball (norm over all "
                        "trained parameters); off by default (chosen values: docs/train_small.md)")
    p.add_argument("--amp-inner-lr", type=float, default=1.0,
                   help="AMP's inner (ascent) step size (the AMP authors' code: 1)")
    p.add_argument("--amp-inner-steps", type=int, default=1,
                   help="AMP's inner ascent steps per batch (the AMP authors' code: 1)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate test accuracy every N epochs")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N epochs")
    p.add_argument("--curve-size", type=int, default=2000, metavar="N",
                   help="test images (a fixed random sample) behind the accuracy curve along the "
                        "run; the last evaluation uses the whole test set; 0 = the whole set "
                        "every time (this project: keeps evaluation under 15 %% of a run, "
                        "docs/train_small.md)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast forward passes (float32 weights and optimizer state); "
                        "faster on CPUs with AVX512-BF16 / AMX and on recent GPUs, much slower "
                        "on CPUs without native bf16 (this project: docs/train_small.md)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto = cuda if available, else mps, else cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="runs/small", help="output folder")
    args = p.parse_args(argv)
    for name in ("per_class", "epochs", "batch_size", "eval_every", "log_every", "amp_inner_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_limit < 0 or args.val_size < 0 or args.curve_size < 0:
        p.error("--test-limit, --val-size and --curve-size must be >= 0 (0 = all / none)")
    if args.amp_epsilon is not None and not args.amp_epsilon >= 0:
        p.error(f"--amp-epsilon must be >= 0, got {args.amp_epsilon}")
    if not args.amp_inner_lr >= 0:
        p.error(f"--amp-inner-lr must be >= 0, got {args.amp_inner_lr}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}")
    if set(args.freeze) == set(LAYERS):
        p.error("--freeze names every layer, the head too: nothing would train")
    if args.transfer is not None and args.init_from is None:
        p.error("--transfer needs --init-from, the checkpoint to transfer from")
    if args.init_from is not None and args.init_bank is not None:
        p.error("--init-bank and --init-from both initialize the network: choose one")
    if args.probe_after and (args.init_from is None or args.freeze or args.transfer):
        p.error("--probe-after needs --init-from, and sets --transfer and --freeze itself "
                "(conv1 conv2 conv3 conv4): leave them out")
    if args.probe_after:
        args = argparse.Namespace(**dict(vars(args), freeze=list(LAYERS[:4])))
    if args.init_from is not None and args.transfer is None:
        args = argparse.Namespace(**dict(vars(args), transfer=list(LAYERS[:4])))
    return args


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


class Probe(PaperCNN):
    """The linear probe at a depth: the paper's CNN up to and including block `after` (conv,
    BatchNorm, ReLU), global average pooling, a linear head of that block's width. The later
    blocks stay in the model, unused, so its checkpoint keeps the paper's CNN's layout."""

    def __init__(self, num_classes, after):
        super().__init__(num_classes)
        self.depth = LAYERS.index(after) + 1
        width = getattr(self, after).out_channels
        if width != self.fc.in_features:  # after conv4 the head is PaperCNN's own, untouched
            self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- transfer
def modules_of(layer):
    """A layer as --transfer / --freeze name it: convN with its BatchNorm bnN, or the head fc."""
    return [layer, layer.replace("conv", "bn")] if layer.startswith("conv") else [layer]


def transfer(model, pretrained, layers):
    """Copy `layers` of a pretrained state_dict (weights, BatchNorm statistics) into the model."""
    for layer in layers:
        for name in modules_of(layer):
            module = getattr(model, name)
            state = {k[len(name) + 1:]: v for k, v in pretrained.items()
                     if k.startswith(name + ".")}
            module.load_state_dict(state)


def freeze(model, layers):
    """Frozen layers get no gradient; `train_mode` keeps their BatchNorm in eval mode."""
    for layer in layers:
        for name in modules_of(layer):
            getattr(model, name).requires_grad_(False)


def train_mode(model, frozen):
    model.train()
    for layer in frozen:
        for name in modules_of(layer):
            getattr(model, name).eval()  # a frozen BatchNorm keeps its running statistics


def initialize(model, seed, args):
    """The run's starting weights: PyTorch's init, conv1 from a bank, or a pretrained model."""
    if args.init_bank:
        init_conv1_from_bank(model, load_bank(args.init_bank, 7)["kernels"], seed)
    if args.init_from:
        transfer(model, init_checkpoint(args.init_from, seed, args.transfer, model), args.transfer)
    freeze(model, args.freeze)


# ----------------------------------------------------------------------------- AMP
def perturb_adversarially(params, loss_fn, epsilon, inner_lr, inner_steps):
    """AMP's inner maximization: move the parameters from theta to theta + delta, with
    ||delta|| <= epsilon (one norm over all parameters), by `inner_steps` steps of gradient ascent
    on the loss. Returns (theta, delta); the caller puts theta back after the outer gradient.
    As in the AMP authors' code, each inner forward pass (train mode) also updates BatchNorm's
    running statistics."""
    theta = [p.detach().clone() for p in params]
    delta = [torch.zeros_like(p) for p in params]
    for _ in range(inner_steps):
        grads = torch.autograd.grad(loss_fn(), params)
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
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn():
        with autocast(args.precision, images.device):  # bf16 forward; the backward follows it
            return F.cross_entropy(model(normalize(images)), labels)

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
def train(seed, args, data, device):
    """One run (resumable): the 100 images, --epochs times, in batches of --batch-size."""
    torch.manual_seed(seed)
    k = len(data["classes"])
    model = (Probe(k, args.probe_after) if args.probe_after else PaperCNN(k)).to(device)
    initialize(model, seed, args)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 weight_decay=args.weight_decay, betas=tuple(args.betas))
    run_dir = os.path.join(args.out, f"seed{seed}")
    start_epoch, history = resume_run(run_dir, model, optimizer, args, data["classes"])
    train_x, train_y = data["train_x"], data["train_y"]
    n, bs = len(train_x), args.batch_size
    loss_sums = torch.zeros(args.epochs, device=device)  # per epoch, summed on the device
    progress = Progress(f"seed {seed}", start_epoch, args.epochs, math.log(len(data["classes"])))
    for epoch in range(start_epoch, args.epochs):
        train_mode(model, args.freeze)
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            loss_sums[epoch] += train_step(model, optimizer, images, train_y[idx], args) * len(idx)

        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:  # evaluate, then checkpoint
            record_evaluation(history, model, data, done, loss_sums / n, args)
            save_run(run_dir, model, optimizer, history, args, seed, data["classes"], done)
        if done % args.log_every == 0 or done == args.epochs:
            progress.print(done, loss_sums[epoch] / n, history, stop_flags(args))
    write_run_outputs(run_dir, model, history, f"seed {seed}")
    return history


def record_evaluation(history, model, data, done, epoch_losses, args):
    """The losses since the last evaluation (a non-finite one stops the run), then accuracy on
    the training images, the validation split (if any) and the test set (see `accuracies`)."""
    new_losses = epoch_losses[len(history["train_loss"]):done].tolist()
    stop_if_diverged(sum(new_losses), f"epoch {done}", stop_flags(args))
    history["train_loss"] += new_losses
    history["eval_epoch"].append(done)
    final = done == args.epochs
    for split, acc in accuracies(model, data, final, args.curve_size, args.precision).items():
        history.setdefault(split, []).append(acc)


def stop_flags(args):
    return "--lr" + (" or --amp-epsilon" if args.amp_epsilon is not None else "")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    warn_if_bf16_is_slow(args.precision, device)
    t0 = time.time()
    data = load_small_data(args, device)
    check_inputs(args, len(data["classes"]))  # every input is checked before any run starts
    print(f"data: {args.data} | {len(data['train_x'])} train images ({args.per_class} per class, "
          f"subset seed {args.subset_seed}) / {len(data['val_x'])} val / {len(data['test_x'])} "
          f"test | loaded in {time.time() - t0:.1f} s | device {device}")
    os.makedirs(args.out, exist_ok=True)
    histories = {seed: train(seed, args, data, device) for seed in args.seeds}
    write_summary(args, histories)


# ==== plumbing: the same in every script, checked by test_smoke.py; skip on a first read ====
def check_inputs(args, num_classes):
    """Bank and pretrained checkpoints, read once before anything trains: a mistake costs
    nothing and overwrites nothing."""
    if args.init_bank:
        load_bank(args.init_bank, 7)
    if args.init_from:
        for seed in args.seeds:
            init_checkpoint(args.init_from, seed, args.transfer, PaperCNN(num_classes))


def init_checkpoint(pattern, seed, layers, model):
    """The pretrained state_dict for `seed` ({seed} in the pattern), checked against the layers
    it must give: the paper's CNN's shapes, and for fc the model's class count."""
    path = os.path.expanduser(pattern.replace("{seed}", str(seed)))
    if not os.path.exists(path):
        raise SystemExit(f"error: --init-from {path!r} not found (for seed {seed})")
    state = read_checkpoint(path)["model"]
    own = model.state_dict()
    for layer in layers:
        for name in modules_of(layer):
            for key in (k for k in own if k.startswith(name + ".")):
                theirs = state.get(key)
                if layer == "fc" and theirs is not None and theirs.shape != own[key].shape:
                    raise SystemExit(f"error: {path} has a head for {state['fc.weight'].shape[0]}"
                                     f" classes, not {own['fc.weight'].shape[0]}; leave fc out "
                                     f"of --transfer (a new head is trained)")
                if layer != "fc" and (theirs is None or theirs.shape != own[key].shape):
                    raise SystemExit(f"error: {path} is not the paper's CNN: {key} is "
                                     f"{None if theirs is None else tuple(theirs.shape)}, "
                                     f"expected {tuple(own[key].shape)}")
    return state


def resume_run(run_dir, model, optimizer, args, classes):
    """(first epoch to train, history): from the run's checkpoint, or a fresh start."""
    path = os.path.join(run_dir, "model.pt")
    ckpt = resume(path, {"model": model, "optimizer": optimizer}, run_flags(args, FREE_FLAGS),
                  arch=ARCH, classes=classes)
    if ckpt is None:
        return 0, {"train_loss": [], "eval_epoch": []}
    if ckpt["epoch"] > args.epochs:
        raise SystemExit(f"error: {path} already has {ckpt['epoch']} epochs, more than --epochs "
                         f"{args.epochs}; pass a larger --epochs or another --out")
    print(f"{run_dir}: resuming after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["history"]


def save_run(run_dir, model, optimizer, history, args, seed, classes, epoch):
    os.makedirs(run_dir, exist_ok=True)
    save_checkpoint(os.path.join(run_dir, "model.pt"), {"model": model, "optimizer": optimizer},
                    arch=ARCH, epoch=epoch, history=history, args=vars(args),
                    flags=run_flags(args, FREE_FLAGS), seed=seed, classes=classes,
                    dataset=args.data)


class Progress:
    """One line every --log-every epochs: loss, last accuracy, speed and time left."""

    def __init__(self, name, start_epoch, epochs, chance_loss):
        self.name, self.epochs, self.chance = name, epochs, chance_loss
        self.t, self.epoch = time.time(), start_epoch

    def print(self, done, loss, history, flags):
        secs = (time.time() - self.t) / max(done - self.epoch, 1)
        self.t, self.epoch = time.time(), done
        loss = loss.item()  # one host sync per progress line
        stop_if_diverged(loss, f"epoch {done}", flags)
        warn = f" | loss above 2 x chance ({self.chance:.2f}): diverging? lower {flags}" \
            if loss > 2 * self.chance else ""
        accs = " ".join(f"{split} {history[f'{split}_acc'][-1]:.4f}"
                        for split in ("train", "val", "test") if history.get(f"{split}_acc"))
        print(f"{self.name} | epoch {done:4d}/{self.epochs} | loss {loss:.4f} | acc "
              f"{accs or '-'} | {secs * 1000:6.1f} ms/epoch | ETA "
              f"{secs * (self.epochs - done) / 60:5.1f} min{warn}", flush=True)


def write_run_outputs(run_dir, model, history, title):
    """metrics.csv, Fig. 8 (test accuracy) and Fig. 6 (conv1's kernels) of one run."""
    at = {split: dict(zip(history["eval_epoch"], history[f"{split}_acc"]))
          for split in ("train", "val", "test") if f"{split}_acc" in history}
    rows = []
    for epoch, loss in enumerate(history["train_loss"], start=1):
        accs = {f"{s}_acc": f"{a[epoch]:.4f}" if epoch in a else "" for s, a in at.items()}
        rows.append({"epoch": epoch, "train_loss": f"{loss:.5f}", **accs})
    write_csv(os.path.join(run_dir, "metrics.csv"), rows)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split in at:
        ax.plot(history["eval_epoch"], history[f"{split}_acc"], marker=".", label=split)
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy (Fig. 8: test) — {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, os.path.join(run_dir, "test_acc.png"))
    save_kernel_grid(model.conv1.weight.detach().cpu().reshape(-1, 7, 7),
                     os.path.join(run_dir, "kernels.png"))


def write_summary(args, histories):
    """summary.json: final and best test accuracy per seed, their mean and std; the table."""
    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    accs = torch.tensor(list(finals.values()), dtype=torch.float64)
    std = accs.std().item() if len(accs) > 1 else 0.0
    summary = {"dataset": args.data, "epochs": args.epochs, "init_bank": args.init_bank,
               "init_from": args.init_from, "transfer": args.transfer, "freeze": args.freeze,
               "probe_after": args.probe_after, "amp_epsilon": args.amp_epsilon,
               "test_acc": finals,
               "best_test_acc": {str(s): max(h["test_acc"]) for s, h in histories.items()},
               "train_acc": {str(s): h["train_acc"][-1] for s, h in histories.items()},
               "val_acc": {str(s): h["val_acc"][-1] for s, h in histories.items()
                           if "val_acc" in h},
               "mean": accs.mean().item(), "std": std}
    write_json(os.path.join(args.out, "summary.json"), summary)
    print("\nseed | final test acc | best test acc | train acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:14.4f} | {summary['best_test_acc'][s]:13.4f} | "
              f"{summary['train_acc'][s]:.4f}")
    print(f"mean ± std over {len(accs)} seeds: {summary['mean']:.4f} ± {std:.4f}")
    print(f"wrote {args.out}/seed<N>/{{model.pt,metrics.csv,test_acc.png,kernels.png}} and "
          f"{args.out}/summary.json")


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
    if not torch.isfinite(bank["kernels"]).all():
        raise SystemExit(f"error: bank {path!r} holds non-finite kernels (NaN or inf); collect "
                         f"it again from checkpoints of runs that did not diverge")
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


def kernel_grid(kernels, nrow=8, scale=8):
    """[N, k, k] -> image [3, H, W] of the kernels, each scaled to its own range, enlarged."""
    big = F.interpolate(kernels[:, None].float(), scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(big, nrow=nrow, padding=scale // 2, normalize=True,
                                       scale_each=True, pad_value=1.0)


def save_kernel_grid(kernels, path, nrow=16):
    write_atomic(path, lambda tmp: torchvision.utils.save_image(kernel_grid(kernels, nrow), tmp))


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
    """The 100-image task, on the device: a dict of train_x/_y (--per-class images of every class,
    drawn by --subset-seed), val_x/_y (--val-size other training images, never the subset: the
    split for choosing what the paper does not fix), test_x/_y (the test split, or --test-limit of
    it) and classes."""
    train_x, train_y, classes = load_split(args.data, args.data_root, "train")
    test_x, test_y, test_classes = load_split(args.data, args.data_root, "test")
    if test_classes != classes:
        raise SystemExit(f"error: train and test class folders differ: {classes} vs {test_classes}")
    keep = small_subset(train_y, args.per_class, args.subset_seed)
    rest = torch.ones(len(train_y), dtype=torch.bool)
    rest[keep] = False
    rest = rest.nonzero().flatten()
    if args.val_size > len(rest):
        raise SystemExit(f"error: --val-size {args.val_size} is more than the {len(rest)} training "
                         f"images outside the {len(keep)} of the small subset")
    g = torch.Generator().manual_seed(args.subset_seed + 1)
    val = rest[torch.randperm(len(rest), generator=g)[:args.val_size]]
    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
    pick = pick[:args.test_limit or len(pick)]  # in random order: any first N are a fair sample
    test_x, test_y = test_x[pick], test_y[pick]
    data = {"train_x": train_x[keep], "train_y": train_y[keep], "val_x": train_x[val],
            "val_y": train_y[val], "test_x": test_x, "test_y": test_y}
    data = {k: (as_cifar_images(v) if k.endswith("_x") else v).to(device) for k, v in data.items()}
    return dict(data, classes=classes)


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


def stop_if_diverged(loss, where, flags):
    """A run whose loss is not finite stops here, before it overwrites its last good checkpoint."""
    if not math.isfinite(loss):
        raise SystemExit(f"error: the training loss is {loss} at {where}; the run diverged. Its "
                         f"last good checkpoint is kept. Lower {flags} and run again with "
                         f"another --out")


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


def write_csv(path, rows):
    """A list of dicts as CSV; the columns are their keys, in the order they first appear."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(dict.fromkeys(k for r in rows for k in r)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


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


def accuracies(model, data, final, curve_size, precision):
    """Accuracy on the training images, the validation split (if any) and the test set: all of
    the test set at the run's end, its first `curve_size` images (a fixed random sample) before."""
    out = {}
    with autocast(precision, data["train_x"].device):
        for split in ("train", "val", "test"):
            x, y = data[f"{split}_x"], data[f"{split}_y"]
            if split == "test" and curve_size and not final:
                x, y = x[:curve_size], y[:curve_size]
            if len(x):
                out[f"{split}_acc"] = evaluate(model, x, y)
    return out


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each default once: a flag that is off or unset by default, or whose help
    already says its default, gets no "(default: ...)" appended."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


if __name__ == "__main__":  # at the very end, so that the plumbing above is defined
    main()
