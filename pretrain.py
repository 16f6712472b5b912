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
Results: docs/pretrain.md; where each default comes from: docs/defaults.md
"""
import argparse, functools, json, math, os, pathlib, sys, time

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.register("type", None, os.path.expanduser)  # a string flag (a path): ~ expanded
    add = p.add_argument  # the source of each default in (...); the why: docs/defaults.md
    add("--data", default="cifar100", help="cifar100 | cifar10 | an ImageFolder PATH (paper)")
    add("--data-root", default="data", help="where torchvision downloads datasets (ours)")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one model each (paper)")
    add("--epochs", type=int, default=100, help="epochs per seed (paper)")
    add("--batch-size", type=int, default=128, help="images per step (paper; notebook: 256)")
    add("--lr", type=float, default=1e-3, help="Adam's learning rate (paper)")
    add("--weight-decay", type=float, default=1e-3, help="Adam's (paper; notebook: 1e-4)")
    add("--no-augment", action="store_true", help="no random crop + flip (on: notebook)")
    add("--train-limit", type=int, default=0, help="train on N images drawn once; 0 = all (ours)")
    add("--test-limit", type=int, default=0, help="test on N images drawn once; 0 = all (ours)")
    add("--eval-every", type=int, default=1, help="test accuracy every N epochs (ours)")
    add("--quick", action="store_true", help="--epochs 2 --train-limit 2000 --test-limit 1000")
    add("--evaluate", nargs="+", metavar="CKPT", help="no training: these checkpoints' test acc")
    add("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (ours)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="(ours)")
    add("--threads", type=int, default=0, help="CPU threads; 0 = torch's default (ours)")
    add("--out", default="checkpoints", help="folder of seed<N>.pt, summary.json, ... (ours)")
    args = p.parse_args(argv)
    if args.quick:  # the quick budget, as if given last on the command line
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        args = p.parse_args(argv + "--epochs 2 --train-limit 2000 --test-limit 1000".split())
    counts = ("epochs", "batch_size", "eval_every")
    checks = [(vars(args)[k] < 1, f"--{k.replace('_', '-')} must be >= 1, got {vars(args)[k]}")
              for k in counts] + [
        (min(args.train_limit, args.test_limit) < 0,
         "--train-limit and --test-limit must be >= 0 (0 = all)"),
        (len(set(args.seeds)) != len(args.seeds), f"--seeds has duplicates: {args.seeds}")]
    for failed, message in checks:
        if failed:
            p.error(message)
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
    # TRY NOT TO MODIFY: the run as one dict, saved after every epoch; an interrupted seed resumes
    # where it stopped, and a folder holding a run with other training flags is refused
    path = os.path.join(args.out, f"seed{seed}.pt")
    flags = {k: v for k, v in vars(args).items() if k not in FREE_FLAGS}
    ckpt = {"model": model, "optimizer": optimizer, "arch": ARCH, "seed": seed, "epoch": 0,
            "history": {"train_loss": [], "eval_epoch": [], "test_acc": [], "epoch_seconds": []},
            "args": vars(args), "flags": flags, "classes": classes, "dataset": args.data,
            "label": f"pretrained ({args.data})", "row_order": [4, 0, 0, 0.0]}  # --compare's row
    saved = resume(path, ckpt, flags)
    if saved:
        print(f"seed {seed}: resuming from {path} after epoch {saved['epoch']} of {args.epochs}")
        ckpt.update(epoch=saved["epoch"], history=saved["history"])
    history, n = ckpt["history"], len(train_x)
    for epoch in range(ckpt["epoch"] + 1, args.epochs + 1):
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
        test_acc = "-"
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            with autocast(args.precision, device):
                history["test_acc"].append(evaluate(model, test_x, test_y))
            history["eval_epoch"].append(epoch)
            test_acc = f"{history['test_acc'][-1]:.4f}"
        secs = time.time() - t0
        history["epoch_seconds"].append(secs)
        save_checkpoint(path, ckpt | {"epoch": epoch})  # weights, optimizer, RNGs, history
        progress(f"seed {seed} epoch", epoch, args.epochs, secs,
                 f"loss {history['train_loss'][-1]:.4f} | test acc {test_acc} | "
                 f"{secs:.1f} s/epoch | {n / secs:.0f} img/s")
    return history


# ----------------------------------------------------------------------------- outputs
def write_accuracies(path, accs, what, **extra):
    """Test accuracies (name -> accuracy), their mean and sample std (0 for one) into a JSON
    file with `extra`, and the line that says them."""
    values = torch.tensor(list(accs.values()), dtype=torch.float64)
    mean, std = values.mean().item(), values.std().item() if len(values) > 1 else 0.0
    print(f"mean ± std over {len(accs)} {what}: {mean:.4f} ± {std:.4f}")
    write_json(path, {**extra, "test_acc": accs, "mean": mean, "std": std})


def plot_training_curves(histories, path):
    """The training loss and the test accuracy of every seed, by epoch."""
    loss = {f"seed {s}": (range(1, len(h["train_loss"]) + 1), h["train_loss"])
            for s, h in histories.items()}
    acc = {f"seed {s}": (h["eval_epoch"], h["test_acc"]) for s, h in histories.items()}
    plot_lines(path, [("training loss", "epoch", "train cross-entropy", loss),
                      ("test accuracy", "epoch", "test accuracy", acc)])


def evaluate_checkpoints(args, device):
    """--evaluate: test accuracy of each checkpoint on the --data test split."""
    test_x, test_y, classes = load_split(args.data, args.data_root, "test")
    test_x, test_y = as_cifar_images(test_x).to(device), test_y.to(device)
    accs = {}
    for path in args.evaluate:
        state = read_checkpoint(path)["model"]
        model = PaperCNN(len(classes)).to(device)
        if {k: v.shape for k, v in state.items()} != \
                {k: v.shape for k, v in model.state_dict().items()}:
            raise UserError(f"{path} is not the paper's CNN with {len(classes)} classes (the "
                            f"class folders of {args.data}'s test split)")
        model.load_state_dict(state)
        accs[path] = evaluate(model, test_x, test_y)
        print(f"{path}: test accuracy {accs[path]:.4f} on {len(test_x)} images of {args.data}")
    os.makedirs(args.out, exist_ok=True)
    write_accuracies(os.path.join(args.out, "evaluation.json"), accs, "checkpoints",
                     data=args.data, images=len(test_x))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args)  # --threads, then --device
    warn_if_bf16_is_slow(args.precision, device)
    if args.evaluate:
        return evaluate_checkpoints(args, device)
    data = load_pretraining_data(args, device)
    os.makedirs(args.out, exist_ok=True)
    histories = {}
    for seed in args.seeds:
        histories[seed] = train(seed, args, data, device)
        plot_training_curves(histories, os.path.join(args.out, "training_curves.png"))
    finals = {str(s): h["test_acc"][-1] for s, h in histories.items()}
    print("\nseed | final test acc")
    for s, a in finals.items():
        print(f"{s:>4} | {a:.4f}")
    best = {str(s): max(h["test_acc"]) for s, h in histories.items()}
    write_accuracies(os.path.join(args.out, "summary.json"), finals, "seeds",
                     dataset=args.data, epochs=args.epochs, best_test_acc=best)


# ----------------------------------------------------------------------------- data
def load_pretraining_data(args, device):
    """(train_x, train_y, test_x, test_y, classes), the whole dataset on the device as uint8
    [N, 3, 32, 32] (CIFAR: 150 MB), so no data loader is needed."""
    t0 = time.time()
    data, classes = [], {}
    for split, limit in (("train", args.train_limit), ("test", args.test_limit)):
        images, labels, classes[split] = load_split(args.data, args.data_root, split)
        if limit:  # a fixed random subset (the same for every seed), in a random order
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
            images, labels = images[keep[:limit]], labels[keep[:limit]]
        data += [as_cifar_images(images), labels]
    if classes["test"] != classes["train"]:
        raise UserError(f"train and test class folders differ: {classes['train']} vs "
                        f"{classes['test']}")
    print(f"data: {args.data} | {len(data[0])} train / {len(data[2])} test images | "
          f"{len(classes['train'])} classes | loaded in {time.time() - t0:.1f} s | device {device}")
    return (*(t.to(device) for t in data), classes["train"])


# ----------------------- shared: the same text in train_small.py and train_advreg.py (tested)
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


# ------------------------------------- shared: reading a checkpoint of the paper's CNN (tested)
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
