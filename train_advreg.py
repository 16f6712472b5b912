"""Stage 4 — adversarial regularization of convolution kernels (the paper's Algorithm 1).

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), Algorithm 1 and Figures
4, 5, 7, 9, 10. The classifier trains on 100 CIFAR-10 images (as in `train_small.py`) while a
discriminator D learns to tell kernels of the bank (pretrained models, `collect_kernels.py`) from
the classifier's own kernels. The classifier is the generator, G(z) = z: the "fake" samples are its
own current kernels, so the generator's loss reaches its weights directly. Per batch of images:
    cls_loss  = cross-entropy of the classifier on the batch
    fake      = --d-batch random k x k slices of the layer's weight (differentiable);
    real      = --d-batch random bank kernels
    reg_loss  = -log D(fake)                 (non-saturating generator loss)
    classifier step on  cls_loss + lam * reg_loss
    D step on  disc_loss = lam * (-log D(real) - log(1 - D(fake.detach())))
`--layers conv1 conv2` gives each layer its own D and bank (the paper's architecture extension);
lam = 0 trains the baseline with this same code. D is the authors' notebook's; --d-input shows it
the raw kernels (notebook) or each kernel standardized (this project: D sees shape, not scale).

    python train_advreg.py --bank kernels/conv1_7x7.pt --lam 1 --seeds 0 --out runs/advreg
    python train_advreg.py --lam 0 0.01 0.1 1 --seeds 0 1 2 3 4 --init-bank kernels/conv1_7x7.pt
    python collect_kernels.py --compare runs/advreg/*/model.pt --bank kernels/conv1_7x7.pt \
        --out runs/advreg/compare                                     # the table of the runs
    python train_advreg.py --data PATH --bank kernels/conv1_7x7.pt --epochs 50 --eval-every 25 \
        --test-limit 1000                                             # quick CPU run

Reads:  the dataset; the banks of collect_kernels.py.
Writes: <out>/lam<lam>_seed<N>[_bankinit]/: model.pt (classifier and discriminators, rewritten at
        every evaluation: an interrupted run resumes), metrics.csv (per iteration: losses, D(real),
        D(fake); accuracies at evaluations), losses.png (Fig. 4), d_outputs.png (Fig. 5),
        kernels_<layer>.png (Fig. 7/10), test_acc.png (Fig. 9), summary.json; with --gif-every,
        <out>/kernels_seed<N>.gif (conv1's kernels of every lam of that seed, side by side).
Results and the commands behind them: docs/train_advreg.md.
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
import matplotlib.animation
import matplotlib.pyplot as plt
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# flags that cannot change what a run computes (free when a run is resumed), and the grid's own
FREE_FLAGS = {"epochs", "eval_every", "log_every", "gif_every", "curve_size", "device", "threads",
              "out", "data_root", "lam", "seeds", "init_bank"}


# ----------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 4: train on 100 CIFAR-10 images with adversarial kernel "
                    "regularization (Algorithm 1); a grid over --lam and --seeds (its table: "
                    "collect_kernels.py --compare).",
        formatter_class=HelpFormatter)
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
                        "zero mean, unit std (standardized: this project, docs/train_advreg.md)")
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
    p.add_argument("--val-size", type=int, default=0, metavar="N",
                   help="validation images drawn from the rest of the training split (this "
                        "project; the paper has none: 0 = no validation split)")
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
    p.add_argument("--curve-size", type=int, default=2000, metavar="N",
                   help="test images (a fixed random sample) behind the accuracy curve along the "
                        "run; the last evaluation uses the whole test set; 0 = the whole set "
                        "every time (this project: keeps evaluation cheap, docs/train_advreg.md)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast the classifier's and D's forward passes (float32 weights "
                        "and optimizer state); faster on CPUs with AVX512-BF16 / AMX and on "
                        "recent GPUs, much slower without native bf16 (docs/train_advreg.md)")
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
    if min(args.test_limit, args.gif_every, args.val_size, args.curve_size) < 0:
        p.error("--test-limit, --val-size, --curve-size and --gif-every must be >= 0 "
                "(0 = all / none / off)")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.lam)) != len(args.lam):
        p.error("--seeds and --lam must not repeat a value")
    return args


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


def make_discriminators(lam, seed, layers, args, device):
    """One D and its Adam per regularized layer (none for lam = 0), and the generator of D's
    kernel batches. Both have random streams of their own, so that for one seed every lam sees
    the same classifier init, batch order and augmentation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003)
        discs = {layer: KernelDiscriminator().to(device) for layer in layers} if lam > 0 else {}
    d_optimizers = {layer: torch.optim.Adam(d.parameters(), lr=args.d_lr, betas=tuple(args.d_betas),
                                            weight_decay=args.d_weight_decay)
                    for layer, d in discs.items()}
    return discs, d_optimizers, torch.Generator(device=device).manual_seed(seed + 2_000_003)


# ----------------------------------------------------------------------------- Algorithm 1
def bce(d_out, target):
    """Binary cross-entropy of D's outputs against 1 (bank) or 0 (fake). A diverged classifier
    has NaN kernels; their D output counts as 0.5, so the run reaches its next evaluation, which
    stops it with one line (F.binary_cross_entropy itself refuses NaN with a traceback)."""
    d_out = d_out.float().nan_to_num(0.5)  # float: the loss in full precision under bf16 too
    return F.binary_cross_entropy(d_out, torch.full_like(d_out, target))


def sample_fakes(model, discs, d_batch, d_gen):
    """G(z) = z: per regularized layer, a random batch of the classifier's own kernels (still
    attached to its weights, so the generator loss reaches them)."""
    fakes = {}
    for layer in discs:
        kernels = kernels_of(getattr(model, layer).weight)
        pick = torch.randperm(len(kernels), generator=d_gen, device=kernels.device)[:d_batch]
        fakes[layer] = kernels[pick]
    return fakes


def judge(discs, fakes, d_input):
    """D(G(z)) per layer. Computed once per iteration: the generator loss and D's fake term use
    the same outputs (D does not change between the two steps)."""
    return {layer: disc(to_d_input(fakes[layer], d_input)) for layer, disc in discs.items()}


def generator_loss(d_fakes):
    """Non-saturating generator loss -log D(G(z)), summed over layers (0 without a D)."""
    return sum((bce(d_fake, 1.0) for d_fake in d_fakes.values()), torch.zeros(()))


def discriminator_step(discs, d_optimizers, banks, d_fakes, lam, args, d_gen):
    """One D update per layer on real (bank) vs fake kernels (D(G(z)) from `judge`; only D's
    weights get its gradient); returns a dict of disc_loss, d_real, d_fake (means over layers)."""
    out = {"disc_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
    for layer, disc in discs.items():
        bank = banks[layer]
        real = bank[torch.randint(len(bank), (args.d_batch,), generator=d_gen, device=bank.device)]
        with autocast(args.precision, bank.device):
            d_real = disc(to_d_input(real, args.d_input))
        d_fake = d_fakes[layer]
        disc_loss = lam * (bce(d_real, 1.0) + bce(d_fake, 0.0))
        d_optimizers[layer].zero_grad(set_to_none=True)
        disc_loss.backward(inputs=list(disc.parameters()))
        d_optimizers[layer].step()
        out["disc_loss"] = out["disc_loss"] + disc_loss.detach()
        out["d_real"] = out["d_real"] + d_real.detach().mean() / len(discs)
        out["d_fake"] = out["d_fake"] + d_fake.detach().mean() / len(discs)
    return out


# ----------------------------------------------------------------------------- training
def train(lam, seed, bank_init, args, data, banks, device):
    """One run of Algorithm 1 (resumable); returns its summary."""
    name = run_name(lam, seed, bank_init)
    torch.manual_seed(seed)
    model = PaperCNN(len(data["classes"])).to(device)
    if bank_init:
        init_conv1_from_bank(model, load_bank(args.init_bank, 7)["kernels"], seed)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay,
                                 betas=tuple(args.betas))
    discs, d_optimizers, d_gen = make_discriminators(lam, seed, banks, args, device)
    train_x, train_y = data["train_x"], data["train_y"]
    n, bs = len(train_x), args.batch_size
    iters_per_epoch = math.ceil(n / bs)
    run = Run(os.path.join(args.out, name), args, lam, seed, bank_init, data["classes"],
              {"model": model, "optimizer": optimizer, "discs": discs,
               "d_optimizers": d_optimizers}, d_gen, args.epochs * iters_per_epoch, device)
    for epoch in range(run.epoch_done, args.epochs):
        perm = torch.randperm(n, device=device)
        for step, i in enumerate(range(0, n, bs)):
            idx = perm[i:i + bs]
            images = train_x[idx] if args.no_augment else augment(train_x[idx])
            # Algorithm 1, one iteration:
            with autocast(args.precision, device):  # a no-op unless --precision bf16
                cls_loss = F.cross_entropy(model(normalize(images)), train_y[idx])  # cls loss
                fakes = sample_fakes(model, discs, args.d_batch, d_gen)             # G(z) = z
                d_fakes = judge(discs, fakes, args.d_input)                         # D(G(z))
            reg_loss = generator_loss(d_fakes)                                      # -log D(G(z))
            # the classifier step on cls_loss + lam * reg_loss: only the classifier's weights get
            # its gradient, and the graph through D stays for D's own step below
            optimizer.zero_grad(set_to_none=True)
            (cls_loss + lam * reg_loss).backward(inputs=params, retain_graph=bool(discs))
            optimizer.step()
            it = epoch * iters_per_epoch + step
            run.log["cls_loss"][it] = cls_loss.detach()
            if discs:                                                           # D step
                d_out = discriminator_step(discs, d_optimizers, banks, d_fakes, lam, args, d_gen)
                run.record(it, reg_loss=reg_loss.detach(), **d_out)

        done = epoch + 1
        if args.gif_every and done % args.gif_every == 0:
            run.frames.append(model.conv1.weight.detach().cpu().reshape(-1, 7, 7).clone())
        if done % args.eval_every == 0 or done == args.epochs:
            run.evaluate_and_save(model, data, done, iters_per_epoch)
        if done % args.log_every == 0 or done == args.epochs:
            run.print_progress(done, iters_per_epoch)
    return finish_run(run, model, banks)


def run_name(lam, seed, bank_init):
    return f"lam{lam:g}_seed{seed}" + ("_bankinit" if bank_init else "")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    warn_if_bf16_is_slow(args.precision, device)
    # Every input is checked before any run starts: a mistake costs nothing, overwrites nothing.
    banks = {layer: load_bank(path, CONV_SHAPES[layer][-1])["kernels"].to(device)
             for layer, path in zip(args.layers, args.bank)}
    if args.init_bank:
        load_bank(args.init_bank, 7)
    t0 = time.time()
    data = load_small_data(args, device)
    print(f"data: {args.data} | {len(data['train_x'])} train images ({args.per_class} per class) / "
          f"{len(data['val_x'])} val / {len(data['test_x'])} test | loaded in "
          f"{time.time() - t0:.1f} s | device {device} | banks: "
          + ", ".join(f"{layer} {list(b.shape)}" for layer, b in banks.items()))
    os.makedirs(args.out, exist_ok=True)
    for bank_init in [False] + ([True] if args.init_bank else []):
        for lam in args.lam:
            for seed in args.seeds:
                train(lam, seed, bank_init, args, data, banks, device)
    if args.gif_every:
        write_gifs(args)
    print(f"wrote per-run folders under {args.out}/; the table of every run there, mean ± std "
          f"over seeds:\n  python collect_kernels.py --compare {args.out}/*/model.pt --bank "
          f"{args.bank[0]} --out {args.out}/compare")


# ==== plumbing: the same in every script, checked by test_smoke.py; skip on a first read ====
class Run:
    """A run's bookkeeping: per-iteration log on the device, evaluations, checkpoint, progress.
    Made from the run's checkpoint when there is one (the run resumes after its last evaluation)."""

    def __init__(self, run_dir, args, lam, seed, bank_init, classes, states, d_gen, iters, device):
        self.dir, self.args, self.states, self.d_gen = run_dir, args, states, d_gen
        self.fields = {"lam": lam, "seed": seed, "bank_init": bank_init, "classes": classes,
                       "dataset": args.data}
        self.log = {c: torch.full((iters,), math.nan, device=device) for c in LOG_COLUMNS}
        self.history = {"eval_epoch": [], "test_acc": [], "epoch_done": 0, "seconds": 0.0}
        self.frames = []
        path = os.path.join(run_dir, "model.pt")
        ckpt = resume(path, states, run_flags(args, FREE_FLAGS), arch=ARCH, classes=classes)
        if ckpt is not None:
            d_gen.set_state(ckpt["rng_d"])
            self.history, self.frames = ckpt["history"], list(ckpt.get("frames", []))
            for j, c in enumerate(LOG_COLUMNS):
                self.log[c][:len(ckpt["log"])] = ckpt["log"][:, j].to(device)
            if self.epoch_done > args.epochs:
                raise SystemExit(f"error: {path} already has {self.epoch_done} epochs, more "
                                 f"than --epochs {args.epochs}; pass a larger --epochs or "
                                 f"another --out")
            if self.epoch_done < args.epochs:
                print(f"{os.path.basename(run_dir)}: resuming after epoch {self.epoch_done}")
        os.makedirs(run_dir, exist_ok=True)
        self.t_period = self.t_log = time.time()
        self.logged_epoch = self.epoch_done

    @property
    def epoch_done(self):
        return self.history["epoch_done"]

    def record(self, it, **values):
        for c, v in values.items():
            self.log[c][it] = v

    def evaluate_and_save(self, model, data, done, iters_per_epoch):
        """Check the period did not diverge, evaluate on train / val / test, checkpoint."""
        period = slice(self.epoch_done * iters_per_epoch, done * iters_per_epoch)
        stop_if_diverged(self.log["cls_loss"][period].sum().item(),
                         f"epoch {done} of {os.path.basename(self.dir)}", "--lr (or --lam, --d-lr)")
        h = self.history
        h["eval_epoch"].append(done)
        final = done == self.args.epochs
        for split, acc in accuracies(model, data, final, self.args.curve_size,
                                     self.args.precision).items():
            h.setdefault(split, []).append(acc)
        h["epoch_done"], h["seconds"] = done, h["seconds"] + time.time() - self.t_period
        log_table = torch.stack([self.log[c][:done * iters_per_epoch] for c in LOG_COLUMNS], 1)
        save_checkpoint(os.path.join(self.dir, "model.pt"), self.states, arch=ARCH, history=h,
                        log=log_table.cpu(), args=vars(self.args),
                        flags=run_flags(self.args, FREE_FLAGS), rng_d=self.d_gen.get_state(),
                        frames=self.frames, **self.fields)
        self.t_period = time.time()

    def print_progress(self, done, iters_per_epoch):
        secs = (time.time() - self.t_log) / max(done - self.logged_epoch, 1)
        self.t_log, self.logged_epoch = time.time(), done
        last_epoch = slice((done - 1) * iters_per_epoch, done * iters_per_epoch)
        recent = dict(zip(LOG_COLUMNS, torch.stack(
            [self.log[c][last_epoch].mean() for c in LOG_COLUMNS]).tolist()))  # one host sync
        acc = " ".join(f"{s} {self.history[f'{s}_acc'][-1]:.4f}" for s in ("train", "val", "test")
                       if self.history.get(f"{s}_acc"))
        game = "" if self.fields["lam"] == 0 else (  # at λ = 0 there is no D to report
            f" reg {recent['reg_loss']:.3f} disc {recent['disc_loss']:.3f} | D(real) "
            f"{recent['d_real']:.2f} D(fake) {recent['d_fake']:.2f}")
        print(f"{os.path.basename(self.dir)} | epoch {done:4d}/{self.args.epochs} | cls "
              f"{recent['cls_loss']:.3f}{game} | acc {acc or '-'} | {secs * 1000:5.0f} ms/epoch "
              f"| ETA {secs * (self.args.epochs - done) / 60:5.1f} min", flush=True)


def finish_run(run, model, banks):
    """The run's figures, metrics.csv and summary.json; returns the summary."""
    log = {c: v.cpu() for c, v in run.log.items()}
    history, f = run.history, run.fields
    title = f"lam={f['lam']:g}, seed {f['seed']}" + (", conv1 from bank" if f["bank_init"] else "")
    write_run_outputs(run.dir, model, log, history, banks, title)
    last = slice(-max(1, len(log["cls_loss"]) // 10), None)  # the last 10% of iterations
    d_last = {c: log[c][last].mean().item() for c in ("d_real", "d_fake")}
    summary = {"run": os.path.basename(run.dir), "lam": f["lam"], "seed": f["seed"],
               "init": "bank" if f["bank_init"] else "default",
               "final_test_acc": history["test_acc"][-1], "best_test_acc": max(history["test_acc"]),
               **{f"final_{s}_acc": history[f"{s}_acc"][-1] for s in ("train", "val")
                  if f"{s}_acc" in history},
               # lam = 0 has no D: null in JSON
               **{f"{c}_last10pct": None if math.isnan(v) else v for c, v in d_last.items()},
               "seconds": history["seconds"], **kernel_metrics(model, banks)}
    write_json(os.path.join(run.dir, "summary.json"), summary)
    return summary


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


def smooth(values, window):
    """Moving average that ignores NaN (lam = 0 has no D values); same length as `values`."""
    v = torch.as_tensor(values, dtype=torch.float64)
    ok = ~torch.isnan(v)
    kernel = torch.ones(1, 1, window, dtype=torch.float64)
    num = F.conv1d(torch.where(ok, v, 0.0)[None, None], kernel, padding=window // 2)
    den = F.conv1d(ok.double()[None, None], kernel, padding=window // 2)
    return (num / den)[0, 0, :len(v)].tolist()


def write_metrics_csv(path, log, history):
    """One row per iteration: the losses and D outputs; the accuracies where it was evaluated."""
    iters_per_epoch = len(log["cls_loss"]) // max(history["epoch_done"], 1)
    at_iteration = [e * iters_per_epoch for e in history["eval_epoch"]]
    acc_at = {s: dict(zip(at_iteration, history[f"{s}_acc"]))
              for s in ("train", "val", "test") if f"{s}_acc" in history}
    columns = [log[name].tolist() for name in LOG_COLUMNS]
    rows = []
    for i, row in enumerate(zip(*columns), start=1):
        rows.append({"iteration": i, "epoch": (i - 1) // iters_per_epoch + 1,
                     **{c: f"{v:.5f}" for c, v in zip(LOG_COLUMNS, row)},
                     **{f"{s}_acc": f"{a[i]:.4f}" if i in a else "" for s, a in acc_at.items()}})
    write_csv(path, rows)


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
    for split in ("train", "val", "test"):
        if f"{split}_acc" in history:
            ax.plot(history["eval_epoch"], history[f"{split}_acc"], marker=".", label=split)
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"Fig. 9 (test) — {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, os.path.join(run_dir, "test_acc.png"))

    for layer in ["conv1"] + [layer for layer in banks if layer != "conv1"]:  # Fig. 7 / 10
        kernels = kernels_of(getattr(model, layer).weight).detach().cpu()
        if len(kernels) > 256:  # conv2 has 8192 slices: show a fixed random sample
            pick = torch.randperm(len(kernels), generator=torch.Generator().manual_seed(0))
            kernels = kernels[pick[:256]]
        save_kernel_grid(kernels, os.path.join(run_dir, f"kernels_{layer}.png"))


def write_gifs(args):
    """Per seed: conv1's kernels of every lambda's run side by side, one frame per --gif-every."""
    for seed in args.seeds:
        frames = {}
        for lam in args.lam:
            path = os.path.join(args.out, run_name(lam, seed, False), "model.pt")
            frames[f"λ = {lam:g}"] = torch.load(path, weights_only=True)["frames"]
        write_gif(os.path.join(args.out, f"kernels_seed{seed}.gif"), frames, args.gif_every)


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


CONV_SHAPES = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 5, 5), "conv3": (128, 128, 5, 5),
               "conv4": (256, 128, 3, 3)}


LOG_COLUMNS = ("cls_loss", "reg_loss", "disc_loss", "d_real", "d_fake")  # train_advreg.py's log


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


def kernels_of(weight):
    """Every (out, in) slice of a conv weight as one kernel: [out, in, k, k] -> [out*in, k, k]."""
    return weight.reshape(-1, weight.shape[-2], weight.shape[-1])


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


def standardize_kernels(kernels):
    """[N, k, k] -> [N, k*k] float64, each kernel with zero mean and unit std: shape, not scale."""
    flat = kernels.reshape(len(kernels), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)


def low_freq_share(kernels, cutoff=0.25):
    """Mean share of each kernel's energy (mean removed) at spatial frequencies of radius <= cutoff
    cycles/pixel. White noise scores about 1/6; smooth, patterned kernels score high."""
    k = kernels.shape[-1]
    centered = kernels.double() - kernels.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centered).abs() ** 2
    freq = torch.fft.fftfreq(k, dtype=torch.float64)
    low = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt() <= cutoff
    return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)).mean().item()


def psd_sqrt(m):
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues: 0)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to the rows of a [N, d] and b [M, d], in float64:
    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) (the FID formula, Heusel et
    al., 2017). The symmetric product has the trace root of (C_a C_b)^1/2 and is PSD, so eigh
    replaces scipy's sqrtm."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return (((a.mean(0) - b.mean(0)) ** 2).sum().item()
            + (cov_a.trace() + cov_b.trace() - 2 * tr_covmean).item())


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
