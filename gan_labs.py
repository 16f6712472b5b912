"""The adversarial labs: DCGAN, cDCGAN, the MLP GAN, WGAN, and DANN, measured offline.

Adversarial regularization (train_advreg.py) plays a GAN game on convolution kernels; this script
teaches the game on images, as pytorch/examples dcgan/main.py does. Handouts: "seed 003" (DCGAN,
cDCGAN, DANN), "seed 004" (MLP GAN, WGAN), "seed 001" (the memorization check). The lesson:
`bce_step` (Goodfellow et al., 2014, Alg. 1, as DCGAN plays it), `wgan_critic_step` and
`wgan_generator_step` (WGAN Alg. 1: weight clipping; WGAN-GP Alg. 1: gradient penalty), called
by `train`; `dann_step` and `GradientReversal`, called by `train_dann`. Each game has a section
of its own below; the nets and the evaluation they share come first.
  dcgan | cdcgan | vanilla | wgan   the GAN labs (--train-only d|g: seed 003 Q1); each ends with
      the FID formula and k-NN precision / recall in a small classifier's feature space
  dann          DANN (Ganin et al., 2016): MNIST -> MNIST-M-style digits on CIFAR-10 crops
  memorization  a trained G's samples beside their nearest training images (--run FOLDER)
  classifier    that small classifier (trained once, then cached in --cache-dir)

    python gan_labs.py dcgan --data ~/data/mnist                 # seed 003's setting: 5 epochs
    python gan_labs.py wgan --generator mlp --data ~/data/mnist  # seed 004's WGAN-GP
    python gan_labs.py dann --data ~/data/mnist --target-patches ~/data/cifar10  # + --no-adapt
        # or --no-reversal, --lam L, --pseudo-labels RUN (seed 003 Q1, Q3, Q4)
    python gan_labs.py dcgan --data ~/data/mnist --epochs 1 --threads 1 --out runs/gan/quick

Reads:  --data mnist | cifar10 (torchvision downloads them) or PATH/{train,test}/<class>/*.png.
Writes: in --out, per epoch: samples_epochNN.png, interpolation_epochNN.png, metrics.csv,
        curves.png, checkpoint.pt (resumed when present); at the end eval.csv, summary.json,
        class_grid.png (cdcgan). dann: metrics.csv, checkpoint.pt, features.png, summary.json.
        memorization: memorization.png, nn_distances.png, memorization.json in --run.
Notes and results: docs/gan_labs.md; every flag's default and its source: docs/defaults.md.
"""
import argparse, csv, functools, io, json, math, os, pathlib, re, sys, time

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# ----------------------------------------------------------------------------- config
LABS = {"dcgan": "DCGAN (Radford et al., 2016), seed 003's lab",
        "cdcgan": "conditional DCGAN (Mirza & Osindero, 2014), seed 003's lab",
        "vanilla": "seed 004's MLP GAN",
        "wgan": "WGAN (Arjovsky et al., 2017) and WGAN-GP (Gulrajani et al., 2017), seed 004"}
SUBCOMMANDS = {**LABS, "dann": "DANN (Ganin et al., 2016), seed 003's domain-adaptation lab",
               "memorization": "does a trained G copy its training images? (seed 001)",
               "classifier": "the metrics' network"}
# Each lab's own defaults, one row a lab (their sources: the flags' help, docs/defaults.md).
# lr is both nets' (--lr-g, --lr-d); wgan --constraint clip takes WGAN's WGAN_CLIP_LR instead.
LAB_DEFAULTS = {
    "dcgan": dict(batch_size=128, beta1=0.5, lr=2e-4, init="dcgan", g_every=1,
                  generator="dcgan", discriminator="dcgan"),
    "vanilla": dict(batch_size=128, beta1=0.5, lr=2e-4, init="default", g_every=1, d_dropout=0.3,
                    generator="mlp", discriminator="mlp"),
    "wgan": dict(batch_size=64, beta1=0.0, lr=1e-4, init="default", g_every=5, d_dropout=0.0,
                 generator="dcgan", discriminator="conv", train_only=None)}
LAB_DEFAULTS["cdcgan"] = LAB_DEFAULTS["dcgan"]  # DCGAN's nets and settings, with the labels
WGAN_CLIP_LR = 5e-5  # WGAN Alg. 1, with RMSProp
LR_HELP = "(default: 2e-4, DCGAN; wgan: 1e-4, WGAN-GP, or 5e-5 with --constraint clip, WGAN)"
CLASSIFIER_SIZE = 32  # the metric network sees every image at 32x32, whatever the lab's size
# flags that do not change what a run trains: not in the run folder's name, free to change on resume
RUN_FLAGS = {"out", "epochs", "data_root", "cache_dir", "device", "threads", "eval_samples",
             "log_every"}


def add_flags(p, name):
    """Subcommand `name`'s flags, one line each: `on` lists the subcommands that take a flag (all,
    unless it says). A GAN lab's own defaults are its row of LAB_DEFAULTS. The order of the flags
    is the order of their names in a run folder's name: a new flag goes at the end."""
    def add(flag, on=SUBCOMMANDS, **options):
        if name in on:
            p.add_argument(flag, **options)
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="cuda, mps or cpu")
    add("--threads", type=int, default=0, help="CPU threads (default: 0, torch's)")
    add("--data-root", default="data", help="torchvision's folder of the datasets")
    if name != "dann":
        add("--cache-dir", default="runs/gan/cache", help="the metric networks' folder")
    add("--run", ("memorization",), required=True, help="a GAN lab's run folder (default: none)")
    if name != "memorization":  # the memorization check reads both from the run's checkpoint
        add("--data", default="mnist", help="mnist | cifar10 | PATH (seed 003)")
        add("--seed", type=int, default=0, help="init, batches, noise (default: 0)")
    add("--epochs", ("classifier",), type=int, default=2, help="a cached one is reused (ours)")
    add("--out", (*LABS, "dann"), default="", help="(default: runs/gan/<data>/<lab>_<flags>)")
    # the GAN labs; bce: the labs that play bce_step
    bce = ("dcgan", "cdcgan", "vanilla")
    add("--epochs", LABS, type=int, default=5, help="passes over the training set (seed 003)")
    add("--precision", LABS, default="fp32", choices=["fp32", "bf16"], help="bf16 (ours)")
    add("--image-size", LABS, type=int, help="pixels (default: 32 DCGAN nets, 28 MLP)")
    add("--batch-size", LABS, type=int, help="images per step (seed 003; wgan: WGAN-GP)")
    add("--nz", LABS, type=int, default=100, help="size of z (DCGAN paper)")
    add("--ngf", LABS, type=int, help="DCGAN G's width (default: 32, seed 003; 64 at 64 px)")
    add("--ndf", LABS, type=int, help="DCGAN D's width (default: 32, seed 003; 64 at 64 px)")
    add("--lr-g", LABS, type=float, help="G's learning rate " + LR_HELP)
    add("--lr-d", LABS, type=float, help="D's learning rate " + LR_HELP)
    add("--beta1", LABS, type=float, help="Adam's (default: %(default)s, DCGAN / WGAN-GP)")
    add("--init", LABS, choices=["dcgan", "default", "weight-norm"], help="(DCGAN paper; ours)")
    add("--diffaug", LABS, default="", help="DiffAugment policies (default: none; ours)")
    add("--log-every", LABS, type=int, default=25, help="D steps per metrics.csv row (ours)")
    add("--eval-samples", (*LABS, "memorization"), type=int, default=10000, help="images (ours)")
    add("--g-loss", bce, default="non-saturating", choices=["non-saturating", "saturating"],
        help="G's loss (DCGAN paper)")
    add("--g-every", bce, type=int, metavar="N", help="G steps 1 in N; counts D steps")
    add("--train-only", bce, choices=["d", "g"], help="Q1: d or g learns (default: both)")
    add("--first-bn", ("dcgan", "cdcgan"), action=argparse.BooleanOptionalAction,
        help="BN after D's conv1 (default: on, seed 003; off at 64 px)")
    add("--no-label-in-d", ("cdcgan",), action="store_true", help="D sees x only (default: x, y)")
    add("--d-dropout", ("vanilla",), type=float, help="dropout after D's layers (seed 004)")
    add("--g-bn", ("vanilla", "wgan"), action="store_true", help="BN in the MLP G (default: off)")
    add("--constraint", ("wgan",), choices=["clip", "gp", "none"], default="gp", help="(WGAN-GP)")
    add("--critic", ("wgan",), dest="discriminator", choices=["conv", "mlp"], help="(seed 004)")
    add("--generator", ("wgan",), choices=["dcgan", "mlp"], help="DCGAN's or vanilla's (ours)")
    add("--d-dropout", ("wgan",), type=float, help="--critic mlp's (default: 0.0, WGAN-GP)")
    add("--clip", ("wgan",), type=float, default=0.01, help="c of the clipping (WGAN)")
    add("--gp-lambda", ("wgan",), type=float, default=10.0, help="penalty weight (WGAN-GP)")
    add("--n-critic", ("wgan",), dest="g_every", type=int, metavar="N", help="per G step (WGAN)")
    # DANN
    add("--target-patches", ("dann",), default="cifar10", help="crops for backgrounds (ours)")
    add("--target", ("dann",), default="", help="a ready target set: PATH (default: built)")
    add("--no-adapt", ("dann",), action="store_true", help="lambda = 0 (default: DANN)")
    add("--no-reversal", ("dann",), action="store_true", help="Q1: no reversal (default: off)")
    add("--lam", ("dann",), type=float, help="Q3: a fixed lambda (default: the paper's lambda_p)")
    add("--pseudo-labels", ("dann",), default="", metavar="RUN", help="Q4 (default: none)")
    add("--threshold", ("dann",), type=float, default=0.95, help="pseudo-labels' (FixMatch)")
    add("--epochs", ("dann",), type=int, default=10, help="passes over the source images (ours)")
    add("--batch-size", ("dann",), type=int, default=64, help="images per domain a step (ours)")
    add("--lr", ("dann",), type=float, default=0.01, help="mu_0 of mu_p (DANN paper)")
    add("--lr-alpha", ("dann",), type=float, default=10.0, help="alpha of mu_p (DANN paper)")
    add("--lr-beta", ("dann",), type=float, default=0.75, help="beta of mu_p (DANN paper)")
    add("--gamma", ("dann",), type=float, default=10.0, help="gamma of lambda_p (DANN paper)")
    add("--momentum", ("dann",), type=float, default=0.9, help="SGD momentum (DANN paper)")
    add("--precision", ("dann",), default="fp32", choices=["fp32", "bf16"], help="bf16 (ours)")
    if name in LABS:
        p.set_defaults(**{k: v for k, v in LAB_DEFAULTS[name].items() if k != "lr"})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="lab", required=True)
    for name, what in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=what, description=f"gan_labs.py {name}: {what}.",
                           formatter_class=HelpFormatter)
        p.register("type", None, os.path.expanduser)  # a string flag (a path): ~ expanded
        add_flags(p, name)
    args = parser.parse_args(argv)
    p = sub.choices[args.lab]
    fill_defaults(p, args)
    for bad, message in range_checks(args):
        if bad:
            p.error(message)
    return args


def range_checks(args):
    """(condition, message): a flag out of range, or flags that do not go together."""
    get, lab = vars(args).get, args.lab in LABS
    size = get("image_size", 32)
    lambdas = [flag for flag, on in (("--no-adapt", get("no_adapt")), ("--no-reversal",
               get("no_reversal")), ("--lam", get("lam") is not None), ("--pseudo-labels",
               bool(get("pseudo_labels")))) if on]
    bad_policies = set(get("diffaug", "").split(",")) - {"", "translation", "cutout", "color"}
    counts = ("epochs", "batch_size", "nz", "ngf", "ndf", "log_every", "g_every")
    return [(get(k) is not None and get(k) < 1, f"--{k.replace('_', '-')} must be >= 1, got "
             f"{get(k)}" + (" (--n-critic)" if k == "g_every" else "")) for k in counts] + [
        (get("eval_samples", 2) < (2 if args.lab == "memorization" else 0),
         "--eval-samples must be >= 0 (memorization: >= 2)"),
        (not 0 <= get("d_dropout", 0) < 1, "--d-dropout must be in [0, 1)"),
        (get("d_dropout") and args.discriminator != "mlp", "--d-dropout needs --critic mlp"),
        (get("g_bn") and args.generator != "mlp", "--g-bn needs --generator mlp (DCGAN's has BN)"),
        (lab and "dcgan" in (args.generator, args.discriminator) and size not in (32, 64),
         f"--image-size must be 32 or 64 for the DCGAN nets, got {size}"),
        (lab and size < (16 if args.discriminator == "conv" else 8),
         f"--image-size {size} is too small (conv critic: >= 16, MLP nets: >= 8)"),
        (bad_policies, f"--diffaug: unknown policy {sorted(bad_policies)}; choose from "
         "translation,cutout,color"),
        (get("lr", 1) <= 0, "--lr must be > 0"),
        (not 0 < get("threshold", 0.5) < 1, "--threshold must be in (0, 1)"),
        (get("lam") is not None and not get("lam") >= 0,
         f"--lam must be >= 0, got {get('lam')} (features that help G_d: --no-reversal)"),
        (len(lambdas) > 1, f"{' and '.join(lambdas)} each set lambda: choose one")]


def fill_defaults(p, args):
    """The defaults that depend on other flags, filled in here and only here (nothing else writes
    into args): the run folder; a lab's image size, learning rates and, at 64 px,
    pytorch/examples' nets (width 64, no BatchNorm after D's first conv: docs/gan_labs.md)."""
    if args.lab not in LABS:
        if args.lab == "dann":
            args.out = args.out or default_out(p, args)
        return
    # --image-size: 32 with a DCGAN net (seed 003), else 28 (seed 004's 784 inputs)
    size = args.image_size or (32 if "dcgan" in (args.generator, args.discriminator) else 28)
    lr = WGAN_CLIP_LR if getattr(args, "constraint", "") == "clip" else LAB_DEFAULTS[args.lab]["lr"]
    derived = {"ngf": 64 if size == 64 else 32, "ndf": 64 if size == 64 else 32, "lr_g": lr,
               "lr_d": lr} | ({"first_bn": size != 64} if hasattr(args, "first_bn") else {})
    for name, value in derived.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.out = args.out or default_out(p, args, derived)
    args.image_size = size


def default_out(p, args, derived=None):
    """runs/gan/<data>/<lab>, then each flag that differs from the lab's default (derived: the
    defaults that depend on other flags)."""
    name, derived = args.lab, derived or {}
    for key, value in training_flags(args).items():
        default = derived.get(key, p.get_default(key))
        if key not in ("lab", "data") and value != default:
            if isinstance(value, str) and os.sep in value:  # a path: its last part
                value = os.path.basename(os.path.normpath(value))
            name += "_" + key.replace("_", "-") + ("" if value is True else f"-{value}")
    return os.path.join("runs", "gan", os.path.basename(os.path.normpath(args.data)), name)


def training_flags(args):
    """The flags that change what a run computes: a checkpoint made with others is not resumed.
    DANN's schedules run over all --epochs: its --epochs is one of them."""
    free = RUN_FLAGS - {"epochs"} if args.lab == "dann" else RUN_FLAGS
    return {k: v for k, v in vars(args).items() if k not in free}


# ----------------------------------------------------------------------------- the nets
# The nets of the four GAN labs (and the memorization check, which rebuilds G from a run).
# S is the image side. cDCGAN: the label y joins G's z and D's image inside Net.forward.
class Net(nn.Sequential):
    """nn.Sequential whose forward also takes the cDCGAN's labels y: the one-hot y is appended to
    a flat input (G's z) or, as constant planes, to an image (D's x). n_classes = 0: no label."""

    def __init__(self, *layers, n_classes=0):
        super().__init__(*layers)
        self.n_classes = n_classes

    def forward(self, x, y=None):
        if self.n_classes and y is not None:
            onehot = F.one_hot(y, self.n_classes).float()
            if x.dim() == 4:
                onehot = onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, onehot], 1)
        return super().forward(x)


def dcgan_generator(nz, ngf, channels, size, n_classes=0):
    """pytorch/examples' generator; at S = 32 its first block (8 ngf, 4 x 4) is left out."""
    nz += n_classes
    big = [nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8),
           nn.ReLU(True),
           # state size: (ngf*8) x 4 x 4
           nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False)]
    return Net(
        nn.Unflatten(1, (nz, 1, 1)),
        # input: nz x 1 x 1   (nz includes the cDCGAN's one-hot label)
        *(big if size == 64 else [nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False)]),
        nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        # state size: (ngf*4) x S/8 x S/8   (4 x 4 at S = 32)
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        # state size: (ngf*2) x S/4 x S/4
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ngf), nn.ReLU(True),
        # state size: (ngf) x S/2 x S/2
        nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False),
        nn.Tanh(),
        # state size: (channels) x S x S
        n_classes=n_classes)


def dcgan_discriminator(ndf, channels, size, first_bn=True, n_classes=0):
    """pytorch/examples' discriminator, with BatchNorm after the first conv too as seed 003 has it
    (first_bn=False: pytorch/examples'); at S = 32 its last block (8 ndf) is left out."""
    big = [nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8),
           nn.LeakyReLU(0.2, inplace=True),
           # state size: (ndf*8) x 4 x 4
           nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False)]
    return Net(
        # input: (channels) x S x S   (and the cDCGAN's label planes)
        nn.Conv2d(channels + n_classes, ndf, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf) if first_bn else nn.Identity(), nn.LeakyReLU(0.2, inplace=True),
        # state size: (ndf) x S/2 x S/2
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        # state size: (ndf*2) x S/4 x S/4
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
        nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        # state size: (ndf*4) x S/8 x S/8   (4 x 4 at S = 32)
        *(big if size == 64 else [nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False)]),
        nn.Sigmoid(), nn.Flatten(0),
        # output: D(x) in (0, 1), one per image
        n_classes=n_classes)


def mlp_generator(nz, channels, size, bn=False):
    """Seed 004's generator; bn: BatchNorm after each hidden layer, as DCGAN's G has it."""
    def hidden(n_in, n_out):
        return [nn.Linear(n_in, n_out), *([nn.BatchNorm1d(n_out)] if bn else []),
                nn.LeakyReLU(0.2, inplace=True)]
    return Net(
        # input: nz
        *hidden(nz, 256), *hidden(256, 512), *hidden(512, 1024),
        nn.Linear(1024, channels * size * size), nn.Tanh(),
        nn.Unflatten(1, (channels, size, size)),
        # state size: (channels) x S x S
    )


def mlp_discriminator(channels, size, dropout=0.0, sigmoid=True):
    """Seed 004's discriminator; without the sigmoid, a WGAN critic."""
    return Net(
        # input: (channels) x S x S, flattened
        nn.Flatten(), nn.Linear(channels * size * size, 1024), nn.LeakyReLU(0.2, inplace=True),
        nn.Dropout(dropout),
        nn.Linear(1024, 512), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
        nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(dropout),
        nn.Linear(256, 1), nn.Sigmoid() if sigmoid else nn.Identity(), nn.Flatten(0),
        # output: one number per image
    )


def conv_critic(channels, size):
    """Seed 004's convolutional WGAN critic; no BatchNorm (the gradient penalty is per sample)."""
    return Net(
        # input: (channels) x S x S
        nn.Conv2d(channels, 16, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 16 x S/2 x S/2
        nn.Conv2d(16, 32, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 32 x S/4 x S/4
        nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 64 x S/8 x S/8
        nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
        # state size: 128 x S/16 x S/16   (rounded down: 1 x 1 at S = 28, 2 x 2 at S = 32)
        nn.Flatten(), nn.Linear(128 * (size // 16) ** 2, 1), nn.Flatten(0),
        # output: the critic's score, one per image
    )


def dcgan_init(m):
    # DCGAN §4: weights from N(0, 0.02); BatchNorm scales around 1 as in pytorch/examples, so the
    # first forward pass does not squash every activation to ~0
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def weight_normalize(m):
    # Salimans & Kingma (2016): w = g v / ||v||, one g per output unit, both learned; at the start
    # g = ||w||, so the net computes what PyTorch's init gave it
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0  # its output units are dim 1
        nn.utils.parametrizations.weight_norm(m, dim=dim)


def build_models(args, channels, k):
    """G and D from the lab's flags; k: the cDCGAN's number of labels (0: unconditional)."""
    k_d = 0 if k == 0 or args.no_label_in_d else k  # the labels D sees
    size = args.image_size
    g = (dcgan_generator(args.nz, args.ngf, channels, size, k) if args.generator == "dcgan"
         else mlp_generator(args.nz, channels, size, args.g_bn))
    if args.discriminator == "dcgan":
        d = dcgan_discriminator(args.ndf, channels, size, args.first_bn, k_d)
    elif args.discriminator == "conv":
        d = conv_critic(channels, size)
    else:
        d = mlp_discriminator(channels, size, args.d_dropout, sigmoid=args.lab != "wgan")
    for net in (g, d):  # --init default: PyTorch's init, left as it is
        net.apply({"dcgan": dcgan_init, "weight-norm": weight_normalize}.get(args.init, identity))
    return g, d


def make_optimizers(args, g, d):
    if args.lab == "wgan" and args.constraint == "clip":  # WGAN Alg. 1: momentum hurts clipping
        return (torch.optim.RMSprop(g.parameters(), lr=args.lr_g),
                torch.optim.RMSprop(d.parameters(), lr=args.lr_d))
    betas = (args.beta1, 0.9 if args.lab == "wgan" else 0.999)  # WGAN-GP Alg. 1: beta2 = 0.9
    return (torch.optim.Adam(g.parameters(), lr=args.lr_g, betas=betas),
            torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=betas))


def net_layout(precision):
    """bf16 runs keep G and D channels_last, 1.3x faster here (docs/train_small.md); fp32 keeps
    torch's default layout, whose results are the docs' bit for bit."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


def load_data(data, root, split, size, device):
    """A split's uint8 images at size x size on the device, its labels and class names."""
    x, y, classes = load_split(data, root, split)
    return resize_uint8(x, size).to(device), y.to(device), classes


def to_float(x_uint8):
    return x_uint8.float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1], the range of G's tanh


# ----------------------------------------------------------------------------- the evaluation
# Every lab is measured the same way, in the feature space of one small classifier of --data
# (trained once by `classifier`, or on first use, then cached): the FID formula between Gaussians
# fitted to the features, k-NN precision / recall, and the class shares.
def metric_classifier(channels, n_classes):
    """The metrics' network: net[0] maps a 32 x 32 image to the 128-d feature space, net[1] to
    class logits."""
    return nn.Sequential(nn.Sequential(
        # input: (channels) x 32 x 32
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        # state size: 16 x 16 x 16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        # state size: 32 x 8 x 8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        # state size: 64 x 4 x 4
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        # state size: 128, the feature space
    ), nn.Linear(128, n_classes))


def metric_net(args, channels, device):
    """The cached metric network of --data and its path, or one line; on first use it is trained
    on the data's own labels and saved there."""
    key = re.sub(r"\W+", "_", os.path.abspath(args.data) if os.path.isdir(args.data) else args.data)
    path = os.path.join(args.cache_dir, f"classifier_{key.strip('_')}.pt")
    if os.path.exists(path):
        try:  # a cache file, not a run: whatever holds the classifier of images with these channels
            saved = torch.load(path, map_location=device, weights_only=True)
            net = metric_classifier(channels, len(saved["classes"])).to(device)
            net.load_state_dict(saved["state"])
        except Exception as e:
            raise UserError(f"{path} is not a metric classifier of {channels}-channel images "
                            f"({type(e).__name__}); delete it to train a new one")
        return net, path
    print(f"training the metric classifier -> {path}")
    x, y, classes = load_data(args.data, args.data_root, "train", CLASSIFIER_SIZE, device)
    x_test, y_test, _ = load_data(args.data, args.data_root, "test", CLASSIFIER_SIZE, device)
    torch.manual_seed(args.seed)
    net = metric_classifier(x.shape[1], len(classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    epochs = args.epochs if args.lab == "classifier" else 2
    for epoch in range(epochs):
        t0 = time.time()
        for idx in torch.randperm(len(x), device=device).split(128):
            loss = F.cross_entropy(net(to_float(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(net, x_test, y_test)
        progress("classifier", epoch + 1, epochs, time.time() - t0, f"test accuracy {acc:.4f}")
    os.makedirs(args.cache_dir, exist_ok=True)
    save_checkpoint(path, {"state": net, "channels": channels, "classes": classes, "test_acc": acc})
    return net, path


def accuracy(net, x, y):
    return (features(net, x, logits=True).argmax(1) == y.cpu()).double().mean().item()


@torch.no_grad()
def features(net, x, logits=False):
    """128-d features (or logits) of uint8 images or of G's float images in [-1, 1], on the CPU in
    float64."""
    return torch.cat([(net if logits else net[0])(at_32(c)) for c in x.split(1000)]).double().cpu()


def at_32(x):
    """Images (uint8, or G's floats in [-1, 1]) in [-1, 1] at the metric network's 32 x 32."""
    x = to_float(x) if x.dtype == torch.uint8 else x
    size = (CLASSIFIER_SIZE, CLASSIFIER_SIZE)
    return x if x.shape[-1] == size[0] else F.interpolate(x, size=size, mode="bilinear",
                                                          antialias=True, align_corners=False)


@torch.no_grad()
def sample(g, z, y=None):
    # eval(): BatchNorm uses its running statistics, so a sample does not depend on which
    # other z share its batch (an interpolation strip would otherwise drift with the batch)
    g.eval()
    x = torch.cat([g(zc, None if y is None else y[i:i + 1000])
                   for i, zc in zip(range(0, len(z), 1000), z.split(1000))])
    g.train()
    return x


def knn_radii(feats, k):
    # distance to the k-th nearest other point; column 0 of topk is the point itself
    return torch.cat([torch.cdist(c, feats).topk(k + 1, largest=False).values[:, k]
                      for c in feats.split(1000)])


def coverage(queries, refs, radii):
    """Fraction of queries inside the union of balls B(ref, radius) (the k-NN manifold estimate)."""
    return torch.cat([(torch.cdist(c, refs) <= radii[None]).any(1)
                      for c in queries.split(1000)]).double().mean().item()


def precision_recall(real, fake, k=3):
    """Kynkäänniemi et al., 2019 (k = 3): precision = share of fakes inside the real manifold,
    recall = share of reals inside the fake manifold."""
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


def evaluate_gan(args, g, net, k, device):  # sample and features run without autograd
    """FID / precision / recall of generated vs real test images, and train vs test as the floor,
    in the feature space of the metric network `net`. The class shares show mode collapse: a GAN
    that drops a digit has a share near 0 for it. k: the cDCGAN's labels (0: none)."""
    x_test, y_test, classes = load_data(args.data, args.data_root, "test", CLASSIFIER_SIZE, device)
    x_train = load_data(args.data, args.data_root, "train", CLASSIFIER_SIZE, device)[0]
    n = min(args.eval_samples, len(x_test), len(x_train))
    gen = torch.Generator().manual_seed(args.seed + 3)
    f_test = features(net, x_test[torch.randperm(len(x_test), generator=gen)[:n].to(device)])
    real_train = x_train[torch.randperm(len(x_train), generator=gen)[:n].to(device)]
    z = torch.randn(n, args.nz, generator=gen).to(device)
    y = torch.arange(n, device=device) % k if k else None  # cDCGAN: every class equally often
    rows = []
    for name, x in (("generated vs test", sample(g, z, y)), ("train vs test (floor)", real_train)):
        f, pred = features(net, x), features(net, x, logits=True).argmax(1)
        p, r = precision_recall(f_test, f)
        share = torch.bincount(pred, minlength=len(classes)).double() / n
        row = {"fid": frechet_distance(f, f_test), "precision": p, "recall": r,
               "class_share_min": share.min().item(), "class_share_max": share.max().item()}
        rows.append({"comparison": name, "n": n} | {key: round(v, 4) for key, v in row.items()})
        if y is not None and name.startswith("generated"):  # does the classifier read y back?
            rows[-1]["cond_acc"] = round((pred == y.cpu()).double().mean().item(), 4)
    rows[1]["classifier_test_acc"] = round(accuracy(net, x_test, y_test), 4)
    for r in rows:
        print("[evaluate] " + ", ".join(f"{key} {value}" for key, value in r.items()))
    return rows


# ----------------------------------------------------------------------------- the GAN game (BCE)
def log_clamped(p):
    """log p, at least -100, as nn.BCELoss computes it: a saturated D gives a large, finite loss.
    The inner `where` keeps the gradient finite where p = 0 (log's gradient there is inf, and the
    clamp's 0 times inf is NaN); a NaN p stays NaN, so a diverged run is still caught."""
    p = p.float()  # under --precision bf16 too, the log of D's output in float32
    tiny = p <= math.exp(-100)
    return torch.where(tiny, -100.0, torch.log(torch.where(tiny, 1.0, p)))


def identity(x):
    return x


def bce_step(g, d, opt_g, opt_d, real, z, y_real=None, y_fake=None, aug=identity,
             update_d=True, update_g=True, saturating=False):
    """One iteration of the GAN game (Goodfellow et al., 2014, Alg. 1 with k = 1), as DCGAN and
    pytorch/examples play it: D sees a real batch and G(z), then G learns from D's verdict on the
    same G(z). y_real, y_fake: the cDCGAN's labels. aug: DiffAugment on D's inputs. Returns
    detached device tensors (no host sync here)."""
    # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
    fake = g(z, y_fake)
    real_a, fake_a = aug(real), aug(fake.detach())  # detach: this step changes D only
    d_real, d_fake = d(real_a, y_real), d(fake_a, y_fake)
    loss_d = -(log_clamped(d_real).mean() + log_clamped(1 - d_fake).mean())
    if update_d:
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
    out = {"loss_d": loss_d.detach(), "d_real": d_real.detach().mean(),
           "d_fake": d_fake.detach().mean()}
    if not update_g:
        return out
    # (2) Update G: maximize log D(G(z)) (non-saturating, DCGAN paper and pytorch/examples),
    # or minimize log(1 - D(G(z))) (saturating: the minimax game's own loss, --g-loss saturating)
    d_gen = d(aug(fake), y_fake)
    loss_g = log_clamped(1 - d_gen).mean() if saturating else -log_clamped(d_gen).mean()
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    out["loss_g"] = loss_g.detach()
    return out


# ----------------------------------------------------------------------------- the WGAN game
def wgan_critic_step(g, d, opt_d, real, z, aug=identity, constraint="gp", clip=0.01,
                     gp_lambda=10.0):
    """One critic iteration: WGAN Alg. 1 lines 3-7 (constraint "clip"), WGAN-GP Alg. 1 lines 4-9
    ("gp"), or neither constraint ("none"). The critic's output is a score, not a probability."""
    # (1) Update the critic: maximize D(x) - D(G(z)) [- lambda (||grad D(x_hat)||_2 - 1)^2]
    real_a, fake_a = aug(real), aug(g(z).detach())  # x ~ P_r, x~ = G(z)
    d_real, d_fake = d(real_a), d(fake_a)
    loss_d = d_fake.mean() - d_real.mean()  # WGAN-GP line 7: D(x~) - D(x) ...
    gp = gradient_penalty(d, real_a, fake_a, gp_lambda) if constraint == "gp" else None
    if gp is not None:
        loss_d = loss_d + gp  # ... + lambda (||grad D(x_hat)||_2 - 1)^2
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()  # RMSProp (WGAN line 6) or Adam (WGAN-GP line 9)
    if constraint == "clip":
        clip_weights(d, clip)  # WGAN line 7: w <- clip(w, -c, c)
    out = {"loss_d": loss_d.detach(), "d_real": d_real.detach().mean(),
           "d_fake": d_fake.detach().mean()}
    out["wdist"] = out["d_real"] - out["d_fake"]  # the critic's estimate of W(P_r, P_g)
    if gp is not None:
        out["gp"] = gp.detach()
    return out


def wgan_generator_step(g, d, opt_g, z, aug=identity):
    """WGAN Alg. 1 lines 9-11, WGAN-GP Alg. 1 lines 11-12, on a fresh batch of z."""
    # (2) Update G: maximize D(G(z))
    loss_g = -d(aug(g(z))).mean()
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return {"loss_g": loss_g.detach()}


def gradient_penalty(critic, real, fake, lam):
    """WGAN-GP (Gulrajani et al., 2017, eq. 3): lam * E[(||grad D(x_hat)||_2 - 1)^2] on random
    interpolates x_hat = e x + (1 - e) G(z), e ~ U[0, 1] per sample. create_graph: the penalty
    itself is differentiated in the critic's step."""
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return lam * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@torch.no_grad()
def clip_weights(critic, c):
    for p in critic.parameters():
        p.clamp_(-c, c)


@torch.no_grad()
def lipschitz_bound(critic):
    """Upper bound on the critic's Lipschitz constant (LeakyReLU is 1-Lipschitz): prod_i ||W_i||_2,
    convolutions reshaped to (out, in*h*w). A strided convolution applies its matrix to
    overlapping patches, so a true bound multiplies each conv's norm by sqrt(overlaps per pixel)
    = ceil(kh/sh) * ceil(kw/sw) under the root (2 for 4x4 stride 2). Returns (product, bound),
    0-d tensors on the critic's device (read them at log steps only)."""
    product = bound = torch.ones((), device=next(critic.parameters()).device)
    for m in critic.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
            product = product * sigma
            # a convolution's patches per pixel: ceil(kh/sh) * ceil(kw/sw); a linear layer's: 1
            overlap = math.prod(math.ceil(k / s) for k, s in zip(getattr(m, "kernel_size", ()),
                                                                 getattr(m, "stride", ())))
            bound = bound * sigma * math.sqrt(overlap)
    return product, bound


# ----------------------------------------------------------------------------- training a GAN lab
# The loop both games share: dcgan, cdcgan and vanilla play bce_step, wgan plays the critic's and
# the generator's steps. Its outputs: samples, curves, metrics.csv, the checkpoint, summary.json.
def play(args, g, d, opt_g, opt_d, real, y_real, k, aug, update_g, device):
    """One iteration of the lab's game, on a fresh z (and, for the cDCGAN, fresh fake labels)."""
    n = len(real)
    if args.lab == "wgan":
        z = torch.randn(n, args.nz, device=device)
        out = wgan_critic_step(g, d, opt_d, real, z, aug, args.constraint, args.clip,
                               args.gp_lambda)
        if update_g:
            z = torch.randn(n, args.nz, device=device)  # Alg. 1: a fresh batch for G
            out.update(wgan_generator_step(g, d, opt_g, z, aug))
        return out
    y_fake = torch.randint(0, k, (n,), device=device) if k else None
    z = torch.randn(n, args.nz, device=device)
    return bce_step(g, d, opt_g, opt_d, real, z, y_real, y_fake, aug, update_g=update_g,
                    update_d=args.train_only != "g", saturating=args.g_loss == "saturating")


def train(args, x_train, y_train, k, device):
    """The lab's game for --epochs passes over the shuffled training images, resumed from and
    saved to --out/checkpoint.pt. k: the cDCGAN's labels (0: none). Returns G, the log rows
    (metrics.csv) and the training wall time."""
    torch.manual_seed(args.seed)
    layout = net_layout(args.precision)
    g, d = (net.to(device, memory_format=layout) for net in build_models(args, x_train.shape[1], k))
    opt_g, opt_d = make_optimizers(args, g, d)
    nets = {"g": g, "d": d, "opt_g": opt_g, "opt_d": opt_d}
    path, start, history, wall = start_run(args, nets)
    n_g, n_d = (sum(p.numel() for p in net.parameters()) for net in (g, d))
    print(f"{args.lab}: {len(x_train)} images {tuple(x_train.shape[1:])}, G {n_g:,} / D {n_d:,} "
          f"parameters, {device}, out {args.out}", flush=True)
    policy = [name for name in args.diffaug.split(",") if name]  # DiffAugment's, on D's inputs
    aug = functools.partial(diff_augment, policy=policy) if policy else identity
    n, iters = args.batch_size, len(x_train) // args.batch_size  # no partial batch: BN comparable
    for epoch in range(start, args.epochs):
        t0 = t_log = time.time()
        sums, perm = {}, torch.randperm(len(x_train), device=device)
        for i, idx in enumerate(perm[:iters * n].split(n)):
            step = epoch * iters + i + 1
            real, y_real = to_float(x_train[idx]), y_train[idx]
            # --g-every / --n-critic: G steps are rarer; --train-only d: G stays at its init
            update_g = step % args.g_every == 0 and args.train_only != "d"
            with autocast(args.precision, device):  # a no-op unless --precision bf16
                out = play(args, g, d, opt_g, opt_d, real, y_real, k, aug, update_g, device)
            accumulate(sums, out)
            if step % args.log_every == 0 or i == iters - 1:
                seconds = (time.time() - t_log) / sums["loss_d"][1]
                history.append(log_row(args, d, sums, step, epoch + (i + 1) / iters, seconds,
                                       args.epochs * iters))
                sums, t_log = {}, time.time()
        wall += time.time() - t0
        save_samples(g, args, epoch + 1, k, device)
        plot_lines(os.path.join(args.out, "curves.png"), curve_panels(history, args.lab))
        save_run(path, nets, args, epoch + 1, history, wall)
    if start >= args.epochs:
        print(f"{path} already holds {start} epochs; writing the outputs again")
    return g, history, wall


def start_run(args, nets):
    """The run in --out resumed into `nets` (refused if a training flag changed), or a new one:
    (its checkpoint's path, the epochs done, the history, the train wall time so far)."""
    path = os.path.join(args.out, "checkpoint.pt")
    saved = resume(path, nets, training_flags(args)) or {"epoch": 0, "history": [], "wall_s": 0}
    if saved["epoch"]:
        print(f"resuming {args.lab} from {path} after epoch {saved['epoch']}")
    os.makedirs(args.out, exist_ok=True)
    return path, saved["epoch"], saved["history"], saved["wall_s"]


def save_run(path, nets, args, epoch, history, wall):
    """metrics.csv and the checkpoint of a GAN lab's or DANN's run: its nets, optimizers, history
    and flags."""
    write_csv(os.path.join(args.out, "metrics.csv"), history)
    save_checkpoint(path, nets | {"lab": args.lab, "epoch": epoch, "history": history,
                                  "flags": training_flags(args), "wall_s": wall,
                                  "command": " ".join(["python"] + sys.argv)})


def save_summary(args, device, wall, history, extra):
    """summary.json: how the run ran (the same keys for every lab and DANN), then its own keys."""
    write_json(os.path.join(args.out, "summary.json"), {
        "lab": args.lab, "command": " ".join(["python"] + sys.argv), "device": str(device),
        "threads": torch.get_num_threads(), "train_wall_s": round(wall, 1),
        "iterations": history[-1]["iter"] if history else 0, "epochs": args.epochs} | extra)


def accumulate(sums, out):
    """Per key: (sum, count) of a step's detached values, summed on the device (no host sync)."""
    for key, value in out.items():
        total, count = sums.get(key, (0.0, 0))
        sums[key] = (total + value, count + 1)


def log_row(args, d, sums, step, epoch, seconds, steps):
    """The means since the last row, one progress line; a non-finite value ends the run here."""
    keys = ["loss_d", "loss_g", "d_real", "d_fake"]
    keys += ["wdist", "gp"] if args.lab == "wgan" else []
    fix = " (or --constraint gp)" if args.lab == "wgan" and args.constraint == "none" else ""
    row = {"iter": step, "epoch": epoch}
    for key in keys:  # nan: no G step in this window (--g-every, --n-critic), or no penalty
        row[key] = (sums[key][0] / sums[key][1]).item() if key in sums else float("nan")
        if key in sums:
            stop_if_diverged(row[key], f"epoch {math.ceil(epoch)}, iteration {step} ({key})",
                             "--lr-d / --lr-g" + fix)
    if args.lab == "wgan":  # lip_product: prod ||W_i||_2 reshaped; lip_bound: x conv overlap
        row["lip_product"], row["lip_bound"] = (t.item() for t in lipschitz_bound(d))
    text = " ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("iter", "epoch"))
    progress(f"{args.lab} epoch {math.ceil(epoch)}/{args.epochs}", step, steps, seconds, text)
    return row | {"s_per_iter": seconds}


def curve_panels(history, lab):
    """curves.png: the losses, D's mean outputs; for WGAN also its estimate and the bound."""
    panels = {"loss": ("loss_d", "loss_g"), "D output (mean)": ("d_real", "d_fake")}
    if lab == "wgan":
        panels.update({"W estimate D(x) - D(G(z)) / GP": ("wdist", "gp"),
                       "Lipschitz bound (log)": ("lip_product", "lip_bound")})
    x = [r["iter"] for r in history]
    return [(title, "iteration", "", {key: (x, [r[key] for r in history]) for key in keys})
            for title, keys in panels.items()]


def save_samples(g, args, epoch, k, device, steps=11):
    """samples_epochNN.png: 64 samples of one fixed z (cDCGAN: the classes in turn);
    interpolation_epochNN.png: G(a z1 + (1 - a) z2), a = 0 ... 1, the same z1, z2 every epoch."""
    z = torch.randn(64, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    y = torch.arange(64, device=device) % k if k else None
    path = os.path.join(args.out, f"samples_epoch{epoch:02d}.png")
    save_grid(path, sample(g, z, y), value_range=(-1, 1))
    gen = torch.Generator().manual_seed(args.seed + 1)
    z1, z2 = torch.randn(2, 1, args.nz, generator=gen).to(device)
    alpha = torch.linspace(0, 1, steps, device=device)[:, None]
    y = torch.randint(0, k, (1,), generator=gen).to(device).expand(steps) if k else None
    path = os.path.join(args.out, f"interpolation_epoch{epoch:02d}.png")
    save_grid(path, sample(g, alpha * z1 + (1 - alpha) * z2, y), steps, value_range=(-1, 1))


def save_outputs(args, g, history, wall, metrics, classes, channels, k, device):
    """End-of-run outputs (again when a finished run's command runs again): class_grid.png
    (cDCGAN), eval.csv, summary.json."""
    if k:  # rows: the classes; columns: 8 fixed z (z carries the style)
        z = torch.randn(8, args.nz, generator=torch.Generator().manual_seed(args.seed + 2))
        y = torch.arange(k, device=device).repeat_interleave(8)
        save_grid(os.path.join(args.out, "class_grid.png"), sample(g, z.to(device).repeat(k, 1), y),
                  value_range=(-1, 1))
    if metrics:
        write_csv(os.path.join(args.out, "eval.csv"), metrics)
    save_summary(args, device, wall, history, {  # history: never empty, every epoch logs a row
        "s_per_iter": round(sum(r["s_per_iter"] for r in history[-10:]) / len(history[-10:]), 4),
        "final": history[-1], "metrics": metrics,
        "args": dict(vars(args), classes=classes, channels=channels)})
    print(f"wrote {args.out}/ (train wall time {wall:.0f} s)")


# ----------------------------------------------------------------------------- memorization
def nearest(queries, refs, k, embed=identity):
    """Distances and indices [len(queries), k] of each query's k nearest rows of embed(refs), in
    Euclidean distance; refs are embedded in chunks (no float copy of a whole training set)."""
    best_d, best_i = queries.new_empty(len(queries), 0), torch.empty(len(queries), 0).long()
    for start in range(0, len(refs), 5000):
        chunk = embed(refs[start:start + 5000]).to(queries.dtype)
        i = torch.cdist(queries, chunk).topk(min(k, len(chunk)), largest=False).indices
        # cdist's fast path loses digits for near-copies, the very case looked for: measure the
        # chosen neighbours' distances again, directly
        d = (queries[:, None] - chunk[i]).norm(dim=-1)
        best_d, j = torch.cat([best_d, d], 1).topk(min(k, best_d.shape[1] + d.shape[1]),
                                                   largest=False)
        best_i = torch.cat([best_i, i + start], 1).gather(1, j)
    return best_d, best_i


def pixels(x):
    """Images (uint8, or G's floats in [-1, 1]) as vectors of their 32 x 32 pixels in [-1, 1]."""
    return at_32(x).flatten(1).cpu()


def memorization_check(g, net, x_train, x_test, nz, k, seed, n):
    """Seed 001's memorization check: a G that copies training images scores well on FID and
    recall, yet its samples sit much nearer to the training set than new real images do. For the
    64 fixed samples of samples_epochNN.png: their 3 nearest training images in the metric
    network's feature space and in pixel space. For n samples and n test images: the distance of
    each to its nearest training image (features), two distributions to compare."""
    z = torch.randn(64, nz, generator=torch.Generator().manual_seed(seed)).to(x_train.device)
    shown = sample(g, z, torch.arange(64, device=z.device) % k if k else None)
    f_train = torch.cat([features(net, c) for c in x_train.split(5000)]).float()
    near_f = nearest(features(net, shown).float(), f_train, 3)
    near_p = nearest(pixels(shown), x_train, 3, embed=pixels)
    gen = torch.Generator().manual_seed(seed + 4)
    z = torch.randn(n, nz, generator=gen).to(x_train.device)
    y = torch.arange(n, device=z.device) % k if k else None
    tests = x_test[torch.randperm(len(x_test), generator=gen)[:n].to(x_test.device)]
    d_fake = nearest(features(net, sample(g, z, y)).float(), f_train, 1)[0][:, 0]
    d_test = nearest(features(net, tests).float(), f_train, 1)[0][:, 0]
    return shown, near_f, near_p, d_fake, d_test


def check_memorization(args, device):
    """The memorization check of the GAN run in --run: memorization.png, nn_distances.png and
    memorization.json in that folder."""
    path = os.path.join(args.run, "checkpoint.pt")
    saved = resume(path, {}, {})  # refuses a damaged file or an earlier format in one line
    if saved is None:
        raise UserError(f"no {path}: --run must be the folder of a GAN lab's run")
    if "g" not in saved:
        raise UserError(f"{path} holds no generator (a {saved.get('lab')} run): nothing to check "
                        f"for memorization")
    run = argparse.Namespace(**saved["flags"], cache_dir=args.cache_dir, data_root=args.data_root)
    x_train, _, classes = load_data(run.data, run.data_root, "train", CLASSIFIER_SIZE, device)
    x_test = load_data(run.data, run.data_root, "test", CLASSIFIER_SIZE, device)[0]
    k = len(classes) if run.lab == "cdcgan" else 0
    g = build_models(run, x_train.shape[1], k)[0].to(device)
    g.load_state_dict(saved["g"])
    net = metric_net(run, x_train.shape[1], device)[0]
    save_memorization(args.run, x_train, *memorization_check(
        g, net, x_train, x_test, run.nz, k, run.seed, min(args.eval_samples, len(x_test))))


def save_memorization(out, x_train, shown, near_f, near_p, d_fake, d_test):
    """memorization.png: two columns of 32 rows, each a sample, its 3 nearest training images in
    feature space and its 3 nearest in pixel space; nn_distances.png; memorization.json."""
    tiles = []
    for i in [j for r in range(32) for j in (r, r + 32)]:  # rows: samples r and r + 32
        tiles += [pixels(shown[i:i + 1]).view(1, *x_train.shape[1:])]
        tiles += [to_float(x_train[near[1][i]]).cpu() for near in (near_f, near_p)]
    save_grid(os.path.join(out, "memorization.png"), torch.cat(tiles), 14, value_range=(-1, 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d, name in ((d_fake, "samples"), (d_test, "real test images")):
        ax.hist(d.numpy(), bins=50, alpha=0.5, density=True,
                label=f"{name} (median {d.median():.3g})")
    ax.set(xlabel="distance to the nearest training image (metric network features)",
           ylabel="density", title="memorization check")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "nn_distances.png"))
    q = torch.tensor([0.05, 0.5, 0.95])
    stats = {name: dict(zip(("p05", "median", "p95"), d.quantile(q).tolist()), mean=d.mean().item())
             for name, d in (("samples", d_fake), ("test", d_test))}
    write_json(os.path.join(out, "memorization.json"), {
        "n": len(d_fake), "space": "metric network features (128-d)", **stats,
        "median_ratio": stats["samples"]["median"] / stats["test"]["median"],
        "share_of_samples_below_test_p05": (d_fake < stats["test"]["p05"]).double().mean().item(),
        "nearest_of_shown": {"features": near_f[1].tolist(), "pixels": near_p[1].tolist()}})
    print(f"[memorization] median distance to the training set: samples "
          f"{stats['samples']['median']:.4g}, test images {stats['test']['median']:.4g}; "
          f"wrote {out}/memorization.png, nn_distances.png, memorization.json")


# ----------------------------------------------------------------------------- the DANN lab
# Ganin et al., "Domain-Adversarial Training of Neural Networks" (JMLR 2016): a domain classifier
# regularizes a classifier's *features* (in the paper, a discriminator regularizes its kernels).
# Source: MNIST with labels; target: MNIST-M-style digits, their labels used only to evaluate.
class DANN(nn.Module):
    """The DANN paper's MNIST network: feature extractor G_f, label classifier G_y and domain
    classifier G_d (which sits behind the gradient reversal layer)."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            # input: 3 x 28 x 28 (grey source digits copied to 3 channels)
            nn.Conv2d(3, 32, 5), nn.MaxPool2d(2), nn.ReLU(True),
            # state size: 32 x 12 x 12
            nn.Conv2d(32, 48, 5), nn.MaxPool2d(2), nn.ReLU(True),
            # state size: 48 x 4 x 4
            nn.Flatten(),
            # output: 768 features
        )
        self.label_classifier = nn.Sequential(
            nn.Linear(768, 100), nn.ReLU(True), nn.Linear(100, 100), nn.ReLU(True),
            nn.Linear(100, n_classes),
            # output: class logits
        )
        self.domain_classifier = nn.Sequential(
            nn.Linear(768, 100), nn.ReLU(True), nn.Linear(100, 1), nn.Flatten(0),
            # output: logit of "this image is from the target domain"
        )


class GradientReversal(torch.autograd.Function):
    """The gradient reversal layer (DANN paper, Sec. 3.2): the identity going forward; going
    backward, the gradient times -lambda."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lam * grad_output, None


def dann_schedules(p, lr0, alpha, beta, gamma):
    """The DANN paper's schedules at training progress p in [0, 1]: the learning rate
    mu_p = mu_0 / (1 + alpha p)^beta and the adaptation weight
    lambda_p = 2 / (1 + exp(-gamma p)) - 1 (0 at the start, while the features are still noise;
    near 1 by the end)."""
    return lr0 / (1 + alpha * p) ** beta, 2 / (1 + math.exp(-gamma * p)) - 1


def adaptation_weight(args, lam_p):
    """The lambda of this step: the paper's schedule lambda_p, a fixed --lam (Q3), 0 for the
    source-only baseline and for pseudo-labels (Q4), or -1 without the reversal layer (Q1): the
    layer's -lambda is then +1, the features get the domain loss's own gradient and help G_d."""
    if args.no_adapt or args.pseudo_labels:
        return 0.0
    if args.no_reversal:
        return -1.0
    return lam_p if args.lam is None else args.lam


@torch.no_grad()
def pseudo_labels(net, x, threshold):
    """Pseudo-labelling (Lee, 2013): the class a trained net predicts for each image, kept where
    its softmax probability is above `threshold`; -1 (no label) elsewhere."""
    labels = []
    for chunk in x.split(1000):
        prob = F.softmax(net.label_classifier(net.features(to_float(chunk))), 1)
        confidence, predicted = prob.max(1)
        labels.append(torch.where(confidence > threshold, predicted, -1))
    return torch.cat(labels)


def mnist_m_style(digits, patches, gen):
    """MNIST-M as the DANN paper built it: each digit blended with a random colour patch,
    |patch - digit| per channel. The patches are random crops of `patches` (CIFAR-10 training
    images here, BSDS500 photographs in the paper). uint8 [N, 1, H, W] -> [N, 3, H, W]."""
    h, w = digits.shape[-2:]
    out = []
    for chunk in digits.split(10000):
        m = len(chunk)
        pick = torch.randint(0, len(patches), (m, 1, 1), generator=gen)
        top = torch.randint(0, patches.shape[-2] - h + 1, (m, 1, 1), generator=gen)
        left = torch.randint(0, patches.shape[-1] - w + 1, (m, 1, 1), generator=gen)
        rows, cols = top + torch.arange(h)[None, :, None], left + torch.arange(w)[None, None, :]
        crops = patches[pick, :, rows, cols].permute(0, 3, 1, 2)  # m x 3 x h x w
        out.append((crops.int() - chunk.int()).abs().to(torch.uint8))
    return torch.cat(out)


def dann_step(net, opt, x_source, y_source, x_target, lam, lr, y_target=None):
    """One SGD step of DANN (the paper's Alg. 1 with the gradient reversal layer): G_y and G_f
    minimize the label loss on source images; G_d minimizes the domain loss on source and target
    images; through the reversal layer G_f gets -lambda times the domain loss's gradient, so it
    learns features from which G_d cannot tell the domains apart. y_target: pseudo-labels (-1:
    none); the label loss is then the mean over the source and the labelled target images."""
    for group in opt.param_groups:
        group["lr"] = lr
    f = net.features(torch.cat([x_source, x_target]))
    if y_target is None:
        loss_y = F.cross_entropy(net.label_classifier(f[:len(x_source)]), y_source)  # L_y
    else:
        loss_y = F.cross_entropy(net.label_classifier(f), torch.cat([y_source, y_target]),
                                 ignore_index=-1)
    domain = torch.cat([torch.zeros(len(x_source)), torch.ones(len(x_target))]).to(f.device)
    d_logit = net.domain_classifier(GradientReversal.apply(f, lam))
    loss_d = F.binary_cross_entropy_with_logits(d_logit, domain)  # L_d, both domains
    opt.zero_grad(set_to_none=True)
    (loss_y + loss_d).backward()
    opt.step()
    return {"loss_y": loss_y.detach(), "loss_d": loss_d.detach(),
            "domain_acc": ((d_logit.detach() > 0).float() == domain).float().mean()}


def train_dann(args, data, n_classes, device):
    """DANN for --epochs passes over the source images or, with --no-adapt, the source-only
    baseline (lambda = 0); lambda otherwise as adaptation_weight says. data: source (x, y),
    target x (no labels; with --pseudo-labels, "target_pseudo"), and the two test sets."""
    torch.manual_seed(args.seed)
    net = DANN(n_classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    path, start, history, wall = start_run(args, {"net": net, "opt": opt})
    (x_s, y_s), x_t = data["source"], data["target"]
    n, iters = args.batch_size, len(x_s) // args.batch_size
    for epoch in range(start, args.epochs):
        t0, sums = time.time(), {}
        perm_s, perm_t = (torch.randperm(len(x), device=device) for x in (x_s, x_t))
        for i, idx_s in enumerate(perm_s[:iters * n].split(n)):
            p = (epoch * iters + i) / (args.epochs * iters)  # training progress, 0 -> 1
            lr, lam = dann_schedules(p, args.lr, args.lr_alpha, args.lr_beta, args.gamma)
            lam = adaptation_weight(args, lam)
            idx_t = perm_t[(i * n + torch.arange(n, device=device)) % len(x_t)]
            y_t = data["target_pseudo"][idx_t] if "target_pseudo" in data else None
            with autocast(args.precision, device):  # a no-op unless --precision bf16
                out = dann_step(net, opt, to_float(x_s[idx_s]), y_s[idx_s],
                                to_float(x_t[idx_t]), lam, lr, y_t)
            accumulate(sums, out)
        wall += time.time() - t0
        # one row an epoch: the schedules at its last step, the means of its steps, the accuracies
        step, s_per_iter = (epoch + 1) * iters, (time.time() - t0) / iters
        row = {"epoch": epoch + 1, "iter": step, "lambda": lam, "lr": lr}
        for key, (total, count) in sums.items():
            row["train_" + key if key == "domain_acc" else key] = (total / count).item()
        stop_if_diverged(row["loss_y"] + row["loss_d"], f"epoch {epoch + 1}", "--lr")
        row.update(dann_accuracies(net, data))
        text = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "iter"))
        progress(f"dann, {dann_method(args)}", epoch + 1, args.epochs, s_per_iter * iters, text)
        history.append(row | {"s_per_iter": s_per_iter})
        save_run(path, {"net": net, "opt": opt}, args, epoch + 1, history, wall)
    return net, history, wall


def load_dann_data(args, device):
    """Source: --data's digits at 28 x 28, grey copied to 3 channels. Target: --target's images,
    or the same splits' digits blended with crops of --target-patches' training images (one fixed
    target set for every run: its own random generator). The target's training labels are
    dropped here: only its test labels are kept, to evaluate."""
    (xs, ys, classes), (xs_test, ys_test, _) = (load_data(args.data, args.data_root, split, 28,
                                                          "cpu") for split in ("train", "test"))
    if args.target:
        (x_t, _, t_classes), (x_t_test, y_t_test, _) = (
            load_split(args.target, args.data_root, split) for split in ("train", "test"))
        # one input size (28 x 28) in both splits, one label classifier
        if {x_t.shape[-2:], x_t_test.shape[-2:]} != {xs.shape[-2:]} or t_classes != classes:
            raise UserError(f"--target {args.target} has {x_t.shape[-2]}x{x_t.shape[-1]} images, "
                            f"the source 28x28 (classes {t_classes}, the source's {classes})")
    else:
        patches = load_split(args.target_patches, args.data_root, "train")[0]
        if min(patches.shape[-2:]) < 28:
            raise UserError(f"--target-patches {args.target_patches} has {patches.shape[-2]}x"
                            f"{patches.shape[-1]} images, smaller than the 28x28 digits: the "
                            f"patches are crops of them")
        patches = patches.expand(-1, 3, -1, -1) if patches.shape[1] == 1 else patches[:, :3]
        gen = torch.Generator().manual_seed(0)
        x_t, x_t_test = mnist_m_style(xs, patches, gen), mnist_m_style(xs_test, patches, gen)
        y_t_test = ys_test
    target = args.target or f"the digits on crops of {args.target_patches}"
    print(f"dann: source {args.data} {tuple(xs.shape)}, target {target} {tuple(x_t.shape)}")

    def rgb(x):  # grey images: 3 equal channels (a 3-channel image stays as it is)
        return x.expand(-1, 3, -1, -1)
    data = {"source": (rgb(xs).to(device), ys.to(device)), "target": rgb(x_t).to(device),
            "source_test": (rgb(xs_test).to(device), ys_test.to(device)),
            "target_test": (rgb(x_t_test).to(device), y_t_test.to(device))}
    return data, classes


def dann_method(args):
    """The run's name in the progress lines, the figure and summary.json."""
    if args.no_adapt:
        return "source only"
    if args.pseudo_labels:
        return f"pseudo-labels > {args.threshold:g}"
    if args.no_reversal:
        return "no reversal"
    return "DANN" if args.lam is None else f"DANN, lambda = {args.lam:g}"


def label_target(args, data, n_classes, device):
    """--pseudo-labels: the target training images' pseudo-labels from the finished dann run in
    that folder (same source and target), and what they are worth: the share kept, and on the
    target test set the share the same threshold keeps and their accuracy."""
    path = os.path.join(args.pseudo_labels, "checkpoint.pt")
    net = DANN(n_classes)  # resume refuses another run's domains (the labeller must see ours)
    domains = {key: getattr(args, key) for key in ("lab", "data", "target", "target_patches")}
    saved = resume(path, {"net": net}, domains)
    if saved is None or saved["epoch"] != saved["flags"]["epochs"]:
        raise UserError(f"--pseudo-labels {args.pseudo_labels}: no finished dann run there (its "
                        f"checkpoint.pt at its last epoch); give one, e.g. a --no-adapt run")
    net = net.to(device).eval()
    labels = pseudo_labels(net, data["target"], args.threshold)
    x_test, y_test = data["target_test"]
    test_labels = pseudo_labels(net, x_test, args.threshold)
    kept = test_labels >= 0
    stats = {"labeller": args.pseudo_labels, "train_kept": (labels >= 0).float().mean().item(),
             "test_kept": kept.float().mean().item(),
             "test_kept_acc": (test_labels[kept] == y_test[kept]).float().mean().item()
             if kept.any() else None}
    print(f"pseudo-labels from {path}: {stats['train_kept']:.1%} of the target training images "
          f"above {args.threshold:g}; on the target test set {stats['test_kept']:.1%} kept, "
          f"{stats['test_kept_acc'] or 0:.1%} of them right")
    return {"target_pseudo": labels, "pseudo_stats": stats}


@torch.no_grad()
def dann_accuracies(net, data):
    """Label accuracy on the source and target test sets; domain classifier accuracy on both."""
    acc = {}
    for name in ("source", "target"):
        x, y = data[f"{name}_test"]
        correct = domain_correct = 0
        for c, yc in zip(x.split(1000), y.split(1000)):
            f = net.features(to_float(c))
            correct += (net.label_classifier(f).argmax(1) == yc).sum().item()
            domain_correct += ((net.domain_classifier(f) > 0) == (name == "target")).sum().item()
        acc[f"{name}_acc"], acc[f"{name}_domain_acc"] = correct / len(x), domain_correct / len(x)
    acc["domain_acc"] = (acc.pop("source_domain_acc") + acc.pop("target_domain_acc")) / 2
    return acc


@torch.no_grad()
def save_dann_outputs(args, net, data, history, wall, device):
    """features.png (the features of 1000 source and 1000 target test images, projected on their
    first two principal components, coloured by domain) and summary.json."""
    x_s, x_t = data["source_test"][0][:1000], data["target_test"][0][:1000]
    f = torch.cat([net.features(to_float(x)) for x in (x_s, x_t)]).cpu()
    _, _, v = torch.pca_lowrank(f, q=2)  # centres f itself
    xy = (f - f.mean(0)) @ v
    fig, ax = plt.subplots(figsize=(5, 5))
    for part, name in ((slice(0, len(x_s)), "source (MNIST)"), (slice(len(x_s), None),
                                                                 "target (MNIST-M-style)")):
        ax.scatter(xy[part, 0], xy[part, 1], s=3, alpha=0.5, label=name)
    ax.set(title=f"G_f features, PCA ({dann_method(args)})", xlabel="PC 1", ylabel="PC 2")
    ax.legend(markerscale=4)
    save_figure(fig, os.path.join(args.out, "features.png"))
    last = history[-1]  # never empty: every epoch logs a row
    save_summary(args, device, wall, history, {
        "adapt": not args.no_adapt, "method": dann_method(args),
        "pseudo_labels": data.get("pseudo_stats")} | {key: last[key] for key in (
            "source_acc", "target_acc", "domain_acc", "s_per_iter")} | {"args": vars(args)})
    print(f"[dann] source accuracy {last['source_acc']:.4f}, target accuracy "
          f"{last['target_acc']:.4f}; wrote {args.out}/ (train wall time {wall:.0f} s)")


# ----------------------------------------------------------------------------- DiffAugment
def diff_augment(x, policy):
    """DiffAugment (Zhao et al., 2020): random translation (1/8 of the side, zero fill), cutout
    (a square of half the side) and colour jitter, differentiable in x: G learns through it."""
    n, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(n, device=dev)[:, None, None]
    for name in policy:
        if name == "color":
            x = x + (torch.rand(n, 1, 1, 1, device=dev) - 0.5)
            if c > 1:
                mean = x.mean(1, keepdim=True)
                x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev) * 2) + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev) + 0.5) + mean
        elif name == "translation":
            s = int(h * 0.125 + 0.5)
            ty, tx = torch.randint(-s, s + 1, (2, n, 1, 1), device=dev)
            gy = (torch.arange(h, device=dev)[:, None] + ty + 1).clamp(0, h + 1)  # n x h x 1
            gx = (torch.arange(w, device=dev) + tx + 1).clamp(0, w + 1)  # n x 1 x w
            x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[rows, gy, gx].permute(0, 3, 1, 2)
        elif name == "cutout":
            ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
            oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=dev)
            ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=dev)
            gy = (torch.arange(ch, device=dev)[:, None] + oy - ch // 2).clamp(0, h - 1)
            gx = (torch.arange(cw, device=dev) + ox - cw // 2).clamp(0, w - 1)
            mask = torch.ones(n, h, w, device=dev)
            mask[rows, gy, gx] = 0
            x = x * mask.unsqueeze(1)
    return x


# ----------------------------------------------------------------------------- Frechet distance
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


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args)
    warn_if_bf16_is_slow(getattr(args, "precision", "fp32"), device)  # labs and dann
    if args.lab == "dann":
        data, classes = load_dann_data(args, device)
        if args.pseudo_labels:
            data = dict(data, **label_target(args, data, len(classes), device))
        net, history, wall = train_dann(args, data, len(classes), device)
        save_dann_outputs(args, net, data, history, wall, device)
    elif args.lab == "memorization":
        check_memorization(args, device)
    elif args.lab == "classifier":
        channels = load_split(args.data, args.data_root, "train")[0].shape[1]
        print(f"classifier {metric_net(args, channels, device)[1]}")
    else:  # a GAN lab: train (or resume), then the metrics and the run's outputs
        x, y, classes = load_data(args.data, args.data_root, "train", args.image_size, device)
        if len(x) < args.batch_size:  # x, y: the training images and their labels
            raise UserError(f"{len(x)} training images, fewer than --batch-size {args.batch_size}")
        k, channels = (len(classes) if args.lab == "cdcgan" else 0), x.shape[1]
        g, history, wall = train(args, x, y, k, device)
        metrics = []
        if args.eval_samples > 0:
            net, path = metric_net(args, channels, device)
            print(f"[evaluate] feature net {path}")
            metrics = evaluate_gan(args, g, net, k, device)
        save_outputs(args, g, history, wall, metrics, classes, channels, k, device)


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
