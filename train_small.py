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
import argparse, csv, functools, hashlib, io, json, math, os, pathlib, sys, time

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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.register("type", None, os.path.expanduser)  # a string flag (a path): ~ expanded
    add = p.add_argument  # the source of each default in (...); the why: docs/defaults.md
    add("--data", default="cifar10", help="cifar10 | PATH of an ImageFolder tree (paper)")
    add("--data-root", default="data", help="where torchvision downloads datasets (ours)")
    add("--per-class", type=int, default=10, help="training images per class (paper: 100 in all)")
    add("--subset-seed", type=int, default=0, help="seed that draws the training images (ours)")
    add("--val-size", type=int, default=0, metavar="N", help="validation images; 0 = none (ours)")
    add("--test-limit", type=int, default=0, help="this many test images; 0 = all (ours)")
    add("--seeds", type=int, nargs="+", default=[0], help="one run per seed (ours)")
    add("--epochs", type=int, default=1000, help="epochs (paper)")
    add("--batch-size", type=int, default=16, help="images per step (paper)")
    add("--lr", type=float, default=2e-3, help="Adam's learning rate (paper; notebook: 2e-4)")
    add("--weight-decay", type=float, default=1e-3, help="Adam's (paper; notebook: 1e-4)")
    add("--betas", type=float, nargs=2, default=[0.5, 0.999], help="Adam's betas (paper)")
    add("--no-augment", action="store_true", help="no crop + flip (paper: on; notebook: off)")
    add("--init-bank", metavar="BANK", help="conv1 drawn from this collect_kernels.py bank (ours)")
    add("--init-from", metavar="CKPT", help="start from this checkpoint; {seed}: the run's (ours)")
    add("--transfer", nargs="+", choices=LAYERS, metavar="LAYER", help="copied: --init-from (ours)")
    add("--freeze", nargs="+", choices=LAYERS, default=[], metavar="LAYER", help="fixed (ours)")
    add("--probe-after", choices=LAYERS[:4], metavar="LAYER", help="probe after it (seed 003)")
    add("--amp-epsilon", type=float, metavar="EPS", help="AMP with this radius (off; ours: 1)")
    add("--amp-inner-lr", type=float, default=1.0, help="AMP's ascent step size (AMP's code)")
    add("--amp-inner-steps", type=int, default=1, help="AMP's ascent steps a batch (AMP's code)")
    add("--eval-every", type=int, default=50, help="evaluate every N epochs (ours)")
    add("--log-every", type=int, default=50, help="a progress line every N epochs (ours)")
    add("--curve-size", type=int, default=2000, metavar="N", help="test images mid-run (ours)")
    add("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (ours)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(ours)")
    add("--threads", type=int, default=0, help="CPU threads; 0 = torch's default (ours)")
    add("--out", default="runs/small", help="folder of the runs' files (ours)")
    args = p.parse_args(argv)
    counts = ("per_class", "epochs", "batch_size", "eval_every", "log_every", "amp_inner_steps")
    checks = [(vars(args)[k] < 1, f"--{k.replace('_', '-')} must be >= 1, got {vars(args)[k]}")
              for k in counts] + [
        (min(args.test_limit, args.val_size, args.curve_size) < 0,
         "--test-limit, --val-size and --curve-size must be >= 0 (0 = all / none)"),
        (args.amp_epsilon is not None and not args.amp_epsilon >= 0,
         f"--amp-epsilon must be >= 0, got {args.amp_epsilon}"),
        (not args.amp_inner_lr >= 0, f"--amp-inner-lr must be >= 0, got {args.amp_inner_lr}"),
        (len(set(args.seeds)) != len(args.seeds), f"--seeds has duplicates: {args.seeds}"),
        (set(args.freeze) == set(LAYERS), "--freeze names every layer: nothing would train"),
        (args.transfer is not None and args.init_from is None, "--transfer needs --init-from"),
        (args.init_from is not None and args.init_bank is not None,
         "--init-bank and --init-from both initialize the network: choose one"),
        (args.probe_after and (args.init_from is None or args.freeze or args.transfer),
         "--probe-after needs --init-from, and sets --transfer and --freeze: leave them out")]
    for failed, message in checks:
        if failed:
            p.error(message)
    convs = list(LAYERS[:4])  # --probe-after freezes them all; --init-from transfers them
    freeze = convs if args.probe_after else args.freeze
    transfer = convs if args.init_from is not None and args.transfer is None else args.transfer
    return argparse.Namespace(**dict(vars(args), freeze=freeze, transfer=transfer))


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

def init_checkpoint(pattern, seed, layers, model):
    """The pretrained state_dict for `seed` ({seed} in the pattern), checked against the layers
    it must give: the paper's CNN's shapes, and for fc the model's class count."""
    path = init_path(pattern, seed)
    if not os.path.exists(path):
        raise UserError(f"--init-from {path!r} not found (for seed {seed})")
    state, own = read_checkpoint(path)["model"], model.state_dict()
    names = [name for layer in layers for name in modules_of(layer)]
    for key in (k for k in own if k.split(".")[0] in names):
        shape = tuple(state[key].shape) if key in state else None
        if key.startswith("fc.") and shape not in (None, own[key].shape):
            raise UserError(f"{path} has a head for {shape[0]} classes, not {own[key].shape[0]}; "
                            f"leave fc out of --transfer (a new head is trained)")
        if not key.startswith("fc.") and shape != own[key].shape:
            raise UserError(f"{path} is not the paper's CNN: {key} is {shape}, expected "
                            f"{tuple(own[key].shape)}")
    return state


def init_path(pattern, seed):
    return os.path.expanduser(pattern.replace("{seed}", str(seed)))


def file_sha256(path):
    """The file's SHA-256: which checkpoint a run started from, matched to a bank's sources."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
    # TRY NOT TO MODIFY: the run as one dict, saved at every evaluation; an interrupted run
    # resumes where it stopped, and a folder holding a run with other training flags is refused
    run_dir = os.path.join(args.out, f"seed{seed}")
    path = os.path.join(run_dir, "model.pt")
    flags = {key: value for key, value in vars(args).items() if key not in FREE_FLAGS}
    ckpt = {"model": model, "optimizer": optimizer, "arch": ARCH, "epoch": 0, "args": vars(args),
            "history": {"train_loss": [], "eval_epoch": []}, "flags": flags, "seed": seed,
            "classes": data["classes"], "dataset": args.data, **row_label(args),
            "init_from_sha256": args.init_from and file_sha256(init_path(args.init_from, seed))}
    saved = resume(path, ckpt, flags)
    if saved and saved["epoch"] > args.epochs:
        raise UserError(f"{path} already has {saved['epoch']} epochs, more than --epochs "
                        f"{args.epochs}; pass a larger --epochs or another --out")
    if saved:
        print(f"{run_dir}: resuming after epoch {saved['epoch']}")
        ckpt.update(epoch=saved["epoch"], history=saved["history"])
    history, train_x, train_y = ckpt["history"], data["train_x"], data["train_y"]
    n, bs = len(train_x), args.batch_size
    lower = "--lr" + (" or --amp-epsilon" if args.amp_epsilon is not None else "")  # if diverged
    loss_sums = torch.zeros(args.epochs, device=device)  # per epoch, summed on the device
    clock, clock_epoch = time.time(), ckpt["epoch"]
    for epoch in range(ckpt["epoch"], args.epochs):
        train_mode(model, args.freeze)
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            loss_sums[epoch] += train_step(model, optimizer, images, train_y[idx], args) * len(idx)

        done = epoch + 1
        if done % args.eval_every == 0 or done == args.epochs:  # evaluate, then checkpoint
            # the losses since the last evaluation (a non-finite one stops the run), then the
            # accuracies on the training images, the validation split and the test set
            new_losses = (loss_sums / n)[len(history["train_loss"]):done].tolist()
            stop_if_diverged(sum(new_losses), f"epoch {done}", lower)
            history["train_loss"] += new_losses
            history["eval_epoch"].append(done)
            accuracies(history, model, data, done == args.epochs, args.curve_size, args.precision)
            os.makedirs(run_dir, exist_ok=True)
            save_checkpoint(path, dict(ckpt, epoch=done))  # weights, optimizer, RNGs, history
        if done % args.log_every == 0 or done == args.epochs:
            loss = (loss_sums[epoch] / n).item()  # one host sync per progress line
            stop_if_diverged(loss, f"epoch {done}", lower)
            now = time.time()
            seconds_each, clock, clock_epoch = (now - clock) / max(done - clock_epoch, 1), now, done
            progress(f"seed {seed}", done, args.epochs, seconds_each,
                     progress_text(loss, history, math.log(k), seconds_each, lower))
    write_run_outputs(run_dir, model, history, f"seed {seed}")
    return history


def progress_text(loss, history, chance, seconds_each, flags):
    """Loss, the last accuracies and the speed; a warning when the loss is far above chance."""
    accs = " ".join(f"{split} {history[f'{split}_acc'][-1]:.4f}"
                    for split in ("train", "val", "test") if history.get(f"{split}_acc"))
    warn = f" | loss above 2 x chance ({chance:.2f}): diverging? lower {flags}"
    return (f"loss {loss:.4f} | acc {accs or '-'} | {seconds_each * 1000:6.1f} ms/epoch"
            + (warn if loss > 2 * chance else ""))


# ----------------------------------------------------------------------------- outputs
def row_label(args):
    """The run's row in collect_kernels.py --compare, stored in its checkpoint: a label and an
    order key. Rows go from nothing transferred to the most: the baseline, AMP by ε, conv1 from
    a bank, then the transfer runs by the layers transferred, frozen before trained at each."""
    transfer, frozen = sorted(args.transfer or []), sorted(args.freeze)
    parts = [transfer_recipe(args, transfer, frozen)] if transfer else []
    if args.amp_epsilon is not None:
        parts.append(f"AMP ε = {args.amp_epsilon:g}")
    parts = (parts or ["baseline (λ = 0)"]) + (["conv1 from bank"] if args.init_bank else [])
    if frozen and not transfer:
        parts.append(f"frozen {layers_label(frozen)}")
    if transfer:
        order = [3, len(transfer), -len(frozen), 0.0]
    elif args.init_bank:  # the kernel prior's rung, with train_advreg.py's bank-initialized runs
        order = [2, True, 0, 0]
    else:  # nothing transferred: the baseline, AMP by ε
        order = [1, 0, 0, args.amp_epsilon] if args.amp_epsilon is not None else [0, 0, 0, 0.0]
    return {"label": ", ".join(parts), "row_order": order}


def transfer_recipe(args, transfer, frozen):
    """The known transfer recipes by name; any other by the layers transferred and frozen."""
    convs = list(LAYERS[:4])
    if args.probe_after not in (None, "conv4"):
        return f"linear probe after {args.probe_after}"
    if "fc" in transfer and os.path.basename(args.init_from) == "model.pt":  # probe, then tune
        return "LP-FT"
    if transfer == convs and frozen == convs:
        return "linear probe (transfer conv1-4, frozen conv1-4)"
    if transfer == convs and not frozen:
        return "fine-tune (transfer conv1-4)"
    return f"transfer {layers_label(transfer)}" + (f", frozen {layers_label(frozen)}"
                                                   if frozen else "")


def layers_label(layers):
    """["conv1", "conv2", "conv3"] -> "conv1-3"; ["conv1", "conv2"] -> "conv1+conv2"."""
    numbers = [int(name[4:]) for name in layers if name[:4] == "conv" and name[4:].isdigit()]
    if len(layers) >= 3 and len(numbers) == len(layers) \
            and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"conv{numbers[0]}-{numbers[-1]}"
    return "+".join(layers)

def write_run_outputs(run_dir, model, history, title):
    """metrics.csv, Fig. 8 (test accuracy) and Fig. 6 (conv1's kernels) of one run."""
    at = {split: dict(zip(history["eval_epoch"], history[f"{split}_acc"]))
          for split in ("train", "val", "test") if f"{split}_acc" in history}
    rows = [{"epoch": epoch, "train_loss": f"{loss:.5f}",
             **{f"{s}_acc": f"{a[epoch]:.4f}" if epoch in a else "" for s, a in at.items()}}
            for epoch, loss in enumerate(history["train_loss"], start=1)]
    write_csv(os.path.join(run_dir, "metrics.csv"), rows)
    curves = {split: (history["eval_epoch"], history[f"{split}_acc"]) for split in at}
    plot_lines(os.path.join(run_dir, "test_acc.png"),
               [(f"accuracy (Fig. 8: test) — {title}", "epoch", "accuracy", curves)])
    save_grid(os.path.join(run_dir, "kernels.png"), model.conv1.weight.reshape(-1, 1, 7, 7),
              nrow=16, scale=8)


def write_summary(args, histories):
    """summary.json: final and best test accuracy per seed, their mean and std; the table."""
    def per_seed(split, pick=lambda accs: accs[-1]):
        return {str(s): pick(h[split]) for s, h in histories.items() if split in h}

    finals = per_seed("test_acc")
    accs = torch.tensor(list(finals.values()), dtype=torch.float64)
    std = accs.std().item() if len(accs) > 1 else 0.0
    run = ("init_bank", "init_from", "transfer", "freeze", "probe_after", "amp_epsilon")
    summary = {"dataset": args.data, "epochs": args.epochs, **{k: vars(args)[k] for k in run},
               "test_acc": finals, "best_test_acc": per_seed("test_acc", max),
               "train_acc": per_seed("train_acc"), "val_acc": per_seed("val_acc"),
               "mean": accs.mean().item(), "std": std}
    write_json(os.path.join(args.out, "summary.json"), summary)
    print("\nseed | final test acc | best test acc | train acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:14.4f} | {summary['best_test_acc'][s]:13.4f} | "
              f"{summary['train_acc'][s]:.4f}")
    print(f"mean ± std over {len(accs)} seeds: {summary['mean']:.4f} ± {std:.4f}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args)  # --threads, then --device
    warn_if_bf16_is_slow(args.precision, device)
    t0 = time.time()
    data = load_small_data(args, device)
    for seed in args.seeds:  # the bank and checkpoints, read before anything trains or is written
        initialize(PaperCNN(len(data["classes"])), seed, args)
    print(f"data: {args.data} | {len(data['train_x'])} train images ({args.per_class} per class, "
          f"subset seed {args.subset_seed}) / {len(data['val_x'])} val / {len(data['test_x'])} "
          f"test | loaded in {time.time() - t0:.1f} s | device {device}")
    os.makedirs(args.out, exist_ok=True)
    histories = {seed: train(seed, args, data, device) for seed in args.seeds}
    write_summary(args, histories)


# ----------------------------------------------------------------------------- data
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
            raise UserError(f"class {c} has only {len(of_class)} training images, "
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
        raise UserError(f"train and test class folders differ: {classes} vs {test_classes}")
    keep = small_subset(train_y, args.per_class, args.subset_seed)
    rest = torch.isin(torch.arange(len(train_y)), keep, invert=True).nonzero().flatten()
    if args.val_size > len(rest):
        raise UserError(f"--val-size {args.val_size} is more than the {len(rest)} training "
                         f"images outside the {len(keep)} of the small subset")
    g = torch.Generator().manual_seed(args.subset_seed + 1)
    val = rest[torch.randperm(len(rest), generator=g)[:args.val_size]]
    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
    pick = pick[:args.test_limit or len(pick)]  # in random order: any first N are a fair sample
    data = {"train_x": train_x[keep], "train_y": train_y[keep], "val_x": train_x[val],
            "val_y": train_y[val], "test_x": test_x[pick], "test_y": test_y[pick]}
    data = {k: (as_cifar_images(v) if k.endswith("_x") else v).to(device) for k, v in data.items()}
    return dict(data, classes=classes)

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

def accuracies(history, model, data, final, curve_size, precision):
    """Append to `history` the accuracy on the training images ("train_acc"), the validation
    split ("val_acc", if any) and the test set ("test_acc"): all of the test set at the run's end,
    its first `curve_size` images (a fixed random sample) before."""
    with autocast(precision, data["train_x"].device):
        for split in ("train", "val", "test"):
            x, y = data[f"{split}_x"], data[f"{split}_y"]
            if split == "test" and curve_size and not final:
                x, y = x[:curve_size], y[:curve_size]
            if len(x):
                history.setdefault(f"{split}_acc", []).append(evaluate(model, x, y))


# ----------------------------------------------------------------------------- checkpoints, banks
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
        raise UserError(f"{path} is not a checkpoint of the paper's CNN (corrupt, or not one of "
                        f"pretrain.py, train_small.py, train_advreg.py or the authors' models)")
    return ckpt

def load_bank(path, kernel_size=None):
    """A bank written by collect_kernels.py ("kernels" [N, k, k] as float), checked against k."""
    if not os.path.exists(path):
        raise UserError(f"kernel bank {path!r} not found; make it with `python collect_kernels.py "
                        f"--checkpoints checkpoints/ --out {os.path.dirname(path) or '.'}`")
    try:
        bank = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        bank = None
    if not isinstance(bank, dict) or not isinstance(bank.get("kernels"), torch.Tensor) \
            or bank["kernels"].dim() != 3:
        raise UserError(f"{path!r} is not a kernel bank (corrupt or another format); "
                         f"banks are written by collect_kernels.py")
    k = bank["kernels"].shape[-1]
    if kernel_size is not None and k != kernel_size:
        raise UserError(f"bank {path!r} holds {k}x{k} kernels, but the layer it is for "
                         f"has {kernel_size}x{kernel_size} kernels")
    if not torch.isfinite(bank["kernels"]).all():
        raise UserError(f"bank {path!r} holds non-finite kernels (NaN or inf); collect "
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


# ----------------------------------------------------------------------------- precision
def autocast(precision, device):
    """bf16: forward passes in bfloat16 where autocast deems it safe; weights, gradients and
    optimizer state stay float32. fp32: a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def warn_if_bf16_is_slow(precision, device):
    """One line to stderr at the start of a run: --precision bf16 on a CPU without native bf16."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX), so --precision bf16 "
              "runs many times slower than fp32 (13x measured: docs/train_small.md); drop it "
              "and use --precision fp32, the default", file=sys.stderr, flush=True)


def cpu_has_native_bf16(flags=("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")):
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm):
    torch.cpu.get_capabilities, else Linux's /proc/cpuinfo; True when neither can tell."""
    if hasattr(torch.cpu, "get_capabilities"):
        return any(torch.cpu.get_capabilities().get(flag, False) for flag in flags)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    return not cpuinfo.exists() or bool(set(flags) & set(cpuinfo.read_text().split()))


# ==== plumbing: skip on a first read; each copy the same, checked by test_smoke.py ====
# ------------------------------------- in the four that train: the device, a run's files, progress
def pick_device(args):
    """--threads, then --device: 'auto' is CUDA, else Apple's MPS, else the CPU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(n for n, there in ok.items() if there) if args.device == "auto" else args.device
    if not ok[name]:
        raise UserError(f"--device {name}: torch cannot use it here (try --device cpu)")
    return torch.device(name)


def write_json(path, obj):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2)))


def save_checkpoint(path, ckpt):
    """One dict, written atomically: each module and optimizer as its state_dict, the other
    values as they are, with the format and the random generators' state."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    saved = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in ckpt.items()}
    write_atomic(path, lambda tmp: torch.save(saved | {"format": FORMAT, "rng": rng}, tmp))


def resume(path, ckpt, flags):
    """Load the run saved at `path` into the modules and optimizers of `ckpt` (as given to
    save_checkpoint) and restore the random generators; returns the saved dict, or None where
    there is none yet. Refused in one line: a damaged file, an earlier format, and a run whose
    defining flags (`flags`, name -> value) differ from the command's."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): damaged? Use another --out")
    fmt = saved.get("format", 1) if isinstance(saved, dict) else "unknown"
    if fmt != FORMAT:
        raise UserError(f"{path} has checkpoint format {fmt}, not {FORMAT}: use another --out")
    changed = [f"--{k.replace('_', '-')} {saved['flags'].get(k)!r} (now {v!r})"
               for k, v in flags.items() if saved["flags"].get(k) != v]
    if changed:
        raise UserError(f"{path} is a run with other flags: {', '.join(changed)}; another --out?")
    for key, obj in ckpt.items():
        if hasattr(obj, "load_state_dict"):
            obj.load_state_dict(saved[key])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu())
    return saved


def stop_if_diverged(loss, where, flags):
    """A run whose loss is not finite stops here, before it overwrites its last good checkpoint."""
    if not math.isfinite(loss):
        raise UserError(f"the training loss is {loss} at {where}; the run diverged (its last "
                        f"good checkpoint is kept): lower {flags} and run again, another --out")


def progress(name, done, total, seconds_each, text):
    """One progress line: where the run is, what it measures, and the time left."""
    eta = seconds_each * (total - done) / 60
    print(f"{name} | {done}/{total} | {text} | ETA {eta:.1f} min", flush=True)


# ---------------------------------------- in the four that write tables and grids: CSV, image grids
def write_csv(path, rows):
    """A list of dicts as CSV; the columns are their keys, in the order they first appear."""
    buffer, columns = io.StringIO(), list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(buffer.getvalue()))


def save_grid(path, images, nrow=8, value_range=None, scale=1):
    """Images [N, C, H, W] as one grid PNG, each enlarged `scale` times; value_range=(lo, hi)
    maps that range to black..white for all, None scales each image to its own range
    (kernels, saliency maps)."""
    big = F.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(big, nrow, max(2, scale // 2), normalize=True,
                                       value_range=value_range, scale_each=value_range is None)
    write_atomic(path, lambda tmp: torchvision.utils.save_image(grid, tmp))


# ------------------------------------------------------------ in all five scripts, word for word
class UserError(Exception):
    """A mistake in the input (a flag, a file), or a run that cannot go on: one line, exit 1."""


def entry_point(main, argv=None):
    """Run main(argv). A UserError, a failed read or write (a full disk) or Ctrl-C ends the
    program with one line and a non-zero exit, instead of a traceback."""
    try:
        main(argv)
    except (UserError, OSError) as e:  # OSError: a file that could not be read, and why
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every file written so far is whole; the same command resumes")


TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST"}


@functools.lru_cache(maxsize=4)  # a run may read a split more than once: decode it once
def load_split(data, root, split):
    """One split ("train" or "test") as (uint8 images [N, C, H, W], int64 labels [N], class
    names): a torchvision name (downloaded into `root`) or an ImageFolder tree
    data/{train,test}/<class>/<image>. Grayscale trees stay 1-channel; an image of another size
    than the first is resized to it. Every image is decoded once, here."""
    if data in TORCHVISION_DATASETS:
        try:  # offline, any exception (URLError, RuntimeError, ...) means "no download"
            ds = getattr(torchvision.datasets, TORCHVISION_DATASETS[data])(
                root, train=split == "train", download=True)
        except Exception as e:
            raise UserError(f"could not download {data} ({type(e).__name__}): offline? --data DIR")
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        order = torch.sort(y, stable=True).indices  # class by class, as an ImageFolder tree is
        x = torch.as_tensor(ds.data)[order]  # [N, H, W] (MNIST) or [N, H, W, C]
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), y[order], list(ds.classes)
    if not os.path.isdir(data):
        raise UserError(f"--data {data!r}: neither {', '.join(TORCHVISION_DATASETS)} nor a folder")
    # ImageFolder finds the class folders (sorted) and their images; a missing folder or a file
    # that is not an image is an OSError, which entry_point prints as one line with its path
    ds = torchvision.datasets.ImageFolder(os.path.join(data, split))
    print(f"decoding the {len(ds.samples)} images of {data}/{split}", flush=True)
    images, mode = [], None
    for path, _ in ds.samples:
        with PIL.Image.open(path) as img:
            mode = mode or ("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")  # the first's
            img = torchvision.transforms.functional.pil_to_tensor(img.convert(mode))
        images.append(resize_uint8(img[None], images[0].shape[-1])[0] if images else img)
    return torch.stack(images), torch.tensor(ds.targets), ds.classes


def resize_uint8(x, size):
    """uint8 images [N, C, H, W] -> [N, C, size, size] (bilinear, antialiased), in chunks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True)
           for c in x.split(8192)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def write_atomic(path, write):
    """write(tmp) to a temporary name, then rename it to `path`: a Ctrl-C, a kill or a full disk
    never leaves half a file, and the previous version stays until the new one is whole."""
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"  # savefig reads the format from the end
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too: no temporary file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        torch_write = "inline_container" in str(e) or "PytorchStreamWriter" in str(e)
        if not (isinstance(e, OSError) or torch_write):  # torch.save's full disk: RuntimeError
            raise  # any other exception is a bug, shown as one
        reason = getattr(e, "strerror", None) or "is the disk full?"
        raise UserError(f"could not write {path} ({reason}); its last version is kept") from e


FORMAT = 2  # a checkpoint of this project: one dict; earlier formats are refused by name


def plot_lines(path, panels, width=4.5, dpi=100):
    """Line plots side by side, one panel per (title, xlabel, ylabel, curves); curves maps a
    label to (x, y) or (x, y, error bars). A title that ends in "(log)" gets a log y axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.4), squeeze=False)
    for ax, (title, xlabel, ylabel, curves) in zip(axes[0], panels):
        for label, (x, y, *err) in curves.items():
            ax.errorbar(x, y, yerr=err[0] if err else None, marker=".", capsize=3, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.set_yscale("log" if title.endswith("(log)") else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi)


def save_figure(fig, path, dpi=100):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    plt.close(fig)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each default once: a flag off or unset by default, or whose help already
    says its default, gets no "(default: ...)" appended."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


if __name__ == "__main__":  # at the very end, so that the plumbing above is defined
    entry_point(main)
