"""Stage 2 — collect the kernels of the pretrained CNNs into banks of "real" kernels.

Paper: "Adversarial Regularization for Convolution Filters" (Skoltech), the kernel bank and Figure 3. Every
(out, in) slice of a convolution weight [out, in, k, k] is one k x k kernel, so five pretrained
models give 5 * 64 * 3 = 960 kernels of 7x7 (conv1) and 5 * 128 * 64 = 40,960 of 5x5 (conv2).
These banks are the "real" data that stage 4's discriminator learns to tell from the classifier's
own kernels.

Run (after pretrain.py):
    python collect_kernels.py --checkpoints checkpoints/ --layers conv1 conv2 --out kernels/
Compare trained models with a bank (kernel metrics, side-by-side grids; used after stages 3-4):
    python collect_kernels.py --compare runs/small/seed0/model.pt runs/advreg/lam1_seed0/model.pt \
        --bank kernels/conv1_7x7.pt --out kernels/compare

Kernel metrics (a number for "the kernels have patterns", which the paper only shows as pictures):
  * Frechet distance: every kernel is standardized (zero mean, unit std over its k*k pixels), a
    Gaussian is fitted to each set in the k*k-dimensional space, and the Frechet distance between
    the two Gaussians is reported. Lower = closer to the bank's distribution of shapes.
  * Low-frequency share: the share of a kernel's energy (its mean removed) at spatial frequencies of
    radius <= 0.25 cycles/pixel, averaged over kernels. Smooth, patterned kernels score high;
    white noise scores about 1/6 for both 7x7 and 5x5 kernels.
The bank's own reference: each source model's kernels against all the other sources' kernels.

Reads:  checkpoints written by pretrain.py (or, with --compare, by train_small.py / train_advreg.py).
Writes: <out>/<layer>_<k>x<k>.pt — dict with "kernels" [N, k, k] and provenance (layer,
        kernel_size, sources, seeds, test_acc, dataset); <out>/<layer>_<k>x<k>_grid.png (Figure 3).
        With --compare: <out>/compare.csv, <out>/compare.md, <out>/compare.png.
"""
import argparse
import csv
import glob
import os
import re

import matplotlib
matplotlib.use("Agg")  # figures go to files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchvision

ARCH = "PaperCNN"
# The paper's CNN: layer name -> weight shape [out, in, k, k] (see pretrain.py).
CONV_SHAPES = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 5, 5), "conv3": (128, 128, 5, 5), "conv4": (256, 128, 3, 3)}


# ----------------------------------------------------------------------------- args
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage 2: collect conv kernels of pretrained CNNs into banks (and Figure 3); "
                    "or, with --compare, measure trained models' kernels against a bank.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder of pretrain.py checkpoints (all *.pt in it) or a glob such as 'ckpts/seed*.pt'")
    p.add_argument("--layers", nargs="+", default=["conv1", "conv2"],
                   help=f"layers to collect, one bank each (paper: conv1 7x7 and conv2 5x5); "
                        f"allowed: {', '.join(CONV_SHAPES)}")
    p.add_argument("--out", default="kernels", help="output folder")
    p.add_argument("--grid-kernels", type=int, default=64, help="kernels shown in each figure grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample shown in the figures")
    p.add_argument("--compare", nargs="+", metavar="CKPT", default=None,
                   help="instead of collecting: checkpoints of trained models to compare with --bank")
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
    """[N, k, k] -> [N, k*k] float64, each kernel with zero mean and unit std: compares shape, not scale."""
    flat = kernels.reshape(len(kernels), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to the rows of a [N, d] and b [M, d].

    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), with tr (C_a C_b)^(1/2) computed as the sum
    of square roots of the eigenvalues of the symmetric matrix C_a^(1/2) C_b C_a^(1/2).
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp_min(0).sqrt()) @ eigvecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum().item() + (cov_a.trace() + cov_b.trace() - 2 * cross).item()


def low_freq_share(kernels, cutoff=0.25):
    """Mean share of each kernel's energy (mean removed) at spatial frequency radius <= cutoff cycles/pixel."""
    k = kernels.shape[-1]
    centered = kernels.double() - kernels.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centered).abs() ** 2
    freq = torch.fft.fftfreq(k, dtype=torch.float64)
    low = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt() <= cutoff
    return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)).mean().item()


# ----------------------------------------------------------------------------- checkpoints and banks
def find_checkpoints(spec):
    paths = sorted(glob.glob(os.path.join(spec, "*.pt"))) if os.path.isdir(spec) else sorted(glob.glob(spec))
    if not paths:
        raise SystemExit(f"error: no checkpoints match {spec!r}; run pretrain.py first "
                         f"(it writes checkpoints/seed<N>.pt), or pass --checkpoints DIR_OR_GLOB")
    return paths


# The authors' published models (GitHub realfolkcode/AdversarialRegularization, models/*.pt) are
# plain state_dicts of an nn.Sequential; these are their names for the layers of the paper's CNN.
AUTHORS_LAYERS = {"features.0": "conv1", "features.1": "bn1", "features.3": "conv2", "features.4": "bn2",
                  "features.6": "conv3", "features.7": "bn3", "features.9": "conv4", "features.10": "bn4",
                  "classifier.2": "fc"}


def from_authors_layout(state, path):
    """An authors' state_dict as a checkpoint dict like ours (layer names conv1..fc), or None."""
    if not isinstance(state, dict) or "features.0.weight" not in state:
        return None
    model = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module not in AUTHORS_LAYERS:
            return None
        model[f"{AUTHORS_LAYERS[module]}.{param}"] = value
    seed = re.search(r"seed(\d+)", os.path.basename(path))
    return {"arch": ARCH, "model": model, "seed": int(seed.group(1)) if seed else None,
            "dataset": "cifar100 (the authors' models)", "format": "authors"}


def load_checkpoint(path, layers):
    """A checkpoint's dict, after checking it holds the paper's CNN with the layers asked for.

    Reads pretrain.py's checkpoints and the authors' published state_dicts (saved on a GPU, so
    everything is loaded to the CPU).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise SystemExit(f"error: {path!r} is not a checkpoint written by pretrain.py / train_small.py "
                         f"/ train_advreg.py nor one of the authors' models (corrupt or another format)")
    ckpt = from_authors_layout(ckpt, path) or ckpt
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or ckpt.get("arch") != ARCH:
        raise SystemExit(f"error: {path!r} is not a checkpoint of the paper's CNN ({ARCH}) written by "
                         f"pretrain.py / train_small.py / train_advreg.py")
    for layer in layers:
        weight = state.get(f"{layer}.weight")
        if weight is None or tuple(weight.shape) != CONV_SHAPES[layer]:
            got = None if weight is None else tuple(weight.shape)
            raise SystemExit(f"error: {path!r} has another architecture: {layer}.weight is {got}, "
                             f"expected {CONV_SHAPES[layer]}")
    return ckpt


def kernels_of(state, layer):
    """Every (out, in) slice of a conv weight as one kernel: [out, in, k, k] -> [out*in, k, k]."""
    weight = state[f"{layer}.weight"].float()
    return weight.reshape(-1, weight.shape[-2], weight.shape[-1])


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


def save_atomic(obj, path):
    """torch.save to a temporary name, then rename: a Ctrl-C never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- figures
def kernel_grid(kernels, nrow=8, scale=8):
    """[N, k, k] -> an image [3, H, W] of the kernels, each scaled to its own range, enlarged `scale`x."""
    big = F.interpolate(kernels[:, None].float(), scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(big, nrow=nrow, padding=scale // 2, normalize=True,
                                       scale_each=True, pad_value=1.0)


def random_sample(kernels, count, seed):
    g = torch.Generator().manual_seed(seed)
    return kernels[torch.randperm(len(kernels), generator=g)[:count]]


def save_png(fig_or_tensor, path):
    tmp = path + ".tmp.png"
    if isinstance(fig_or_tensor, torch.Tensor):
        torchvision.utils.save_image(fig_or_tensor, tmp)
    else:
        fig_or_tensor.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig_or_tensor)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- collect
def collect(args):
    paths = find_checkpoints(args.checkpoints)
    ckpts = [load_checkpoint(p, args.layers) for p in paths]  # every check passes before anything is written
    seeds = [c.get("seed") for c in ckpts]
    test_accs = [c["history"]["test_acc"][-1] if c.get("history", {}).get("test_acc") else None for c in ckpts]
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(paths)} checkpoints: {', '.join(os.path.basename(p) for p in paths)}")
    print(f"{'layer':6} {'bank':>14} {'mean':>8} {'std':>7} {'|kernel|':>9} {'low-freq':>9}")
    for layer in args.layers:
        per_source = [kernels_of(c["model"], layer) for c in ckpts]
        kernels = torch.cat(per_source)
        k = kernels.shape[-1]
        name = f"{layer}_{k}x{k}"
        bank = {"kernels": kernels, "layer": layer, "kernel_size": k, "sources": [os.path.abspath(p) for p in paths],
                "source_counts": [len(s) for s in per_source], "seeds": seeds, "test_acc": test_accs,
                "dataset": ckpts[0].get("dataset"), "arch": ARCH,
                "format": ckpts[0].get("format", "pretrain.py")}
        save_atomic(bank, os.path.join(args.out, name + ".pt"))
        save_png(kernel_grid(random_sample(kernels, args.grid_kernels, args.seed)),
                 os.path.join(args.out, name + "_grid.png"))
        print(f"{layer:6} {str(list(kernels.shape)):>14} {kernels.mean().item():8.4f} {kernels.std().item():7.4f} "
              f"{kernels.flatten(1).norm(dim=1).mean().item():9.4f} {low_freq_share(kernels):9.3f}")
    print(f"wrote {', '.join(f'{args.out}/{layer}_*.pt' for layer in args.layers)} and the Figure 3 grids (*_grid.png)")


# ----------------------------------------------------------------------------- compare
def bank_reference(bank):
    """Metrics of each source model's kernels against the other sources' (mean over sources)."""
    kernels, counts = bank["kernels"], bank.get("source_counts") or [len(bank["kernels"])]
    if len(counts) < 2:
        return None
    parts = torch.split(kernels, counts)
    fds = [frechet_distance(standardize_kernels(p), standardize_kernels(torch.cat(parts[:i] + parts[i + 1:])))
           for i, p in enumerate(parts)]
    return sum(fds) / len(fds)


def compare(args):
    bank = load_bank(args.bank)
    layer, bank_kernels = bank["layer"], bank["kernels"]
    ckpts = [load_checkpoint(p, [layer]) for p in args.compare]
    bank_std = standardize_kernels(bank_kernels)
    rows = [{"model": f"bank ({len(bank.get('source_counts', [1]))} sources)", "kernels": len(bank_kernels),
             "frechet_to_bank": bank_reference(bank), "low_freq_share": low_freq_share(bank_kernels),
             "kernel_std": bank_kernels.std().item(), "test_acc": None}]
    panels = [("bank", bank_kernels)]
    for path, ckpt in zip(args.compare, ckpts):
        kernels = kernels_of(ckpt["model"], layer)
        history = ckpt.get("history", {})
        rows.append({"model": path, "kernels": len(kernels),
                     "frechet_to_bank": frechet_distance(standardize_kernels(kernels), bank_std),
                     "low_freq_share": low_freq_share(kernels), "kernel_std": kernels.std().item(),
                     "test_acc": history["test_acc"][-1] if history.get("test_acc") else None})
        panels.append((os.path.relpath(path), kernels))

    os.makedirs(args.out, exist_ok=True)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    with open(os.path.join(args.out, "compare.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: fmt(v) for key, v in r.items()} for r in rows)
    os.replace(os.path.join(args.out, "compare.csv.tmp"), os.path.join(args.out, "compare.csv"))
    lines = ["| model | kernels | Frechet to bank | low-freq share | kernel std | test acc |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['kernels']} | {fmt(r['frechet_to_bank']) or '-'} | {fmt(r['low_freq_share'])} | "
              f"{fmt(r['kernel_std'])} | {fmt(r['test_acc']) or '-'} |" for r in rows]
    with open(os.path.join(args.out, "compare.md.tmp"), "w") as f:
        f.write(f"Kernels of {layer} ({bank_kernels.shape[-1]}x{bank_kernels.shape[-1]}) against bank {args.bank}\n\n")
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(args.out, "compare.md.tmp"), os.path.join(args.out, "compare.md"))
    print("\n".join(lines))

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, kernels) in zip(axes[0], panels):
        ax.imshow(kernel_grid(random_sample(kernels, args.grid_kernels, args.seed)).permute(1, 2, 0).numpy())
        ax.set_title(title if len(title) < 40 else "..." + title[-37:], fontsize=8)
        ax.axis("off")
    save_png(fig, os.path.join(args.out, "compare.png"))
    print(f"wrote {args.out}/compare.csv, compare.md, compare.png")


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        compare(args)
    else:
        collect(args)


if __name__ == "__main__":
    main()
