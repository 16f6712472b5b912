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
Writes: <out>/lam<lam>_seed<N>[_bankinit]/: model.pt (classifier and discriminators, and the run's
        row label for collect_kernels.py --compare; rewritten at every evaluation: an interrupted
        run resumes), metrics.csv (per iteration: losses, D(real), D(fake); accuracies at
        evaluations), losses.png (Fig. 4), d_outputs.png (Fig. 5), kernels_<layer>.png (Fig.
        7/10), test_acc.png (Fig. 9), summary.json; with --gif-every, <out>/kernels_seed<N>.gif
        (conv1's kernels of every lam of that seed, side by side).
Results and the commands behind them: docs/train_advreg.md; each flag's source: docs/defaults.md.
"""
import argparse, csv, functools, io, json, math, os, pathlib, sys, time

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.register("type", None, os.path.expanduser)  # a string flag (a path): ~ expanded
    add = p.add_argument  # the source of each default in (...); the why: docs/defaults.md
    add("--bank", nargs="+", default=["kernels/conv1_7x7.pt"], help="a bank per layer (ours)")
    add("--layers", nargs="+", default=["conv1"], choices=CONV_SHAPES, help="a D each (paper)")
    add("--lam", type=float, nargs="+", default=[1.0], help="λ; several: a sweep (notebook)")
    add("--seeds", type=int, nargs="+", default=[0], help="one run per seed and λ")
    add("--init-bank", metavar="BANK", help="also every λ with conv1 drawn from BANK (ours)")
    add("--d-input", default="standardized", choices=["standardized", "raw"], help="(ours)")
    add("--d-batch", type=int, default=128, help="kernels per real and fake D batch (notebook)")
    add("--d-lr", type=float, default=2e-4, help="D's Adam learning rate (notebook)")
    add("--d-weight-decay", type=float, default=1e-4, help="D's Adam weight decay (notebook)")
    add("--d-betas", type=float, nargs=2, default=[0.5, 0.999], help="D's Adam betas (notebook)")
    add("--data", default="cifar10", help="cifar10 | PATH of an ImageFolder (paper)")
    add("--data-root", default="data", help="where torchvision downloads datasets (ours)")
    add("--per-class", type=int, default=10, help="training images per class (paper)")
    add("--subset-seed", type=int, default=0, help="seed that draws the training images (ours)")
    add("--val-size", type=int, default=0, metavar="N", help="validation images (ours; 0 = none)")
    add("--test-limit", type=int, default=0, help="this many test images; 0 = all (ours)")
    add("--epochs", type=int, default=1000, help="epochs per run (paper)")
    add("--batch-size", type=int, default=16, help="images per step (paper)")
    add("--lr", type=float, default=2e-3, help="classifier's Adam lr (paper; notebook: 2e-4)")
    add("--weight-decay", type=float, default=1e-3, help="Adam's (paper; notebook: 1e-4)")
    add("--betas", type=float, nargs=2, default=[0.5, 0.999], help="Adam's (paper, notebook)")
    add("--no-augment", action="store_true", help="no random crop + flip (on: paper)")
    add("--eval-every", type=int, default=50, help="accuracies every N epochs (ours)")
    add("--log-every", type=int, default=50, help="a progress line every N epochs (ours)")
    add("--gif-every", type=int, default=0, metavar="N", help="a GIF frame every N epochs (ours)")
    add("--curve-size", type=int, default=2000, metavar="N", help="curve's test images (ours)")
    add("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (ours)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(ours)")
    add("--threads", type=int, default=0, help="CPU threads; 0 = torch's default (ours)")
    add("--out", default="runs/advreg", help="folder of the grid's runs (ours)")
    args = p.parse_args(argv)
    negative = [lam for lam in args.lam if not lam >= 0]
    checks = [  # (the mistake, its message)
        (len(set(args.layers)) != len(args.layers), f"--layers has duplicates: {args.layers}"),
        (len(args.bank) != len(args.layers), f"give one --bank per --layers entry: "
         f"{len(args.layers)} layer(s) {args.layers}, {len(args.bank)} bank(s)"),
        (negative, f"--lam must be >= 0, got {negative}"),
        *[(getattr(args, n) < 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}")
          for n in ("d_batch", "per_class", "epochs", "batch_size", "eval_every", "log_every")],
        (min(args.test_limit, args.gif_every, args.val_size, args.curve_size) < 0,
         "--test-limit, --val-size, --curve-size and --gif-every must be >= 0 "
         "(0 = all / none / off)"),
        (len(set(args.seeds)) != len(args.seeds) or len(set(args.lam)) != len(args.lam),
         "--seeds and --lam must not repeat a value")]
    for mistake, message in checks:
        if mistake:
            p.error(message)
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
    """One run of Algorithm 1; it resumes after the last evaluation of its checkpoint, where
    there is one."""
    name = run_name(lam, seed, bank_init)
    path = os.path.join(args.out, name, "model.pt")
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
    log = {c: torch.full((args.epochs * iters_per_epoch,), math.nan, device=device)
           for c in LOG_COLUMNS}  # per iteration, on the device: no host sync per step
    ckpt = run_checkpoint(model, optimizer, discs, d_optimizers, lam, seed, bank_init, args, data)
    start = logged = resume_or_start(path, ckpt, log, d_gen, args)
    t_period = t_log = time.time()
    for epoch in range(start, args.epochs):
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
            log["cls_loss"][it] = cls_loss.detach()
            if discs:                                                           # D step
                d_out = discriminator_step(discs, d_optimizers, banks, d_fakes, lam, args, d_gen)
                for column, value in dict(d_out, reg_loss=reg_loss.detach()).items():
                    log[column][it] = value

        done = epoch + 1
        if args.gif_every and done % args.gif_every == 0:
            ckpt["frames"].append(model.conv1.weight.detach().cpu().reshape(-1, 7, 7).clone())
        if done % args.eval_every == 0 or done == args.epochs:
            evaluate_and_save(path, ckpt, log, done, data, d_gen, args, t_period)
            t_period = time.time()
        if done % args.log_every == 0 or done == args.epochs:
            secs = (time.time() - t_log) / (done - logged)
            t_log, logged = time.time(), done
            text = recent(log, ckpt["history"], done, iters_per_epoch, lam)
            progress(name, done, args.epochs, secs, f"{text} | {secs * 1000:.0f} ms/epoch")
    finish_run(path, ckpt, log, banks)


def run_name(lam, seed, bank_init):
    return f"lam{lam:g}_seed{seed}" + ("_bankinit" if bank_init else "")


def run_checkpoint(model, optimizer, discs, d_optimizers, lam, seed, bank_init, args, data):
    """What model.pt holds, one flat dict: the modules and optimizers ("d_conv1" and
    "d_optimizer_conv1" for conv1's D), what the run is, its history and GIF frames, and its row
    label in collect_kernels.py --compare's table with the row's place there (the baseline first,
    then λ ascending, then the runs whose conv1 came from a bank); at each save also "epoch",
    "log" (iterations x LOG_COLUMNS) and "rng_d" (the generator of D's batches)."""
    label = ["baseline (λ = 0)" if lam == 0 else f"λ = {lam:g}"]
    if lam != 0 and sorted(args.layers) != ["conv1"]:  # discriminators on more layers
        label.append(layers_label(sorted(args.layers)))
    if bank_init:
        label.append("conv1 from bank")
    return {"model": model, "optimizer": optimizer,
            **{f"d_{layer}": disc for layer, disc in discs.items()},
            **{f"d_optimizer_{layer}": d_opt for layer, d_opt in d_optimizers.items()},
            "arch": ARCH, "lam": lam, "seed": seed, "bank_init": bank_init,
            "label": ", ".join(label),
            "row_order": [2, bank_init, 0, lam] if bank_init or lam > 0 else [0, 0, 0, lam],
            "classes": data["classes"], "dataset": args.data, "args": vars(args),
            "flags": {k: v for k, v in vars(args).items() if k not in FREE_FLAGS},
            "history": {"eval_epoch": [], "test_acc": [], "epoch_done": 0, "seconds": 0.0},
            "frames": []}


def resume_or_start(path, ckpt, log, d_gen, args):
    """The run's checkpoint, if any, loaded into ckpt (its modules, history and frames), the log
    and the generator of D's batches; returns the epochs done (0 for a new run)."""
    saved = resume(path, ckpt, ckpt["flags"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if saved is None:
        return 0
    if saved["epoch"] > args.epochs:
        raise UserError(f"{path} already has {saved['epoch']} epochs, more than --epochs "
                        f"{args.epochs}; pass a larger --epochs or another --out")
    if saved["epoch"] < args.epochs:
        print(f"{os.path.basename(os.path.dirname(path))}: resuming after epoch {saved['epoch']}")
    d_gen.set_state(saved["rng_d"])
    ckpt["history"].update(saved["history"])
    ckpt["frames"].extend(saved["frames"])
    for j, c in enumerate(LOG_COLUMNS):
        log[c][:len(saved["log"])] = saved["log"][:, j].to(log[c].device)
    return saved["epoch"]


def evaluate_and_save(path, ckpt, log, done, data, d_gen, args, t_period):
    """At an evaluation: stop a diverged run, append the accuracies to the history (the whole
    test set at the end), save the checkpoint."""
    history, iters_per_epoch = ckpt["history"], len(log["cls_loss"]) // args.epochs
    period = slice(history["epoch_done"] * iters_per_epoch, done * iters_per_epoch)
    stop_if_diverged(log["cls_loss"][period].sum().item(),
                     f"epoch {done} of {os.path.basename(os.path.dirname(path))}",
                     "--lr (or --lam, --d-lr)")
    history["eval_epoch"].append(done)
    accuracies(history, ckpt["model"], data, done == args.epochs, args.curve_size, args.precision)
    history["epoch_done"], history["seconds"] = done, history["seconds"] + time.time() - t_period
    log_table = torch.stack([log[c][:done * iters_per_epoch] for c in LOG_COLUMNS], 1)
    save_checkpoint(path, ckpt | {"epoch": done, "log": log_table.cpu(),
                                  "rng_d": d_gen.get_state()})


def recent(log, history, done, iters_per_epoch, lam):
    """The progress line's numbers: the last epoch's mean losses and D outputs, the accuracies."""
    last_epoch = slice((done - 1) * iters_per_epoch, done * iters_per_epoch)
    means = dict(zip(LOG_COLUMNS, torch.stack(
        [log[c][last_epoch].mean() for c in LOG_COLUMNS]).tolist()))  # one host sync
    acc = " ".join(f"{s} {history[f'{s}_acc'][-1]:.4f}" for s in ("train", "val", "test")
                   if history.get(f"{s}_acc"))
    game = "" if lam == 0 else (  # at λ = 0 there is no D to report
        f" reg {means['reg_loss']:.3f} disc {means['disc_loss']:.3f} | D(real) "
        f"{means['d_real']:.2f} D(fake) {means['d_fake']:.2f}")
    return f"cls {means['cls_loss']:.3f}{game} | acc {acc or '-'}"


# ----------------------------------------------------------------------------- outputs
def finish_run(path, ckpt, log, banks):
    """The run's figures, metrics.csv and summary.json (with the kernel metrics of each
    regularized layer against its bank: Fréchet distance of the standardized kernels, the
    low-frequency share)."""
    run_dir, model, history = os.path.dirname(path), ckpt["model"], ckpt["history"]
    log = {c: v.cpu() for c, v in log.items()}
    write_run_outputs(run_dir, model, log, history, banks, f"{ckpt['label']}, seed {ckpt['seed']}")
    last = slice(-max(1, len(log["cls_loss"]) // 10), None)  # the last 10% of iterations
    d_last = {c: log[c][last].mean().item() for c in ("d_real", "d_fake")}
    summary = {"run": os.path.basename(run_dir), "lam": ckpt["lam"], "seed": ckpt["seed"],
               "init": "bank" if ckpt["bank_init"] else "default",
               "final_test_acc": history["test_acc"][-1], "best_test_acc": max(history["test_acc"]),
               **{f"final_{s}_acc": history[f"{s}_acc"][-1] for s in ("train", "val")
                  if f"{s}_acc" in history},
               # lam = 0 has no D: null in JSON
               **{f"{c}_last10pct": None if math.isnan(v) else v for c, v in d_last.items()},
               "seconds": history["seconds"]}
    for layer, bank in banks.items():
        kernels = kernels_of(getattr(model, layer).weight).detach().cpu()
        summary[f"{layer}_frechet"] = frechet_distance(standardize_kernels(kernels),
                                                       standardize_kernels(bank.cpu()))
        summary[f"{layer}_low_freq"] = low_freq_share(kernels)
    write_json(os.path.join(run_dir, "summary.json"), summary)


def write_run_outputs(run_dir, model, log, history, banks, title):
    """metrics.csv and the paper's figures of one run: Fig. 4 (the losses, per iteration and
    their moving average), Fig. 5 (D's mean outputs; 0.5: D cannot tell), Fig. 9 (accuracy),
    Fig. 7 / 10 (the kernels of conv1 and of every regularized layer)."""
    # metrics.csv: one row per iteration, the losses and D outputs; the accuracies where it was
    # evaluated
    iters_per_epoch = len(log["cls_loss"]) // max(history["epoch_done"], 1)
    at_iteration = [e * iters_per_epoch for e in history["eval_epoch"]]
    acc_at = {s: dict(zip(at_iteration, history[f"{s}_acc"]))
              for s in ("train", "val", "test") if f"{s}_acc" in history}
    columns = [log[name].tolist() for name in LOG_COLUMNS]
    rows = [{"iteration": i, "epoch": (i - 1) // iters_per_epoch + 1,
             **{c: f"{v:.5f}" for c, v in zip(LOG_COLUMNS, row)},
             **{f"{s}_acc": f"{a[i]:.4f}" if i in a else "" for s, a in acc_at.items()}}
            for i, row in enumerate(zip(*columns), start=1)]
    write_csv(os.path.join(run_dir, "metrics.csv"), rows)
    iters = list(range(1, len(log["cls_loss"]) + 1))
    window = max(1, len(iters) // 100) | 1
    average = {c: (iters, smooth(log[c], window)) for c in LOG_COLUMNS}
    losses = {"reg_loss": "regularization loss  -log D(G(z))", "disc_loss": "discriminator loss"}
    plot_lines(os.path.join(run_dir, "losses.png"), [
        (f"Fig. 4 — {title}", "iteration", label, {"per iteration": (iters, log[c].tolist()),
                                                  "moving average": average[c]})
        for c, label in losses.items()])
    d_outputs = {"D(real) = D(bank kernel)": average["d_real"],
                 "D(fake) = D(G(z))": average["d_fake"]}
    plot_lines(os.path.join(run_dir, "d_outputs.png"),
               [(f"Fig. 5 — {title}", "iteration", "mean D output", d_outputs)], width=6)
    accuracy = {s: (history["eval_epoch"], history[f"{s}_acc"]) for s in ("train", "val", "test")
                if f"{s}_acc" in history}
    plot_lines(os.path.join(run_dir, "test_acc.png"),
               [(f"Fig. 9 — {title}", "epoch", "accuracy", accuracy)], width=5)
    for layer in ["conv1"] + [layer for layer in banks if layer != "conv1"]:  # Fig. 7 / 10
        kernels = kernels_of(getattr(model, layer).weight).detach().cpu()
        if len(kernels) > 256:  # conv2 has 8192 slices: show a fixed random sample
            pick = torch.randperm(len(kernels), generator=torch.Generator().manual_seed(0))
            kernels = kernels[pick[:256]]
        save_grid(os.path.join(run_dir, f"kernels_{layer}.png"), kernels[:, None], 16, scale=8)


def smooth(values, window):
    """Moving average over `window` iterations (fewer at the ends); the same length."""
    v = values.double()[None, None]
    return F.avg_pool1d(v, window, 1, window // 2, count_include_pad=False)[0, 0].tolist()


def write_gifs(args, count=64):
    """Per seed, <out>/kernels_seed<S>.gif: the first `count` conv1 kernels of every λ's run side
    by side, a frame every --gif-every epochs, each kernel scaled to its own range."""
    for seed in args.seeds:
        runs = {f"λ = {lam:g}": torch.load(f"{args.out}/{run_name(lam, seed, False)}/model.pt",
                                           weights_only=True)["frames"] for lam in args.lam}
        fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4.3), squeeze=False)

        def show(i):
            fig.suptitle(f"conv1 kernels, epoch {(i + 1) * args.gif_every}")
            for ax, (title, frames) in zip(axes[0], runs.items()):
                big = F.interpolate(frames[min(i, len(frames) - 1)][:count, None], scale_factor=8)
                grid = torchvision.utils.make_grid(big, 8, 4, normalize=True, scale_each=True)
                ax.clear()
                ax.set(title=title, xticks=[], yticks=[])
                ax.imshow(grid.permute(1, 2, 0))
        animation = matplotlib.animation.FuncAnimation(fig, show, max(map(len, runs.values())))
        path = f"{args.out}/kernels_seed{seed}.gif"
        write_atomic(path, lambda tmp: animation.save(tmp, writer="pillow", fps=4))
        plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args)
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
    for bank_init in [False] + ([True] if args.init_bank else []):
        for lam in args.lam:
            for seed in args.seeds:
                train(lam, seed, bank_init, args, data, banks, device)
    if args.gif_every:
        write_gifs(args)
    print(f"wrote per-run folders under {args.out}/; the table of every run there, mean ± std "
          f"over seeds:\n  python collect_kernels.py --compare {args.out}/*/model.pt --bank "
          f"{args.bank[0]} --out {args.out}/compare")


# ----------------------------------------------------------------------------- data
# the 100-image task: the same text in train_small.py (test_copies_across_scripts_agree)
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


# ----------------------------------------------------------------------------- kernels
# banks and kernel metrics: the same text in collect_kernels.py (and in the other scripts
# that have them)
ARCH = "PaperCNN"  # stored in checkpoints; collect_kernels.py refuses anything else


CONV_SHAPES = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 5, 5), "conv3": (128, 128, 5, 5),
               "conv4": (256, 128, 3, 3)}


LOG_COLUMNS = ("cls_loss", "reg_loss", "disc_loss", "d_real", "d_fake")  # train_advreg.py's log


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


def layers_label(layers):
    """["conv1", "conv2", "conv3"] -> "conv1-3"; ["conv1", "conv2"] -> "conv1+conv2"."""
    numbers = [int(name[4:]) for name in layers if name[:4] == "conv" and name[4:].isdigit()]
    if len(layers) >= 3 and len(numbers) == len(layers) \
            and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"conv{numbers[0]}-{numbers[-1]}"
    return "+".join(layers)


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
