"""Stage 2 — collect the kernels of the pretrained CNNs into banks of "real" kernels.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the kernel bank and
Figure 3. Every (out, in) slice of a convolution weight [out, in, k, k] is one k x k kernel, so
five pretrained models give 5 * 64 * 3 = 960 kernels of 7x7 (conv1) and 5 * 128 * 64 = 40,960 of
5x5 (conv2). These banks are the "real" data that stage 4's discriminator learns to tell from the
classifier's own kernels.

Run (after pretrain.py, or on the authors' five published CIFAR-100 models):
    python collect_kernels.py --checkpoints checkpoints/ --layers conv1 conv2 --out kernels/
    python collect_kernels.py --checkpoints ~/models --out kernels/authors
Compare trained models with a bank (after stages 3-4): one table row per configuration (mean ±
std over its seeds), side-by-side kernel grids and a PCA scatter of the kernels:
    python collect_kernels.py --compare runs/advreg/*/model.pt runs/small_amp0.5/seed*/model.pt \
        --bank kernels/conv1_7x7.pt --out kernels/compare

Kernel metrics (a number for "the kernels have patterns", which the paper only shows as pictures):
  * Frechet distance: every kernel is standardized (zero mean, unit std over its k*k pixels), a
    Gaussian is fitted to each set in the k*k-dimensional space, and the Frechet distance between
    the two Gaussians is reported. Lower = closer to the bank's distribution of shapes.
  * Low-frequency share: the share of a kernel's energy (its mean removed) at spatial frequencies
    of radius <= 0.25 cycles/pixel, averaged over kernels. White noise scores about 1/6.
The bank's own reference: each source model's kernels against all the other sources' kernels.

Reads:  checkpoints written by pretrain.py or the authors' model1_seed*.pt (with --compare: by
        train_small.py / train_advreg.py).
Writes: <out>/<layer>_<k>x<k>.pt — dict with "kernels" [N, k, k] and provenance (layer,
        kernel_size, sources, source_counts, seeds, test_acc, dataset, format);
        <out>/<layer>_<k>x<k>_grid.png (Figure 3). With --compare: <out>/compare.csv (one row
        per checkpoint), compare.md (one row per configuration), compare.png (kernel grids),
        compare_pca.png, compare_metrics.png (accuracy and kernel metrics per configuration).
"""
import argparse
import csv
import glob
import io
import math
import os
import pathlib

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchvision

ARCH = "PaperCNN"
# The paper's CNN: layer name -> weight shape [out, in, k, k] (see pretrain.py).
CONV_SHAPES = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 5, 5), "conv3": (128, 128, 5, 5),
               "conv4": (256, 128, 3, 3)}
LOG_COLUMNS = ("cls_loss", "reg_loss", "disc_loss", "d_real", "d_fake")  # train_advreg.py's log


# ----------------------------------------------------------------------------- args
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 2: collect conv kernels of pretrained CNNs into banks (and Figure 3); "
                    "or, with --compare, measure trained models' kernels against a bank.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder of checkpoints (all *.pt in it) or a glob such as 'ckpts/seed*.pt'"
                        "; pretrain.py's or the authors' model1_seed*.pt")
    p.add_argument("--layers", nargs="+", default=["conv1", "conv2"],
                   help=f"layers to collect, one bank each (paper text: conv1 7x7 and conv2 5x5); "
                        f"allowed: {', '.join(CONV_SHAPES)}")
    p.add_argument("--out", default="kernels", help="output folder")
    p.add_argument("--grid-kernels", type=int, default=64, help="kernels shown in each figure grid")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random sample of kernels shown in the figures")
    p.add_argument("--compare", nargs="+", metavar="CKPT", default=None,
                   help="instead of collecting: checkpoints of trained models to compare with "
                        "--bank")
    p.add_argument("--bank", default="kernels/conv1_7x7.pt", help="bank used by --compare")
    args = p.parse_args(argv)
    unknown = [layer for layer in args.layers if layer not in CONV_SHAPES]
    if unknown:
        p.error(f"unknown layer(s) {unknown}; the paper's CNN has {', '.join(CONV_SHAPES)}")
    if args.grid_kernels < 1:
        p.error("--grid-kernels must be >= 1")
    return args


# ----------------------------------------------------------------------------- kernel metrics
def standardize_kernels(kernels):
    """[N, k, k] -> [N, k*k] float64, each kernel with zero mean and unit std: shape, not scale."""
    flat = kernels.reshape(len(kernels), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to the rows of a [N, d] and b [M, d].

    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), with tr (C_a C_b)^(1/2) computed as the
    sum of square roots of the eigenvalues of the symmetric matrix C_a^(1/2) C_b C_a^(1/2).
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return (mean_term + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def low_freq_share(kernels, cutoff=0.25):
    """Mean share of each kernel's energy (mean removed) at spatial frequencies of radius <= cutoff
    cycles/pixel. White noise scores about 1/6; smooth, patterned kernels score high."""
    k = kernels.shape[-1]
    centered = kernels.double() - kernels.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centered).abs() ** 2
    freq = torch.fft.fftfreq(k, dtype=torch.float64)
    low = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt() <= cutoff
    return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)).mean().item()


def bank_reference(bank):
    """The bank's own Frechet distance: each source model's kernels against the other sources'
    (mean over sources); None for a bank of one source."""
    kernels, counts = bank["kernels"], bank.get("source_counts") or [len(bank["kernels"])]
    if len(counts) < 2:
        return None
    parts = torch.split(kernels, counts)
    distances = [frechet_distance(standardize_kernels(part),
                                  standardize_kernels(torch.cat(parts[:i] + parts[i + 1:])))
                 for i, part in enumerate(parts)]
    return sum(distances) / len(distances)


# ----------------------------------------------------------------------------- checkpoints, banks
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


def find_checkpoints(spec):
    pattern = os.path.join(spec, "*.pt") if os.path.isdir(spec) else spec
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"error: no checkpoints match {spec!r}; run pretrain.py first (it writes "
                         f"checkpoints/seed<N>.pt), or pass --checkpoints DIR_OR_GLOB")
    return paths


def load_checkpoint(path, layers):
    """A checkpoint's dict, after checking it holds the paper's CNN with the layers asked for."""
    ckpt = read_checkpoint(path)
    for layer in layers:
        weight = ckpt["model"].get(f"{layer}.weight")
        if weight is None or tuple(weight.shape) != CONV_SHAPES[layer]:
            got = None if weight is None else tuple(weight.shape)
            raise SystemExit(f"error: {path!r} has another architecture: {layer}.weight is {got},"
                             f" expected {CONV_SHAPES[layer]}")
    return ckpt


def kernels_of(weight):
    """Every (out, in) slice of a conv weight as one kernel: [out, in, k, k] -> [out*in, k, k]."""
    return weight.reshape(-1, weight.shape[-2], weight.shape[-1])


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
    return dict(bank, kernels=bank["kernels"].float())


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


def save_figure(fig, path):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def kernel_grid(kernels, nrow=8, scale=8):
    """[N, k, k] -> image [3, H, W] of the kernels, each scaled to its own range, enlarged."""
    big = F.interpolate(kernels[:, None].float(), scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(big, nrow=nrow, padding=scale // 2, normalize=True,
                                       scale_each=True, pad_value=1.0)


def save_kernel_grid(kernels, path, nrow=16):
    write_atomic(path, lambda tmp: torchvision.utils.save_image(kernel_grid(kernels, nrow), tmp))


def random_sample(kernels, count, seed):
    g = torch.Generator().manual_seed(seed)
    return kernels[torch.randperm(len(kernels), generator=g)[:count]]


def write_csv(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


# ----------------------------------------------------------------------------- collect
def collect(args):
    paths = find_checkpoints(args.checkpoints)
    ckpts = [load_checkpoint(p, args.layers) for p in paths]  # every check before any write
    histories = [c.get("history", {}) for c in ckpts]
    test_accs = [h["test_acc"][-1] if h.get("test_acc") else None for h in histories]
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(paths)} checkpoints: {', '.join(os.path.basename(p) for p in paths)}")
    print(f"{'layer':6} {'bank':>14} {'mean':>8} {'std':>7} {'|kernel|':>9} {'low-freq':>9}")
    for layer in args.layers:
        per_source = [kernels_of(c["model"][f"{layer}.weight"].float()) for c in ckpts]
        kernels = torch.cat(per_source)
        name = f"{layer}_{kernels.shape[-1]}x{kernels.shape[-1]}"
        bank = {"kernels": kernels, "layer": layer, "kernel_size": kernels.shape[-1],
                "sources": [os.path.abspath(p) for p in paths],
                "source_counts": [len(s) for s in per_source],
                "seeds": [c.get("seed") for c in ckpts], "test_acc": test_accs,
                "dataset": ckpts[0].get("dataset"), "arch": ARCH,
                "format": ckpts[0].get("format", "pretrain.py")}
        write_atomic(os.path.join(args.out, name + ".pt"), lambda tmp: torch.save(bank, tmp))
        save_kernel_grid(random_sample(kernels, args.grid_kernels, args.seed),
                         os.path.join(args.out, name + "_grid.png"), nrow=8)
        print(f"{layer:6} {str(list(kernels.shape)):>14} {kernels.mean().item():8.4f} "
              f"{kernels.std().item():7.4f} {kernels.flatten(1).norm(dim=1).mean().item():9.4f} "
              f"{low_freq_share(kernels):9.3f}")
    print(f"wrote {', '.join(f'{args.out}/{layer}_*.pt' for layer in args.layers)} and the "
          f"Figure 3 grids (*_grid.png)")


# ----------------------------------------------------------------------------- compare
def configuration(ckpt):
    """The training configuration a checkpoint comes from: (its table row's name, a key that
    orders the rows: baseline, lam ascending, AMP, pretrained; bank-initialized runs last)."""
    run_args = ckpt.get("args", {})
    bank_init = ckpt["bank_init"] if "lam" in ckpt else bool(run_args.get("init_bank"))
    if "lam" in ckpt:  # train_advreg.py (its --init-bank adds runs; each knows its own init)
        name = "baseline (λ = 0)" if ckpt["lam"] == 0 else f"λ = {ckpt['lam']:g}"
        key = (0, ckpt["lam"])
    elif run_args.get("amp_epsilon") is not None:  # train_small.py with AMP
        name, key = f"AMP ε = {run_args['amp_epsilon']:g}", (1, run_args["amp_epsilon"])
    elif "amp_epsilon" in run_args or "per_class" in run_args:  # train_small.py
        name, key = "baseline (λ = 0)", (0, 0.0)
    else:
        name, key = f"pretrained ({ckpt.get('dataset')})", (2, 0.0)
    return name + (", conv1 from bank" if bank_init else ""), (bank_init, *key)


def epochs_done(ckpt):
    return ckpt.get("epoch", ckpt.get("history", {}).get("epoch_done", 0))


def epochs_asked(ckpt):
    return ckpt.get("args", {}).get("epochs", 0)


def checkpoint_row(path, ckpt, layer, bank_std):
    """Metrics of one trained model's kernels (and its accuracy and D outputs, where logged)."""
    kernels = kernels_of(ckpt["model"][f"{layer}.weight"].float())
    history = ckpt.get("history", {})
    row = {"model": path, "configuration": configuration(ckpt)[0], "kernels": len(kernels),
           "final_test_acc": history["test_acc"][-1] if history.get("test_acc") else None,
           "best_test_acc": max(history["test_acc"]) if history.get("test_acc") else None,
           "frechet_to_bank": frechet_distance(standardize_kernels(kernels), bank_std),
           "low_freq_share": low_freq_share(kernels), "kernel_std": kernels.std().item()}
    log = ckpt.get("log")
    for name in ("d_real", "d_fake"):  # mean over the last 10% of iterations
        column = log[-max(1, len(log) // 10):, LOG_COLUMNS.index(name)] if log is not None else None
        value = None if column is None else column.mean().item()
        row[name] = None if value is None or math.isnan(value) else value
    return row, kernels


METRICS = ["final_test_acc", "best_test_acc", "frechet_to_bank", "low_freq_share", "kernel_std",
           "d_real", "d_fake"]


def group_stats(rows):
    """{configuration: (runs, {metric: (mean, std)})} over the runs of each configuration."""
    groups = {}
    for config in dict.fromkeys(r["configuration"] for r in rows):
        group = [r for r in rows if r["configuration"] == config]
        stats = {}
        for m in METRICS:
            values = torch.tensor([r[m] for r in group if r[m] is not None], dtype=torch.float64)
            std = values.std().item() if len(values) > 1 else 0.0
            stats[m] = (values.mean().item(), std) if len(values) else None
        groups[config] = (len(group), stats)
    return groups


def grouped_table(groups, bank_row, args):
    """compare.md: one row per configuration, mean ± std over its checkpoints."""
    lines = ["| configuration | runs | final acc | best acc | Frechet to bank | low-freq share | "
             "kernel std | D(real) | D(fake) |", "|---" * 9 + "|"]
    for config, (runs, stats) in groups.items():
        cells = [f"{stats[m][0]:.3f} ± {stats[m][1]:.3f}" if stats[m] else "-" for m in METRICS]
        lines.append(f"| {config} | {runs} | " + " | ".join(cells) + " |")
    bank_cells = [f"{bank_row[m]:.3f}" if bank_row.get(m) is not None else "-" for m in METRICS]
    lines.append(f"| {bank_row['model']} | | " + " | ".join(bank_cells) + " |")
    k = bank_row["kernel_size"]
    return (f"Kernels of {bank_row['layer']} ({k}x{k}) against bank {args.bank}; mean ± std over "
            f"the runs of each configuration; D outputs over the last 10% of iterations.\n\n"
            + "\n".join(lines) + "\n")


def plot_metrics(groups, bank_row, path):
    """compare_metrics.png: accuracy and the two kernel metrics per configuration (mean ± std),
    the bank's own values as dashed lines."""
    panels = [("final_test_acc", "final test accuracy"), ("frechet_to_bank", "Frechet to bank"),
              ("low_freq_share", "low-frequency share")]
    fig, axes = plt.subplots(1, 3, figsize=(4 * 3, 3.8))
    for ax, (metric, title) in zip(axes, panels):
        shown = [(c, stats[metric]) for c, (_, stats) in groups.items() if stats[metric]]
        ax.errorbar(range(len(shown)), [v[0] for _, v in shown], yerr=[v[1] for _, v in shown],
                    fmt="o", capsize=3)
        ax.set_xticks(range(len(shown)), [c for c, _ in shown], rotation=30, ha="right",
                      fontsize=8)
        if bank_row.get(metric) is not None:
            ax.axhline(bank_row[metric], color="gray", ls="--", lw=0.8, label="bank")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_pca(panels, path):
    """The kernels in the plane of the bank's two main directions of variation (PCA of the
    standardized bank kernels): one panel per configuration, over the bank's kernels in grey."""
    bank_std = standardize_kernels(panels[0][1])
    mean = bank_std.mean(0)
    _, _, v = torch.linalg.svd(bank_std - mean, full_matrices=False)
    bank_xy = (bank_std - mean) @ v[:2].T
    fig, axes = plt.subplots(1, len(panels) - 1, figsize=(3.4 * (len(panels) - 1), 3.6),
                             squeeze=False, sharex=True, sharey=True)
    for ax, (title, kernels) in zip(axes[0], panels[1:]):
        xy = (standardize_kernels(kernels) - mean) @ v[:2].T
        ax.scatter(bank_xy[:, 0], bank_xy[:, 1], s=5, color="0.75", label=panels[0][0])
        ax.scatter(xy[:, 0], xy[:, 1], s=7, color="tab:red", label=title)
        ax.set(xlabel="PC 1 of the bank's standardized kernels", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("PC 2")
    axes[0][0].legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


def compare(args):
    bank = load_bank(args.bank)
    layer, bank_kernels = bank["layer"], bank["kernels"]
    finished = []
    for path in args.compare:
        ckpt = load_checkpoint(path, [layer])
        if epochs_done(ckpt) < epochs_asked(ckpt):  # a run still training, or stopped
            print(f"left out: {path} is unfinished (epoch {epochs_done(ckpt)} of "
                  f"{epochs_asked(ckpt)})")
        else:
            finished.append((path, ckpt))
    if not finished:
        raise SystemExit("error: none of the --compare checkpoints is a finished run")
    finished.sort(key=lambda path_ckpt: configuration(path_ckpt[1])[1])
    bank_std = standardize_kernels(bank_kernels)
    rows, panels = [], [(f"bank ({len(bank_kernels)} kernels)", bank_kernels)]
    for path, ckpt in finished:
        row, kernels = checkpoint_row(path, ckpt, layer, bank_std)
        if row["configuration"] not in [title for title, _ in panels]:  # its first run is shown
            panels.append((row["configuration"], kernels))
        rows.append(row)
    bank_row = {"model": f"bank ({len(bank.get('source_counts', [1]))} sources)", "layer": layer,
                "kernel_size": bank_kernels.shape[-1], "frechet_to_bank": bank_reference(bank),
                "low_freq_share": low_freq_share(bank_kernels),
                "kernel_std": bank_kernels.std().item()}

    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "compare.csv"), rows)
    groups = group_stats(rows)
    text = grouped_table(groups, bank_row, args)
    write_text(os.path.join(args.out, "compare.md"), text)
    print(text)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, kernels) in zip(axes[0], panels):
        grid = kernel_grid(random_sample(kernels, args.grid_kernels, args.seed))
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    save_figure(fig, os.path.join(args.out, "compare.png"))
    plot_pca(panels, os.path.join(args.out, "compare_pca.png"))
    plot_metrics(groups, bank_row, os.path.join(args.out, "compare_metrics.png"))
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png, compare_pca.png, "
          f"compare_metrics.png")


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        compare(args)
    else:
        collect(args)


if __name__ == "__main__":
    main()
