"""Stage 2: collect the kernels of the pretrained CNNs into banks of "real" kernels; compare.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the kernel bank and
Figure 3: every (out, in) slice of a conv weight [out, in, k, k] is one k x k kernel, so five
pretrained models give 5 * 64 * 3 = 960 kernels of 7x7 (conv1) and 5 * 128 * 64 = 40,960 of 5x5
(conv2): the "real" data that stage 4's discriminator learns to tell from the classifier's own.
With --compare, trained models' kernels are measured against a bank (Frechet distance, low-frequency
share and near-zero kernels: numbers for what the paper shows as pictures), a table row per
configuration. Three parts: 1. collecting the banks; 2. comparing runs (the kernel metrics, the
tables, the paired intervals); 3. the microscope (attacks, saliency maps, class visualization).

The paper's setting (after pretrain.py), and the authors' five published CIFAR-100 models:
    python collect_kernels.py --checkpoints checkpoints/ --layers conv1 conv2 --out kernels/
    python collect_kernels.py --checkpoints ~/models --out kernels/authors
A quick CPU run (after pretrain.py --data PATH --quick --seeds 0 1 --out checkpoints/quick):
    python collect_kernels.py --checkpoints checkpoints/quick --out kernels/quick
After stages 3-4, the table (mean ± std over the seeds of each configuration):
    python collect_kernels.py --compare runs/advreg/*/model.pt runs/small/seed*/model.pt \
        --bank kernels/conv1_7x7.pt --out kernels/compare
The microscope (seed 003's lab 2-b: attacks, saliency maps, class visualization): add to it
        --test-data cifar10 --attack-images 200

Reads:  checkpoints of the paper's CNN (pretrain.py's or the authors' model1_seed*.pt; with
        --compare, train_small.py's and train_advreg.py's) and, with --compare, a bank.
Writes: <out>/<layer>_<k>x<k>.pt ("kernels" [N, k, k] and provenance: layer, kernel_size, sources,
        source_counts, seeds, test_acc, dataset, arch, format), <out>/<layer>_<k>x<k>_grid.png
        (Figure 3); with --compare, compare.csv (a row per checkpoint), compare.md (a row per
        configuration), compare_paired.csv/.md, compare.png, compare_pca.png,
        compare_metrics.png, compare_ladder.png, compare_subsets.png; with --test-data,
        microscope.csv (accuracy under FGSM / PGD, a row per run), microscope.md (a row per
        configuration), microscope_paired.csv/.md, microscope_saliency.png, microscope_classes.png.
Results: docs/collect_kernels.md; the longer story of each flag's default: docs/defaults.md.
"""
import argparse, csv, functools, glob, hashlib, io, math, os, pathlib, sys

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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.register("type", None, os.path.expanduser)  # a string flag (a path): ~ expanded
    add = p.add_argument  # the source of each default in (...); the why: docs/defaults.md
    add("--checkpoints", default="checkpoints", help="folder of *.pt, or a glob: banks (ours)")
    add("--layers", nargs="+", default=["conv1", "conv2"], help="one bank each (paper)")
    add("--out", default="kernels", help="output folder (ours)")
    add("--grid-kernels", type=int, default=64, help="kernels in a figure grid (ours)")
    add("--seed", type=int, default=0, help="seed of the kernels shown (ours)")
    add("--compare", nargs="+", metavar="CKPT", help="trained runs: the kernel metrics' tables")
    add("--bank", default="kernels/conv1_7x7.pt", help="bank of --compare (ours)")
    add("--test-data", help="the microscope: FGSM / PGD accuracy, saliency maps, class images")
    add("--data-root", default="data", help="where torchvision downloads (ours)")
    add("--attack-images", type=int, default=200, help="test images per run (ours)")
    add("--epsilons", type=float, nargs="+", default=[1, 2, 4], help="radii /255 (ours)")
    add("--pgd-steps", type=int, default=10, help="of 2.5 eps / steps (Madry et al.)")
    args = p.parse_args(argv)
    unknown = [layer for layer in args.layers if layer not in CONV_SHAPES]
    missing = [path for path in args.compare or [] if not os.path.isfile(path)]
    for failed, message in [
        (missing, f"--compare {' '.join(missing)}: no such file (a pattern that matched none?)"),
        (unknown, f"unknown layer(s) {unknown}; the paper's CNN has {', '.join(CONV_SHAPES)}"),
        (args.grid_kernels < 1, "--grid-kernels must be >= 1"),
        (args.test_data and not args.compare, "--test-data is for --compare (trained runs)"),
        (min(args.attack_images, args.pgd_steps) < 1, "--attack-images, --pgd-steps must be >= 1"),
        (any(not eps >= 0 for eps in args.epsilons), f"--epsilons must be >= 0: {args.epsilons}"),
    ]:
        if failed:
            p.error(message)
    return args


# ============================================================================= 1. the banks
# Collecting the banks: every kernel of a layer in every pretrained model, with where it came from.
def kernels_of(weight):
    """Every (out, in) slice of a conv weight as one kernel: [out, in, k, k] -> [out*in, k, k]."""
    return weight.reshape(-1, weight.shape[-2], weight.shape[-1])


def collect(args):
    """One bank per layer: every kernel of that layer in every checkpoint (all *.pt of a folder,
    or a glob), with provenance."""
    spec = args.checkpoints
    paths = sorted(glob.glob(os.path.join(spec, "*.pt") if os.path.isdir(spec) else spec))
    if not paths:
        raise UserError(f"no checkpoints match {spec!r}; run pretrain.py first (it writes "
                        f"checkpoints/seed<N>.pt), or pass --checkpoints DIR_OR_GLOB")
    ckpts = [read_cnn_checkpoint(p, args.layers) for p in paths]  # every check before any write
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(paths)} checkpoints: {', '.join(os.path.basename(p) for p in paths)}")
    print(f"{'layer':6} {'bank':>14} {'mean':>8} {'std':>7} {'|kernel|':>9} {'low-freq':>9}")
    for layer in args.layers:
        per_source = [kernels_of(c["model"][f"{layer}.weight"].float()) for c in ckpts]
        kernels = torch.cat(per_source)
        name = os.path.join(args.out, f"{layer}_{kernels.shape[-1]}x{kernels.shape[-1]}")
        bank = {"kernels": kernels, "layer": layer, "kernel_size": kernels.shape[-1],
                "sources": [os.path.abspath(p) for p in paths],
                "source_sha256": [file_sha256(p) for p in paths],  # matched to --init-from's
                "source_counts": [len(s) for s in per_source],
                "seeds": [c.get("seed") for c in ckpts],
                "test_acc": [last(c.get("history", {}), "test_acc") for c in ckpts],
                "dataset": ckpts[0].get("dataset"), "arch": ARCH,
                "format": "authors" if ckpts[0].get("format") == "authors" else "pretrain.py"}
        write_atomic(name + ".pt", lambda tmp: torch.save(bank, tmp))
        shown = random_sample(kernels, args.grid_kernels, args.seed)  # Figure 3
        save_grid(name + "_grid.png", shown[:, None], nrow=8, scale=8)
        print(f"{layer:6} {str(list(kernels.shape)):>14} {kernels.mean().item():8.4f} "
              f"{kernels.std().item():7.4f} {kernels.flatten(1).norm(dim=1).mean().item():9.4f} "
              f"{low_freq_share(kernels):9.3f}")
    print(f"wrote {args.out}/: a bank (*.pt) and a Figure 3 grid (*_grid.png) per layer")


def file_sha256(path):
    """The file's SHA-256: which checkpoint a run started from, matched to a bank's sources."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def random_sample(kernels, count, seed):
    g = torch.Generator().manual_seed(seed)
    return kernels[torch.randperm(len(kernels), generator=g)[:count]]


def read_cnn_checkpoint(path, layers):
    """A checkpoint's dict, after checking it holds the paper's CNN with the layers asked for."""
    ckpt = read_checkpoint(path)
    for layer in layers:
        weight = ckpt["model"].get(f"{layer}.weight")
        if weight is None or tuple(weight.shape) != CONV_SHAPES[layer]:
            got = None if weight is None else tuple(weight.shape)
            raise UserError(f"{path!r} has another architecture: {layer}.weight is {got}, "
                            f"expected {CONV_SHAPES[layer]}")
    return ckpt


def last(history, key):
    """The last value of a history's list `key`, or None where the run did not log it."""
    values = history.get(key)
    return values[-1] if values else None


# ============================================================================= 2. comparing runs
# Frechet distance: every kernel is standardized (zero mean, unit std over its k*k pixels: its
# shape, not its scale), a Gaussian is fitted to each set of kernels in the k*k-dimensional space,
# and the Frechet distance between the two Gaussians is reported. Lower = closer to the bank's
# distribution of shapes. The bank's own reference: each source model against the others.
def standardize_kernels(kernels):
    """[N, k, k] -> [N, k*k] float64, each kernel with zero mean and unit std: shape, not scale."""
    flat = kernels.reshape(len(kernels), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)


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


def low_freq_share(kernels, cutoff=0.25):
    """Mean share of each kernel's energy (mean removed) at spatial frequencies of radius <= cutoff
    cycles/pixel. White noise scores about 1/6; smooth, patterned kernels score high."""
    k = kernels.shape[-1]
    centered = kernels.double() - kernels.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centered).abs() ** 2
    freq = torch.fft.fftfreq(k, dtype=torch.float64)
    low = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt() <= cutoff
    return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)).mean().item()


def near_zero_share(kernels, bank_kernels, fraction=0.1):
    """Share of kernels whose L2 norm is under `fraction` of the bank's median kernel norm: kernels
    weight decay has all but erased. The Frechet distance cannot see them (it standardizes)."""
    norms = kernels.reshape(len(kernels), -1).norm(dim=1)
    return (norms < fraction * bank_kernels.reshape(len(bank_kernels), -1).norm(dim=1).median()
            ).double().mean().item()


def bank_reference(bank):
    """The bank's own Frechet distance: each source model's kernels against the other sources'
    (mean over sources); None for a bank of one source."""
    counts = bank.get("source_counts") or [len(bank["kernels"])]
    if len(counts) < 2:
        return None
    parts = torch.split(bank["kernels"], counts)
    distances = [frechet_to_other_sources(part, bank, i) for i, part in enumerate(parts)]
    return sum(distances) / len(distances)


def frechet_to_other_sources(kernels, bank, i):
    """Frechet distance of `kernels` to the bank without the kernels of its i-th source model."""
    parts = torch.split(bank["kernels"], bank["source_counts"])
    rest = torch.cat(parts[:i] + parts[i + 1:])
    return frechet_distance(standardize_kernels(kernels), standardize_kernels(rest))


def bank_floors(bank_std, count, draws=30):
    """The Frechet distance's floors for `count` kernels: `draws` seeded random draws of that many
    (standardized) bank kernels, each against the whole bank (in-sample) and against the rest
    (out-of-sample), as (mean, std) each. A run's distance is read against them, not against 0."""
    g, inside, outside = torch.Generator().manual_seed(0), [], []
    for _ in range(draws):
        perm = torch.randperm(len(bank_std), generator=g)
        inside.append(frechet_distance(bank_std[perm[:count]], bank_std))
        outside.append(frechet_distance(bank_std[perm[:count]], bank_std[perm[count:]]))
    return mean_std(inside), mean_std(outside)


def compare(args):
    """--compare: every finished run's kernels against the bank; a table row per configuration,
    and each row's difference to the baseline and to λ = 1 over matched runs."""
    bank = load_bank(args.bank)
    if bank.get("layer") not in CONV_SHAPES:
        raise UserError(f"bank {args.bank} names no layer of the paper's CNN (as banks of "
                        f"collect_kernels.py do)")
    layer, bank_kernels = bank["layer"], bank["kernels"]
    runs = table_runs(args.compare, layer)  # (path, checkpoint, row, name), the table's order
    # the references of the paired table: the first row (in the table's order) of each name
    baseline, kernel_prior = (next((row for *_, row, n in runs if n == name), None)
                              for name in ("baseline (λ = 0)", "λ = 1"))
    seen = microscope_inputs(args, runs) if args.test_data else None  # its checks, then writing
    bank_std = standardize_kernels(bank_kernels)
    rows, panels = [], {f"bank ({len(bank_kernels)} kernels)": bank_kernels}
    for path, ckpt, label, _ in runs:
        row, kernels = checkpoint_row(path, ckpt, label, layer, bank_kernels, bank_std)
        row["frechet_without_source"] = frechet_without_source(ckpt, kernels, bank)
        panels.setdefault(label, kernels)  # the first run of each configuration is shown
        rows.append(row)
    bank_row = {"model": f"bank ({len(bank.get('source_counts', [1]))} sources)", "layer": layer,
                "kernel_size": bank_kernels.shape[-1], "frechet_to_bank": bank_reference(bank),
                "low_freq_share": low_freq_share(bank_kernels),
                "kernel_std": bank_kernels.std().item(),
                "near_zero_share": near_zero_share(bank_kernels, bank_kernels)}
    groups = group_stats(rows)
    os.makedirs(args.out, exist_ok=True)
    table = grouped_table(groups, rows, bank_row, args.bank)
    if rows[0]["kernels"] < len(bank_kernels):  # the floors of the Frechet distance
        inside, outside = bank_floors(bank_std, rows[0]["kernels"])  # per kernel: indexable
        table += (f"\nThe Fréchet distance's floors for {rows[0]['kernels']} kernels (30 draws of "
                  f"that many bank kernels): against the whole bank {mean_std_cell(inside)}, "
                  f"against the rest of it {mean_std_cell(outside)}.\n")
    tables = write_tables(args.out, "compare", rows, table,
                          *paired_table(rows, baseline, kernel_prior))
    figures = plot_compare(args, list(panels.items()), groups, rows, bank_row)
    print(f"wrote {args.out}/{', '.join([*tables, *figures])}")
    if seen:
        microscope(seen, args, baseline, kernel_prior)


def frechet_without_source(ckpt, kernels, bank):
    """A run whose layer was copied from a model in the bank (train_small.py --init-from, matched
    by the file's hash) against the bank WITHOUT that model: against the whole bank it would be
    measured against itself. None for every other run."""
    hashes, own = bank.get("source_sha256", []), ckpt.get("init_from_sha256")
    transferred = ckpt.get("args", {}).get("transfer") or []
    if bank["layer"] not in transferred or own not in hashes or len(hashes) < 2:
        return None
    return frechet_to_other_sources(kernels, bank, hashes.index(own))


def checkpoint_row(path, ckpt, configuration, layer, bank_kernels, bank_std):
    """Metrics of one trained model's kernels (and its accuracies and D outputs, where logged)."""
    kernels = kernels_of(ckpt["model"][f"{layer}.weight"].float())
    history = ckpt.get("history", {})
    row = {"model": path, "configuration": configuration, "subset": subset_of(ckpt),
           "seed": ckpt.get("seed"), "kernels": len(kernels),
           "final_test_acc": last(history, "test_acc"),
           "best_test_acc": max(history["test_acc"]) if history.get("test_acc") else None,
           "final_train_acc": last(history, "train_acc"), "final_val_acc": last(history, "val_acc"),
           "frechet_to_bank": frechet_distance(standardize_kernels(kernels), bank_std),
           "low_freq_share": low_freq_share(kernels), "kernel_std": kernels.std().item(),
           "near_zero_share": near_zero_share(kernels, bank_kernels)}
    log = ckpt.get("log", torch.full((1, len(LOG_COLUMNS)), math.nan))  # no D: no D outputs
    for name in ("d_real", "d_fake"):  # mean over the last 10% of iterations
        value = log[-max(1, len(log) // 10):, LOG_COLUMNS.index(name)].mean().item()
        row[name] = None if math.isnan(value) else value
    return row, kernels


METRICS = {  # the table's columns: a row's metric and its header
    "final_test_acc": "final acc", "best_test_acc": "best acc", "final_train_acc": "train acc",
    "final_val_acc": "val acc", "frechet_to_bank": "Frechet to bank",
    "frechet_without_source": "Frechet to bank w/o its source", "low_freq_share": "low-freq share",
    "kernel_std": "kernel std", "near_zero_share": "near-zero kernels", "d_real": "D(real)",
    "d_fake": "D(fake)"}


# The table's rows: a row per configuration, as each run's trainer named it when it saved it.
def table_runs(paths, layer):
    """[(path, checkpoint, row label, name)] of the runs that trained all their epochs (the others
    get a line), in the table's order. The name is the row its trainer stored when it saved the
    run ("label", "row_order": train_small.py, train_advreg.py, pretrain.py); the authors' models
    are pretrained models. Rows go from nothing transferred to the most: the baseline, AMP, the
    kernel prior (λ ascending, then the bank-initialized runs), the transfer runs by the layers
    transferred, frozen before trained at each, then pretrained models. Where runs of one name
    differ in a flag that defines a run (lr, weight decay, augmentation, epochs, init_from, ...),
    the name is followed by those flags' values, so that no table row mixes two configurations.
    A checkpoint of an earlier format, which stored no row, is refused."""
    runs = []
    for path in paths:
        ckpt = read_cnn_checkpoint(path, [layer])
        done = ckpt.get("epoch", ckpt.get("history", {}).get("epoch_done", 0))
        asked = (ckpt.get("args") or {}).get("epochs", 0)
        if done < asked:  # a run still training, or stopped
            print(f"left out: {path} is unfinished (epoch {done} of {asked})")
            continue
        if ckpt.get("format") not in (FORMAT, "authors"):
            raise UserError(f"{path} has checkpoint format {ckpt.get('format', 1)}, not "
                            f"{FORMAT}: it stores no row label; train it again with this version")
        authors = ckpt.get("format") == "authors"  # the authors' models: pretrained models
        name = f"pretrained ({ckpt['dataset']})" if authors else ckpt["label"]
        key = [4, 0, 0, 0.0] if authors else ckpt["row_order"]
        # the flags that define the run: its command's, but those in NOT_DEFINING. An --init-from
        # that names a run of this project (LP-FT starts from a probe's model.pt) is left out: the
        # row label says what the run started from, and the runs on several draws of the training
        # images start from the probes of as many folders.
        skip = NOT_DEFINING | ({"lam", "init_bank"} if "lam" in ckpt else set())
        flags = {k: v for k, v in (ckpt.get("args") or {}).items() if k not in skip}
        if os.path.basename(str(flags.get("init_from"))) == "model.pt":
            del flags["init_from"]
        runs.append((path, ckpt, name, key, flags))
    if not runs:
        raise UserError("none of the --compare checkpoints is a finished run")
    table = []
    for path, ckpt, name, key, own in runs:
        same_name = [flags for *_, n, _, flags in runs if n == name]
        differing = [k for k in own if all(k in f for f in same_name)
                     and any(f[k] != own[k] for f in same_name)]
        label = ", ".join([name] + [flag_text(k, own[k]) for k in differing])
        table.append(((*key, label), (path, ckpt, label, name)))
    return [run for _, run in sorted(table, key=lambda t: t[0])]


# Flags that do not define a run: two runs that differ only in these share a table row.
NOT_DEFINING = {"seeds", "seed", "threads", "device", "out", "log_every", "eval_every",
                "data_root", "gif_every", "val_size", "quick", "evaluate", "subset_seed"}


def flag_text(name, value):
    """A flag's value in a table label: "lr 0.01", "weight decay 0.0001", "no augmentation"."""
    if name == "no_augment":
        return "no augmentation" if value else "augmentation"
    values = value if isinstance(value, (list, tuple)) else [value]
    text = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return f"{name.replace('_', ' ')} {'none' if value is None else text}"


# The grouped table and the paired differences.
def group_stats(rows, metrics=METRICS):
    """{configuration: (runs, {metric: (mean, std) or None})} over the runs of each configuration,
    in the rows' order; a metric no run of the configuration logged is None."""
    groups = {}
    for config in dict.fromkeys(r["configuration"] for r in rows):
        group = [r for r in rows if r["configuration"] == config]
        values = {m: [r[m] for r in group if r[m] is not None] for m in metrics}
        groups[config] = (len(group), {m: mean_std(v) if v else None for m, v in values.items()})
    return groups


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.std().item() if len(values) > 1 else 0.0


def subset_of(ckpt):
    """The seed that drew a run's training images (--subset-seed; runs saved before the flag
    existed drew with 0); None for a model that was not trained on a drawn subset."""
    run_args = ckpt.get("args") or {}
    return run_args.get("subset_seed", 0) if "per_class" in run_args else None  # None: pretrained


def grouped_table(groups, rows, bank_row, bank_path):
    """compare.md: one row per configuration, mean ± std over its checkpoints, pooled over the
    draws of the training images (subsets) and the seeds it holds, both counted beside it so that
    a ± over several draws is never mistaken for one over seeds; "-" where no run has the value;
    the val acc column only when some run has a validation split."""
    metrics = [m for m in METRICS if m not in ("final_val_acc", "frechet_without_source")
               or any(stats[m] for _, stats in groups.values())]
    lines = []
    for config, (runs, stats) in groups.items():
        group = [r for r in rows if r["configuration"] == config]
        lines.append([config, runs, len({r["subset"] for r in group}),
                      len({r["seed"] for r in group})] + [mean_std_cell(stats[m]) for m in metrics])
    lines.append([bank_row["model"], "", "", ""] + [
        "-" if bank_row.get(m) is None else f"{bank_row[m]:.3f}" for m in metrics])
    header = ["configuration", "runs", "subsets", "seeds"] + [METRICS[m] for m in metrics]
    k = bank_row["kernel_size"]
    return (f"Kernels of {bank_row['layer']} ({k}x{k}) against bank {bank_path}; mean ± std over "
            f"the runs of each configuration (subsets: draws of the training images, --subset-seed;"
            f" seeds: initialization seeds); train acc on the training images at the last "
            f"evaluation; D outputs over the last 10% of iterations.\n\n" + md_table(header, lines))


def mean_std_cell(stat):
    return "-" if stat is None else f"{stat[0]:.3f} ± {stat[1]:.3f}"


def md_table(header, rows, rule=None):
    """A markdown table: the header's cells, the rule under it (default: every column
    left-aligned), then each row's cells."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], rule or "|---" * len(header) + "|", *lines[1:]]) + "\n"


def t_quantile(p, df):
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: bisection on its
    CDF, whose density is integrated by Simpson's rule (no statistics package needed)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x, n=2000):  # 0.5 + the integral of the density from 0 to x, n (even) intervals
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    hi = 1.0
    while cdf(hi) < p:
        hi *= 2
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(rows, config, reference, metric="final_test_acc"):
    """The difference config - reference over the runs they share a (subset, seed) with: its
    mean, a 95 % t interval and the pairs and subsets it rests on. The seeds of one draw of the
    training images are not independent of each other, so the interval is over the draws: the
    pairs of each subset are averaged, then t over the subsets' means (df = subsets - 1). A row
    on one draw only gets the t interval over its pairs (df = pairs - 1), marked "one draw"."""
    def by_run(name):
        return {(r["subset"], r["seed"]): r[metric] for r in rows
                if r["configuration"] == name and r[metric] is not None}
    ours, theirs = by_run(config), by_run(reference)
    pairs = {key: ours[key] - theirs[key] for key in ours if key in theirs}
    by_subset = {}
    for (subset, _), d in sorted(pairs.items()):
        by_subset.setdefault(subset, []).append(d)
    per_subset = [sum(ds) / len(ds) for ds in by_subset.values()]
    values = per_subset if len(per_subset) > 1 else list(pairs.values())
    result = {"configuration": config, "against": reference, "pairs": len(pairs),
              "subsets": len(per_subset), "mean": None, "ci_low": None, "ci_high": None,
              "interval": "t over subsets" if len(per_subset) > 1 else "t over pairs, one draw"}
    if len(values) > 1:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
        result.update(mean=mean, ci_low=mean - half, ci_high=mean + half)
    elif values:
        result.update(mean=values[0], interval="one pair: no interval")
    return result


def reference_pairs(rows, baseline, kernel_prior):
    """The (row, reference) pairs of the paired tables: every row against the baseline, every
    other row against the kernel prior (λ = 1, the paper's); a reference that no run has is left
    out."""
    configs = list(dict.fromkeys(r["configuration"] for r in rows))
    pairs = [(c, baseline) for c in configs if baseline in configs and c != baseline]
    return pairs + [(c, kernel_prior) for c in configs
                    if kernel_prior in configs and c not in (baseline, kernel_prior)]


def paired_cells(d):
    """One paired difference as compare_paired.md's cells: the mean, its 95 % interval and
    whether it shows a difference ("not shown": the interval holds 0); "-" where there are no
    pairs, no interval for one pair."""
    if d["mean"] is None or d["ci_low"] is None:
        return ["-" if d["mean"] is None else f"{d['mean']:+.3f}", "-", ""]
    reading = "not shown" if d["ci_low"] <= 0 <= d["ci_high"] else "shown"
    return [f"{d['mean']:+.3f}", f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", reading]


def paired_table(rows, baseline, kernel_prior):
    """compare_paired.csv/.md: every row against the baseline and every other row against the
    kernel prior, over matched (subset, seed) pairs (reference_pairs)."""
    results = [paired_difference(rows, c, reference)
               for c, reference in reference_pairs(rows, baseline, kernel_prior)]
    header = ["configuration", "against", "pairs", "subsets", "difference", "95 % interval",
              "reading"]
    lines = [[r["configuration"], r["against"], r["pairs"], r["subsets"], *paired_cells(r)]
             for r in results]
    return results, ("Final test accuracy, row minus reference, over the (subset, seed) pairs "
                     "both have; 95 % interval: the pairs of each draw of the training images "
                     "averaged, then a t interval over the draws (one draw only: t over its "
                     "pairs); \"not shown\": the interval holds 0.\n\n"
                     + md_table(header, lines, "|---|---|---:|---:|---:|---|---|"))


def write_tables(folder, stem, rows, table, paired, paired_text):
    """<stem>.csv (a row per run), <stem>.md (a row per configuration, also on the screen),
    <stem>_paired.csv and <stem>_paired.md (also on the screen) into folder; returns their
    names."""
    write_csv(os.path.join(folder, f"{stem}.csv"), rows)
    write_csv(os.path.join(folder, f"{stem}_paired.csv"), paired)
    for name, text in ((f"{stem}.md", table), (f"{stem}_paired.md", paired_text)):
        write_atomic(os.path.join(folder, name), lambda tmp: pathlib.Path(tmp).write_text(text))
        print(text)
    return [f"{stem}.csv", f"{stem}.md", f"{stem}_paired.csv", f"{stem}_paired.md"]


def plot_compare(args, panels, groups, rows, bank_row):
    """The table as figures, x = the rows in its order (from nothing transferred, through the
    kernel prior, to more and more of a pretrained network): compare.png (--grid-kernels kernels
    of the bank, then of each configuration's first run, 6 a row), compare_pca.png,
    compare_metrics.png (accuracy and the two kernel metrics, the bank's own values as a line),
    compare_ladder.png (final test accuracy, the kernel-prior rows again as a curve of their
    own: a discriminator, or conv1 from the bank) and compare_subsets.png (each draw of the
    training images, the mean over its seeds: does the order of the rows hold from draw to
    draw?). Returns the files' names."""
    out = functools.partial(os.path.join, args.out)
    count = min([args.grid_kernels] + [len(kernels) for _, kernels in panels])
    grids = [torchvision.utils.make_grid(random_sample(kernels, count, args.seed)[:, None], 8, 1,
                                         normalize=True, scale_each=True, pad_value=1)
             for _, kernels in panels]
    save_grid(out("compare.png"), torch.stack(grids), nrow=6, value_range=(0, 1), scale=2)
    plot_pca(panels, out("compare_pca.png"))
    x, metric_panels = "row of compare.md", []
    for metric in ("final_test_acc", "frechet_to_bank", "low_freq_share"):
        curves = {"mean ± std over its runs": curve(groups, metric)}
        if bank_row.get(metric) is not None:
            curves["bank"] = ([0, len(groups) - 1], [bank_row[metric]] * 2)
        metric_panels.append((METRICS[metric], x, metric, curves))
    plot_lines(out("compare_metrics.png"), metric_panels)
    prior = {c: g for c, g in groups.items() if c.startswith("λ = ") or "from bank" in c}
    ladder = {"every row": curve(groups, "final_test_acc"),
              "the kernel prior": curve(prior, "final_test_acc", groups)}
    plot_lines(out("compare_ladder.png"), [("from nothing transferred to all", x,
                                            "final test accuracy (mean ± std)", ladder)])
    draws = {}
    for subset in sorted({r["subset"] for r in rows if r["subset"] is not None}):
        stats = group_stats([r for r in rows if r["subset"] == subset], ["final_test_acc"])
        draws[f"subset {subset}"] = curve(stats, "final_test_acc", groups)[:2]
    plot_lines(out("compare_subsets.png"), [("each draw of the training images (--subset-seed)",
                                             x, "final test accuracy (mean over seeds)", draws)])
    return ["compare.png", "compare_pca.png", "compare_metrics.png", "compare_ladder.png",
            "compare_subsets.png"]


def curve(groups, metric, table=None):
    """(x, mean, std) of a metric over the configurations of group_stats that have it; x is a
    configuration's row in `table` (default: groups)."""
    rows = list(table or groups)
    shown = [(rows.index(c), stats[metric]) for c, (_, stats) in groups.items() if stats[metric]]
    return [i for i, _ in shown], [m for _, (m, _) in shown], [s for _, (_, s) in shown]


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
        ax.set(xlabel="PC 1 of the bank's standardized kernels", ylabel="PC 2")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


# ============================================================================= 3. the microscope
# Seed 003's visualization lab (2-b: saliency maps, adversarial examples, class visualization) on
# the course's own CNNs, with the paper's claim as the question: when the kernel prior leaves the
# accuracy where it was, does it change what a model looks at, or how easily it is fooled?
# Everything works on pixels x in [0, 1]; the CNN sees (x - 0.5) / 0.5, as in training.
#
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


def on_pixels(cnn):
    """A trained CNN as the microscope sees it: a function of pixels x in [0, 1], in eval mode
    (BatchNorm's running statistics, as at test time), fed (x - 0.5) / 0.5, the normalization it
    was trained with (mean 0.5, std 0.5: train_small.py's normalize)."""
    cnn.eval()
    return lambda x: cnn((x - 0.5) / 0.5)


def loss_gradient(model, x, y):
    """d loss / d x: the direction in pixel space in which the cross-entropy rises fastest."""
    x = x.detach().requires_grad_()
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def fgsm(model, x, y, eps):
    """Adversarial examples, the fast gradient sign method (Goodfellow et al., 2015): one step of
    size eps along the sign of the loss gradient, x' = clip(x + eps sign(d loss / d x), 0, 1)."""
    return (x + eps * loss_gradient(model, x, y).sign()).clamp(0, 1)


def pgd(model, x, y, eps, steps):
    """Projected gradient descent (Madry et al., 2018): `steps` sign steps of size 2.5 eps / steps
    from x, each projected back into the L-inf ball of radius eps around x and into [0, 1]."""
    step = 2.5 * eps / steps
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv + step * loss_gradient(model, x_adv, y).sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def saliency(model, x, y):
    """Saliency map (Simonyan et al., 2014): |d S_y / d x|, the gradient of the true class's
    score (its logit, before the softmax) with respect to the input, max over the colour
    channels: [N, H, W]. Bright pixels are those whose change moves the score most."""
    x = x.detach().requires_grad_()
    score = model(x).gather(1, y[:, None]).sum()
    return torch.autograd.grad(score, x)[0].abs().amax(dim=1)


def class_visualization(model, classes, steps=200, lr=0.3, l2_reg=1e-3, blur_every=10,
                        max_jitter=2, seed=0):
    """Class visualization (Simonyan et al., 2014), regularized after Yosinski et al. (2015) as
    in the lab's public exercise code: from noise, gradient ascent on the image to raise
    S_c(x) - l2_reg ||x'||^2 (x' the normalized image the CNN sees), each step of L2 norm `lr` in
    pixel space on a copy shifted by up to `max_jitter` pixels, a Gaussian blur (sigma 0.5)
    every `blur_every` steps.
    The defaults are this project's: that code's (l2 1e-3, 200 steps, blur every 10, jitter
    16 of 224 pixels) with the jitter scaled to 32 pixels, lr chosen by eye on the authors' seed-0
    model (0.1, 0.3, 0.5, 1 tried)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(classes), 3, 32, 32, generator=g)  # the noise it starts from
    for t in range(steps):
        dy, dx = torch.randint(-max_jitter, max_jitter + 1, (2,), generator=g).tolist()
        x = x.roll((dy, dx), dims=(2, 3)).requires_grad_()
        objective = model(x).gather(1, classes[:, None]).sum() \
            - l2_reg * ((x - 0.5) / 0.5).square().sum()
        grad = torch.autograd.grad(objective, x)[0]
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        x = x.detach() + lr * grad / norm[:, None, None, None]
        x = x.roll((-dy, -dx), dims=(2, 3)).clamp(0, 1)
        if (t + 1) % blur_every == 0:
            x = torchvision.transforms.functional.gaussian_blur(x, kernel_size=3, sigma=0.5)
    return x


def robustness_row(model, x, y, epsilons, steps, batch_size=500):
    """{column: accuracy} of one model on the test images x, y: clean, then under FGSM and PGD at
    each eps (in units of 1/255)."""
    attacks = {"clean_acc": lambda xb, yb: xb}
    for e in epsilons:
        attacks[f"fgsm_{e:g}/255"] = functools.partial(fgsm, model, eps=e / 255)
    for e in epsilons:
        attacks[f"pgd_{e:g}/255"] = functools.partial(pgd, model, eps=e / 255, steps=steps)
    correct = dict.fromkeys(attacks, 0)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        for name, attack in attacks.items():
            x_adv = attack(xb, yb)
            with torch.no_grad():
                correct[name] += (model(x_adv).argmax(1) == yb).sum().item()
    return {name: count / len(x) for name, count in correct.items()}


def microscope_inputs(args, runs):
    """The test images (a fixed subset of --attack-images) and the runs the microscope looks at,
    in the table's order, every check made before anything is written: the runs to attack (their
    classes are the test data's) and the pretrained models to visualize (no training history)."""
    images, targets, classes = load_split(args.test_data, args.data_root, "test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    pick = pick[:args.attack_images]  # train_small.py's test order: any first N a fair sample
    x, y = as_cifar_images(images[pick]).float() / 255, targets[pick]
    attacked, visualized = [], []
    for path, ckpt, label, _ in runs:  # the paper's CNN with each run's weights, all its layers
        cnn = PaperCNN(len(ckpt["model"].get("fc.weight", [0])))
        if {k: v.shape for k, v in ckpt["model"].items()} != {
                k: v.shape for k, v in cnn.state_dict().items()}:
            raise UserError(f"{path} holds another architecture than the paper's CNN (the "
                            f"microscope needs all its layers: conv1-4, bn1-4, fc)")
        cnn.load_state_dict(ckpt["model"])
        if "history" not in ckpt:  # the authors' models: the lab's class visualization
            visualized.append(cnn)
        if cnn.fc.out_features == len(classes):
            attacked.append((path, label, cnn, subset_of(ckpt), ckpt.get("seed")))
        elif "history" in ckpt:
            raise UserError(f"{path} classifies {cnn.fc.out_features} classes, but "
                            f"--test-data {args.test_data} has {len(classes)} class folders")
        else:
            print(f"not attacked: {path} classifies {cnn.fc.out_features} classes, --test-data "
                  f"{len(classes)} (class visualization only)")
    return {"x": x, "y": y, "attacked": attacked, "visualized": visualized}


def microscope(inputs, args, baseline, kernel_prior):
    """Accuracy under attack of every run (microscope.csv, a row per run; microscope.md, a row
    per configuration; microscope_paired.csv/.md, each row's difference to the baseline and to
    λ = 1 over matched runs), the saliency maps of the first run of each configuration and
    microscope_classes.png: the class visualization of the first ten classes (columns) under
    each pretrained model (rows, in the table's order)."""
    x, y = inputs["x"], inputs["y"]
    rows, written, firsts = [], [], {}
    for path, label, cnn, subset, seed in inputs["attacked"]:
        firsts.setdefault(label, cnn)  # the first run of each configuration: its saliency maps
        accs = robustness_row(on_pixels(cnn), x, y, args.epsilons, args.pgd_steps)
        rows.append({"model": path, "configuration": label, "subset": subset, "seed": seed,
                     "images": len(x), **accs})
        print(f"attacked {path}: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)
    if rows:  # the accuracy columns: clean, then each attack, after the five that name the run
        columns = list(rows[0])[5:]
        headers = ["clean acc" if c == "clean_acc" else c.replace("_", " ").upper().replace(
            "PGD", f"PGD-{args.pgd_steps}") for c in columns]
        written = write_tables(args.out, "microscope", rows,
                               microscope_table(rows, len(x), columns, headers, args),
                               *microscope_paired(rows, columns, headers, baseline, kernel_prior))
        written.append("microscope_saliency.png")
        plot_saliency(x, y, firsts.values(), os.path.join(args.out, written[-1]))
    if inputs["visualized"]:
        classes = torch.arange(min(10, *(cnn.fc.out_features for cnn in inputs["visualized"])))
        images = [class_visualization(on_pixels(cnn), classes) for cnn in inputs["visualized"]]
        written.append("microscope_classes.png")
        save_grid(os.path.join(args.out, written[-1]), torch.cat(images), nrow=len(classes),
                  value_range=(0, 1), scale=3)
    print(f"wrote {', '.join(f'{args.out}/{name}' for name in written)}")


def microscope_table(rows, images, columns, headers, args):
    """microscope.md: one row per configuration (in the rows' order), mean ± std over its runs."""
    lines = [[config, runs] + [mean_std_cell(stats[c]) for c in columns]
             for config, (runs, stats) in group_stats(rows, columns).items()]
    return (f"Accuracy under attack on {images} test images of {args.test_data} (L-inf in pixel "
            f"space [0, 1], eps in units of 1/255; FGSM, and PGD with {args.pgd_steps} steps of "
            f"2.5 eps / {args.pgd_steps}); mean ± std over the runs of each configuration.\n\n"
            + md_table(["configuration", "runs", *headers], lines))


def microscope_paired(rows, columns, headers, baseline, kernel_prior):
    """microscope_paired.csv/.md: the compare step's paired differences (paired_difference: the
    runs matched by (subset, seed), the interval over the draws) for the clean accuracy and the
    accuracy under each attack; every row against the baseline, every other row against λ = 1."""
    results, lines = [], []
    for config, reference in reference_pairs(rows, baseline, kernel_prior):
        diffs = [paired_difference(rows, config, reference, metric) for metric in columns]
        results += [{"metric": metric, **d} for metric, d in zip(columns, diffs)]
        # one cell a metric: "+0.012 [-0.020, +0.044] not shown", "+0.012 [...]", "+0.012" or "-"
        cells = [" ".join(c for c in paired_cells(d) if c not in ("-", "", "shown")) or "-"
                 for d in diffs]
        lines.append([config, reference, diffs[0]["pairs"], diffs[0]["subsets"], *cells])
    header = ["configuration", "against", "pairs", "subsets", *headers]
    return results, ("Accuracy (clean and under attack), row minus reference, over the (subset, "
                     "seed) pairs both have; 95 % interval as in compare_paired.md (the pairs of "
                     "each draw averaged, then t over the draws); \"not shown\": the interval "
                     "holds 0.\n\n" + md_table(header, lines, "|---|---|---:|---:|"
                                                 + "---|" * len(headers)))


def plot_saliency(x, y, cnns, path, count=6):
    """microscope_saliency.png: the first `count` test images (top row) and below them their
    saliency maps under the first run of each configuration (a row each, in the table's order),
    each map scaled to its own maximum and coloured black-red-yellow-white."""
    x, y = x[:count], y[:count]
    grid = [x]
    for cnn in cnns:
        maps = saliency(on_pixels(cnn), x, y)
        maps = (maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).numpy()
        grid.append(torch.from_numpy(plt.cm.hot(maps)[..., :3]).permute(0, 3, 1, 2).float())
    save_grid(path, torch.cat(grid), nrow=len(x), value_range=(0, 1), scale=4)


# ----------------------------------------------------------------------------- checkpoints, banks
# The paper's CNN as this project's scripts store it, and the authors' published layout.
ARCH = "PaperCNN"  # stored in checkpoints; collect_kernels.py refuses anything else

CONV_SHAPES = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 5, 5), "conv3": (128, 128, 5, 5),
               "conv4": (256, 128, 3, 3)}

LOG_COLUMNS = ("cls_loss", "reg_loss", "disc_loss", "d_real", "d_fake")  # train_advreg.py's log

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


def as_cifar_images(images):
    """uint8 [N, C, H, W] -> [N, 3, 32, 32], what the paper's CNN takes (gray -> RGB, resized)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return resize_uint8(images, 32)


def main(argv=None):
    args = parse_args(argv)
    compare(args) if args.compare else collect(args)


# ==== plumbing: skip on a first read; each copy the same, checked by test_smoke.py ====
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
