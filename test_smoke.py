"""Offline CPU tests: every script (stages 1-4 and gan_labs.py) runs end to end as a user runs it,
on tiny generated data.

    pytest -q

The dataset is a 10-class ImageFolder of generated 32x32 PNGs (each class a different stripe
pattern plus noise), written once per session to a temporary folder. The scripts run as
subprocesses with tiny budgets; the unit tests check the mathematics that can silently go wrong.

The throughput comparison behind the README's ratio is a test too, skipped unless asked for:
    THROUGHPUT_DATA=~/data/cifar10 pytest -q -s -k throughput
"""
import argparse
import ast
import collections
import copy
import csv
import functools
import inspect
import json
import math
import statistics
import os
import subprocess
import sys
import time

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import collect_kernels  # noqa: E402
import gan_labs  # noqa: E402
import pretrain  # noqa: E402
import train_advreg  # noqa: E402
import train_small  # noqa: E402

STAGES = (pretrain, collect_kernels, train_small, train_advreg)


def run(script, *args, ok=True, timeout=600):
    """Run `python script args...` from the repo root as a user would; returns the process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_user_error(proc, *phrases):
    """A user's mistake: exit code != 0, no traceback, and the last line says what is wrong."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error" in last, proc.stderr
    for phrase in phrases:
        assert phrase in last, (phrase, last)


def load(path):
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """ImageFolder tree with 10 classes, 12 train and 5 test PNGs per class."""
    root = tmp_path_factory.mktemp("tiny_data")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 5)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
                pattern = torch.sin((xx * (c % 5 + 1) + yy * (c // 5)) * 0.4)
                img = 127 + 60 * pattern[None].expand(3, 32, 32) \
                    + 30 * torch.randn(3, 32, 32, generator=g)
                to_pil_image(img.clamp(0, 255).to(torch.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def pretrained(tiny_data, tmp_path_factory):
    """Two seeds of pretrain.py (2 epochs each) and the banks collected from them: the real
    subprocess runs of both stage 1-2 scripts, as a user runs them."""
    out = tmp_path_factory.mktemp("pretrain")
    ckpts, banks = out / "checkpoints", out / "kernels"
    run("pretrain.py", "--data", tiny_data, "--seeds", 0, 1, "--epochs", 2, "--batch-size", 32,
        "--out", ckpts)
    run("collect_kernels.py", "--checkpoints", ckpts, "--layers", "conv1", "conv2", "--out", banks)
    return ckpts, banks


def authors_network(num_classes):
    """The authors' published model as their notebook builds it (an nn.Sequential: features.0 =
    conv1, ..., classifier.2 = fc), written here without the scripts' code."""
    layers = []
    for c_in, c_out, k in ((3, 64, 7), (64, 128, 5), (128, 128, 5), (128, 256, 3)):
        layers += [torch.nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2, bias=False),
                   torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
    classifier = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(256, num_classes))
    return torch.nn.Sequential(collections.OrderedDict(
        features=torch.nn.Sequential(*layers), classifier=classifier))


def randomize_batchnorm(net):
    """Every BatchNorm's weights, biases and running statistics far from a fresh init's (1, 0, 0,
    1), so a layer copied or left behind shows in its values."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.3)
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.3, 3.0)


@pytest.fixture(scope="session")
def authors_models(tmp_path_factory):
    """Two fake checkpoints in the layout of the authors' published models (a plain state_dict of
    their nn.Sequential), named model1_seed<N>.pt; every BatchNorm has its own random affine
    parameters and running statistics, so a reader that swaps two layers' keys computes
    something else."""
    folder = tmp_path_factory.mktemp("authors")
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = authors_network(10)
        randomize_batchnorm(net)
        torch.save(net.state_dict(), folder / f"model1_seed{seed}.pt")
    return folder


# ----------------------------------------------------------------------------- stages 1-2
def test_pretrain_writes_checkpoints_summary_and_curves(pretrained, tiny_data):
    ckpts, _ = pretrained
    summary = json.loads((ckpts / "summary.json").read_text())
    assert set(summary["test_acc"]) == {"0", "1"}
    accs = list(summary["test_acc"].values())
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert summary["mean"] == pytest.approx(sum(accs) / 2)
    for seed in (0, 1):
        ckpt = load(ckpts / f"seed{seed}.pt")
        assert ckpt["arch"] == "PaperCNN" and ckpt["epoch"] == 2 and ckpt["seed"] == seed
        assert len(ckpt["history"]["train_loss"]) == 2 and len(ckpt["history"]["test_acc"]) == 2
        assert summary["test_acc"][str(seed)] == ckpt["history"]["test_acc"][-1]
        assert ckpt["args"]["epochs"] == 2 and ckpt["label"] == f"pretrained ({tiny_data})"
        # catches: the training flags not stored, or --epochs among them (it may grow on resume)
        assert ckpt["flags"]["lr"] == 1e-3 and "epochs" not in ckpt["flags"]
        assert ckpt["model"]["conv1.weight"].shape == (64, 3, 7, 7)
        assert ckpt["model"]["fc.weight"].shape == (10, 256)
    assert (ckpts / "training_curves.png").stat().st_size > 1000


def test_collect_kernels_banks_and_figure(pretrained):
    ckpts, banks = pretrained
    conv1, conv2 = load(banks / "conv1_7x7.pt"), load(banks / "conv2_5x5.pt")
    assert conv1["kernels"].shape == (2 * 64 * 3, 7, 7)
    assert conv2["kernels"].shape == (2 * 128 * 64, 5, 5)
    for bank in (conv1, conv2):
        assert torch.isfinite(bank["kernels"]).all() and bank["format"] == "pretrain.py"
        assert bank["seeds"] == [0, 1] and len(bank["test_acc"]) == 2 and len(bank["sources"]) == 2
    # the bank is exactly the checkpoints' weights, slice by slice
    seed1 = load(ckpts / "seed1.pt")["model"]["conv1.weight"]
    assert torch.equal(conv1["kernels"][192:], seed1.reshape(-1, 7, 7))
    assert conv1["layer"] == "conv1" and conv1["kernel_size"] == 7
    assert conv1["source_counts"] == [192, 192]
    assert (banks / "conv1_7x7_grid.png").stat().st_size > 1000
    assert (banks / "conv2_5x5_grid.png").stat().st_size > 1000


def test_authors_models_give_a_bank_and_an_accuracy(authors_models, tiny_data, tmp_path, capsys):
    """In-process (the pretrained fixture runs both scripts as subprocesses). Catches: the authors'
    layer names mapped to the wrong layers (e.g. bn2 <-> bn3, both 128 wide), a bank that is not
    their conv1 weights, --evaluate's accuracy not the model's."""
    (tmp_path / "bank").mkdir()  # into an existing folder too
    collect_kernels.main(["--checkpoints", str(authors_models), "--layers", "conv1",
                          "--out", str(tmp_path / "bank")])
    bank = load(tmp_path / "bank" / "conv1_7x7.pt")
    seed1 = load(authors_models / "model1_seed1.pt")["features.0.weight"]
    assert torch.equal(bank["kernels"][192:], seed1.reshape(-1, 7, 7))
    assert bank["format"] == "authors" and bank["seeds"] == [0, 1]
    paths = sorted(str(p) for p in authors_models.glob("*.pt"))
    (tmp_path / "ev").mkdir()  # an existing folder is fine: a new evaluation overwrites
    pretrain.main(["--evaluate", *paths, "--data", str(tiny_data), "--out", str(tmp_path / "ev")])
    said = capsys.readouterr().out
    header = f"{'layer':6} {'bank':>14} {'mean':>8} {'std':>7} {'|kernel|':>9} {'low-freq':>9}"
    assert header in said and f"conv1  {'[384, 7, 7]':>14} " in said  # 2 models x 192 kernels
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    accs = evaluation["test_acc"]
    assert (evaluation["data"], evaluation["images"]) == (str(tiny_data), 50)
    values = torch.tensor([accs[p] for p in paths], dtype=torch.float64)
    assert evaluation["mean"] == pytest.approx(values.mean().item())
    assert evaluation["std"] == pytest.approx(values.std().item())  # sample std, n - 1
    assert f"mean ± std over 2 checkpoints: {values.mean():.4f} ± {values.std():.4f}" in said
    assert all(f"{p}: test accuracy {accs[p]:.4f} on 50 images" in said for p in paths)
    # the expected numbers, from the authors' own nn.Sequential and images read here
    test = torchvision.datasets.ImageFolder(tiny_data / "test")
    images = torch.stack([pil_to_tensor(test.loader(p)) for p, _ in test.samples])
    labels = torch.tensor(test.targets)
    for path in paths:
        net = authors_network(10).eval()
        net.load_state_dict(load(path))
        with torch.no_grad():
            expected_logits = net(images.float() / 127.5 - 1)
            model = pretrain.PaperCNN(10).eval()
            model.load_state_dict(pretrain.read_checkpoint(path)["model"])
            assert torch.allclose(model(images.float() / 127.5 - 1), expected_logits, atol=1e-5)
        expected = (expected_logits.argmax(1) == labels).float().mean().item()
        assert accs[path] == pytest.approx(expected)


def test_ex01_paper_cnn_has_the_papers_parameter_count():
    assert sum(p.numel() for p in pretrain.PaperCNN(100).parameters()) == 945_572


def test_copies_across_scripts_agree():
    """No shared module: a helper written in several scripts is one copy, and below each script's
    one fence, after the plumbing only some scripts need, is the same block of at most 130 code
    lines."""
    sources = {m.__name__: inspect.getsource(m) for m in SCRIPTS}
    assert differing_copies(sources) == {}
    shared = collections.Counter(n for s in sources.values() for n in top_level_sources(s))
    for name in ("PaperCNN", "augment", "evaluate", "load_bank", "read_checkpoint",
                 "frechet_distance", "kernels_of", "autocast", "write_atomic", "resume"):
        assert shared[name] > 1, name  # the mechanisms the copies guard really are shared
    # the check can fail: one changed character in one copy is found
    changed = dict(sources, train_small=sources["train_small"].replace(
        "a Ctrl-C, a kill or a full disk", "a Ctrl-C, a kill, a full disk"))
    assert differing_copies(changed) == {"write_atomic": sorted(sources)}
    # the lesson first: one fence per script; below it, the same block in all five
    blocks = set()
    for module, source in sources.items():
        assert source.count(FENCE) == source.count(BLOCK) == 1, module
        assert source.index(FENCE) < source.index(BLOCK), module
        blocks.add(source[source.index(BLOCK):])
    assert len(blocks) == 1 and code_lines(blocks.pop()) <= 130
    # the same CNN computes the same function in every copy
    models = [m.PaperCNN(10) for m in (pretrain, train_small, train_advreg, collect_kernels)]
    x = torch.randn(4, 3, 32, 32)
    for m in models:
        m.load_state_dict(models[0].state_dict())
    outputs = [m.eval()(x) for m in models]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


@pytest.mark.parametrize("module", [pretrain, train_small, train_advreg, gan_labs])
def test_device_auto_is_cuda_then_mps_then_cpu_and_threads_are_set(module, monkeypatch):
    """Catches: --threads ignored, 'auto' not taking an available accelerator (or taking the CPU
    first), a named device that is missing used anyway instead of one line."""
    def namespace(device, threads=0):
        return argparse.Namespace(device=device, threads=threads)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        module.pick_device(namespace("cpu", threads=1))
        assert torch.get_num_threads() == 1
        module.pick_device(namespace("cpu", threads=0))  # 0: torch's own number, left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert module.pick_device(namespace("auto")).type == expected
        assert module.pick_device(namespace("cpu")).type == "cpu"
    with pytest.raises(module.UserError, match="--device cuda: torch cannot use it"):
        module.pick_device(namespace("cuda"))


def test_augment_keeps_shapes_and_labels():
    """Each output image is a padded crop (or its mirror) of the SAME input image."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = pretrain.augment(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = F.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(len(images)):
        crops = [(padded[i, :, dy:dy + 32, dx:dx + 32], flip)
                 for dy in range(9) for dx in range(9) for flip in (0, 1)]
        matches = [flip for crop, flip in crops
                   if torch.equal(out[i], crop.flip(2) if flip else crop)]
        assert matches, f"augmented image {i} is not a crop of input image {i}"
        flips += matches[0]
    assert 0 < flips < len(images)  # both flipped and unflipped images occur


def test_pretrain_resume_continues_from_saved_epoch(tiny_data, tmp_path):
    """Catches: optimizer or random state not saved / not restored (the resumed weights would
    differ), epochs counted twice or skipped, free flags (--epochs, --threads) refused."""
    common = ["--data", tiny_data, "--seeds", 0, "--batch-size", 32]
    run("pretrain.py", *common, "--epochs", 2, "--out", tmp_path / "straight")
    run("pretrain.py", *common, "--epochs", 1, "--out", tmp_path / "resumed")
    proc = run("pretrain.py", *common, "--epochs", 2, "--threads", 1, "--out", tmp_path / "resumed")
    assert "resuming" in proc.stdout and "after epoch 1" in proc.stdout
    straight = load(tmp_path / "straight" / "seed0.pt")
    resumed = load(tmp_path / "resumed" / "seed0.pt")
    assert resumed["epoch"] == 2 and resumed["history"]["train_loss"] == \
        straight["history"]["train_loss"]
    # optimizer and random state travel with the checkpoint: the interrupted run ends where the
    # straight one does, bit for bit (same thread count, same CPU)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def pretrain_in_process(tiny_data, out, *flags):
    """pretrain.py's entry point on the tiny data, seed 0, in this process; returns the
    SystemExit's message (None if the run ends normally)."""
    argv = ["--data", str(tiny_data), "--seeds", "0", "--batch-size", "32", "--out", str(out),
            *map(str, flags)]
    try:
        pretrain.entry_point(pretrain.main, argv)
    except SystemExit as e:
        return str(e.code)
    return None


def test_pretrain_loss_is_the_epochs_mean_and_one_seed_has_std_0(tiny_data, tmp_path,
                                                                  monkeypatch):
    """The history's train_loss is the mean of the epoch's batch losses, weighted by their sizes
    (120 images in batches of 32, the last of 24: catches a sum that keeps the last batch only);
    one seed's summary has std 0; the checkpoint holds --compare's pretrained row."""
    losses, plain = [], F.cross_entropy

    def recording(logits, labels):
        loss = plain(logits, labels)
        losses.append((loss.item(), len(labels)))
        return loss
    monkeypatch.setattr(pretrain.F, "cross_entropy", recording)
    assert pretrain_in_process(tiny_data, tmp_path / "r", "--epochs", 1) is None
    ckpt = load(tmp_path / "r" / "seed0.pt")
    assert [n for _, n in losses] == [32, 32, 32, 24]
    want = sum(loss * n for loss, n in losses) / 120
    assert ckpt["history"]["train_loss"] == [pytest.approx(want, rel=1e-5)]
    assert (ckpt["label"], ckpt["row_order"]) == (f"pretrained ({tiny_data})", [4, 0, 0, 0.0])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["std"] == 0.0 and summary["mean"] == summary["test_acc"]["0"]


def test_pretrain_refuses_a_folder_holding_a_run_with_other_flags(pretrained, tiny_data):
    """Catches: a second run with another --lr / --no-augment silently continuing the first one's
    checkpoint (two runs mixed in one file); the refusal writing anything."""
    ckpts, _ = pretrained
    before = (ckpts / "seed0.pt").read_bytes()
    message = pretrain_in_process(tiny_data, ckpts, "--epochs", 3, "--lr", 0.01, "--no-augment")
    assert message.startswith("error:") and "\n" not in message, message
    assert "other flags" in message and "--lr 0.001 (now 0.01)" in message
    assert "--no-augment False (now True)" in message and "--epochs" not in message
    assert (ckpts / "seed0.pt").read_bytes() == before


def test_pretrain_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_data, tmp_path):
    """Catches: a NaN loss trained on, or written over the last good checkpoint."""
    # a learning rate that blows up at once: one line, and no checkpoint of a diverged model
    message = pretrain_in_process(tiny_data, tmp_path / "a", "--epochs", 1, "--lr", 1e37)
    assert message.startswith("error:") and "diverged" in message, message
    assert "epoch 1 of seed 0" in message and "--lr" in message
    assert not (tmp_path / "a" / "seed0.pt").exists()
    # one good epoch, then a learning rate that blows up (a resumed run takes the checkpoint's)
    assert pretrain_in_process(tiny_data, tmp_path / "b", "--epochs", 1) is None
    path = tmp_path / "b" / "seed0.pt"
    ckpt = load(path)
    ckpt["optimizer"]["param_groups"][0]["lr"] = 1e37
    torch.save(ckpt, path)
    before = path.read_bytes()
    message = pretrain_in_process(tiny_data, tmp_path / "b", "--epochs", 2)
    assert "diverged" in message and "epoch 2 of seed 0" in message, message
    assert path.read_bytes() == before


def test_pretrain_full_disk_gives_one_line_and_keeps_the_checkpoint(tiny_data, tmp_path,
                                                                    monkeypatch):
    """Catches: torch's traceback instead of one line, a temporary file left behind, the previous
    checkpoint damaged. The disk fills while torch.save writes, as torch reports it."""
    assert pretrain_in_process(tiny_data, tmp_path, "--epochs", 1) is None
    before = (tmp_path / "seed0.pt").read_bytes()

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as half:
            half.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    message = pretrain_in_process(tiny_data, tmp_path, "--epochs", 2)
    assert message.startswith("error: could not write") and "seed0.pt" in message, message
    assert "disk full" in message and "\n" not in message
    assert (tmp_path / "seed0.pt").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp*"))


def test_bank_reference_is_each_source_against_the_others():
    """The bank's own Fréchet distance: the mean over its sources of each one's distance to the
    others (catches a bank of two sources given none); a bank of one source has none. mean_std
    in float64 (catches float32: 1e8 + 1 and 1e8 + 3 would both be 1e8)."""
    def fd(x, y):
        std = collect_kernels.standardize_kernels
        return collect_kernels.frechet_distance(std(x), std(y))
    g, pattern = torch.Generator().manual_seed(0), torch.arange(9.0).reshape(3, 3)
    a, b, c = (torch.randn(60, 3, 3, generator=g) + w * pattern for w in (0.0, 1.0, -1.0))
    two = {"kernels": torch.cat([a, b]), "source_counts": [60, 60]}
    assert collect_kernels.bank_reference(two) == pytest.approx(fd(a, b), rel=1e-9)
    three = {"kernels": torch.cat([a, b, c]), "source_counts": [60, 60, 60]}
    want = (fd(a, torch.cat([b, c])) + fd(b, torch.cat([a, c])) + fd(c, torch.cat([a, b]))) / 3
    assert collect_kernels.bank_reference(three) == pytest.approx(want, rel=1e-9)
    assert collect_kernels.bank_reference({"kernels": a, "source_counts": [60]}) is None
    mean, std = collect_kernels.mean_std([1e8 + 1, 1e8 + 3])
    assert mean == 1e8 + 2 and std == pytest.approx(math.sqrt(2), rel=1e-9)


def test_ex11_t_quantile_against_its_closed_forms():
    """Catches a wrong density constant, too few Simpson steps or a bisection that stops early:
    Student's t has closed-form quantiles for df = 1 (Cauchy) and df = 2, and tends to the
    normal's 1.95996 at 97.5 %."""
    for p in (0.6, 0.9, 0.975, 0.995):  # 0.6: a quantile under 1
        assert collect_kernels.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)),
                                                                 rel=1e-6)
        assert collect_kernels.t_quantile(p, 2) == pytest.approx(
            (2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    assert collect_kernels.t_quantile(0.975, 100000) == pytest.approx(1.959964, abs=1e-4)


SMALL_ARGS = {"data": "d", "per_class": 10, "epochs": 5, "lr": 2e-3, "weight_decay": 1e-3,
              "no_augment": False, "amp_epsilon": None, "init_bank": None, "init_from": None,
              "transfer": None, "freeze": None, "val_size": 0, "seeds": [0, 1], "out": "o"}
ADVREG_ARGS = {**SMALL_ARGS, "layers": ["conv1"], "lam": [0, 0.5, 1], "bank": ["b.pt"], "out": "p"}
CONVS = ["conv1", "conv2", "conv3", "conv4"]
STORED_ROWS = {  # a fake run's row label and order key, as its trainer stores them
    "base": ("baseline (λ = 0)", [0, 0, 0, 0.0]), "amp": ("AMP ε = 0.3", [1, 0, 0, 0.3]),
    "lam1": ("λ = 1", [2, False, 0, 1.0]), "lam05": ("λ = 0.5", [2, False, 0, 0.5]),
    "two": ("λ = 1, conv1+conv2", [2, False, 0, 1.0]), "lpft": ("LP-FT", [3, 5, 0, 0.0]),
    "bank_init": ("baseline (λ = 0), conv1 from bank", [2, True, 0, 0]),
    "probe": ("linear probe (transfer conv1-4, frozen conv1-4)", [3, 4, -4, 0.0]),
    "tune": ("fine-tune (transfer conv1-4)", [3, 4, 0, 0.0]),
    "t1": ("transfer conv1", [3, 1, 0, 0.0]), "t12": ("transfer conv1+conv2", [3, 2, 0, 0.0]),
    "t1f1": ("transfer conv1, frozen conv1", [3, 1, -1, 0.0])}


def test_ex11_compare_pools_the_draws_and_pairs_runs_by_subset_and_seed(tmp_path):
    """Fake runs on 3 draws of the training images x 2 seeds. Catches: a configuration split
    into one row per draw (or merged without saying how many draws it holds), LP-FT runs split
    by the folder of the probe they start from, runs paired by seed alone (across draws), and
    an interval over the 6 pairs as if they were independent (the draws are the units)."""
    g = torch.Generator().manual_seed(0)
    small, advreg, convs = SMALL_ARGS, ADVREG_ARGS, CONVS

    def fake(path, args, subset, seed, acc, **fields):
        ckpt = {"arch": "PaperCNN", "epoch": 5, "seed": seed, "format": 2,
                "history": {"test_acc": [0.1, acc], "train_acc": [0.5, 1.0]},
                "model": {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g)},
                "args": {**args, "subset_seed": subset, "seeds": [seed]}, **fields}
        ckpt["label"], ckpt["row_order"] = STORED_ROWS[path.parent.parent.name]  # by its folder
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        return str(path)

    base = {(0, 0): 0.20, (0, 1): 0.22, (1, 0): 0.30, (1, 1): 0.26, (2, 0): 0.25, (2, 1): 0.27}
    amp_gain = {(0, 0): 0.03, (0, 1): 0.01, (1, 0): 0.02, (1, 1): 0.00, (2, 0): 0.05}
    paths = []
    for (k, s), acc in base.items():
        paths.append(fake(tmp_path / f"sub{k}/base/seed{s}/model.pt", small, k, s, acc))
        paths.append(fake(tmp_path / f"sub{k}/probe/seed{s}/model.pt",
                          {**small, "init_from": "models/model1_seed{seed}.pt", "transfer": convs,
                           "freeze": convs, "lr": 2e-5}, k, s, 0.45))
        paths.append(fake(tmp_path / f"sub{k}/lpft/seed{s}/model.pt",
                          {**small, "init_from": f"{tmp_path}/sub{k}/probe/seed{{seed}}/model.pt",
                           "transfer": convs + ["fc"], "lr": 2e-5}, k, s, 0.46))
        if (k, s) in amp_gain:  # the pair (2, 1) is missing: AMP pairs with 5 baseline runs
            paths.append(fake(tmp_path / f"sub{k}/amp/seed{s}/model.pt",
                              {**small, "amp_epsilon": 0.3}, k, s, acc + amp_gain[k, s]))
    for s, acc in {0: 0.24, 1: 0.21, 2: 0.23}.items():  # λ = 1 on draw 0 only, seeds 0-2
        paths.append(fake(tmp_path / f"sub0/lam1/seed{s}/model.pt", advreg, 0, s, acc, lam=1.0))
    bank = str(tmp_path / "bank.pt")
    torch.save({"kernels": torch.randn(384, 7, 7, generator=g), "layer": "conv1",
                "kernel_size": 7, "source_counts": [192, 192]}, bank)
    out = tmp_path / "cmp"
    collect_kernels.main(["--compare", *paths, "--bank", bank, "--out", str(out)])

    table = (out / "compare.md").read_text()
    assert "| baseline (λ = 0) | 6 | 3 | 2 | 0.250 ± 0.036 |" in table  # std of the six: 0.0358
    assert "| AMP ε = 0.3 | 5 | 3 | 2 |" in table
    assert "| LP-FT | 6 | 3 | 2 | 0.460 ± 0.000 |" in table  # one row over the three probes
    assert "| λ = 1 | 3 | 1 | 3 |" in table
    with open(out / "compare_paired.csv") as f:
        paired = {(r["configuration"], r["against"]): r for r in csv.DictReader(f)}
    amp = paired["AMP ε = 0.3", "baseline (λ = 0)"]
    means = [0.02, 0.01, 0.05]  # AMP - baseline, per draw: (0.03 + 0.01) / 2, (0.02 + 0) / 2, 0.05
    m = sum(means) / 3
    half = ((2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, df = 2), closed form
            * math.sqrt(sum((v - m) ** 2 for v in means) / 2) / math.sqrt(3))
    assert (int(amp["pairs"]), int(amp["subsets"])) == (5, 3)
    assert float(amp["mean"]) == pytest.approx(m, abs=1e-9)
    assert float(amp["ci_low"]) == pytest.approx(m - half, abs=1e-6)
    assert float(amp["ci_high"]) == pytest.approx(m + half, abs=1e-6)
    # λ = 1 on one draw: its two seeds that the baseline has, t over the pairs (df = 1)
    lam = paired["λ = 1", "baseline (λ = 0)"]
    diffs = [0.24 - 0.20, 0.21 - 0.22]
    half = math.tan(math.pi * 0.475) * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
    assert (int(lam["pairs"]), int(lam["subsets"])) == (2, 1)
    assert lam["interval"] == "t over pairs, one draw"
    assert float(lam["ci_high"]) - float(lam["ci_low"]) == pytest.approx(2 * half, abs=1e-6)
    # against the kernel prior: every row but the two references, over the pairs they share
    lpft = paired["LP-FT", "λ = 1"]
    assert (int(lpft["pairs"]), float(lpft["mean"])) == (2, pytest.approx(0.46 - 0.225))
    assert ("baseline (λ = 0)", "λ = 1") not in paired and ("λ = 1", "λ = 1") not in paired
    md = (out / "compare_paired.md").read_text()
    assert "| λ = 1 | baseline (λ = 0) | 2 | 1 | +0.015 |" in md and "not shown" in md
    assert (out / "compare_subsets.png").stat().st_size > 1000


def test_a_probe_after_a_shallower_block_has_a_row_of_its_own():
    """Catches probes at different depths (train_small.py --probe-after) stored under one row
    label, which mixes them in one row of collect_kernels.py --compare."""
    def label(*flags):
        args = train_small.parse_args(["--init-from", "models/model1_seed{seed}.pt", *flags])
        return train_small.row_label(args)["label"]
    assert label("--probe-after", "conv2") == "linear probe after conv2"
    full = "linear probe (transfer conv1-4, frozen conv1-4)"
    assert label("--freeze", *CONVS) == label("--probe-after", "conv4") == full


def collect_compare_fake_runs(folder):
    """Tiny fake checkpoints of stage 3-4 runs (conv1 weights, history, args as train_small.py and
    train_advreg.py store them) and a two-source bank; returns (bank path, {run name: path})."""
    small, advreg, convs = SMALL_ARGS, ADVREG_ARGS, CONVS
    probe = {"init_from": "runs/probe/seed{seed}/model.pt"}
    authors = {"init_from": "models/model1_seed{seed}.pt"}
    runs = {  # name: (its own fields, args changed from train_small.py's, final accuracies)
        "base0": ({}, {}, (0.2, 0.9, None)), "base1": ({}, {}, (0.3, 1.0, None)),
        "adv_lam0": ({"lam": 0.0}, {}, (0.4, 0.8, None)),
        "base_lr": ({}, {"lr": 0.01}, (0.1, 0.5, None)),
        "lam1": ({"lam": 1.0}, {}, (0.3, 0.9, None)), "lam05": ({"lam": 0.5}, {}, (0.3, 0.9, None)),
        "two": ({"lam": 1.0}, {"layers": ["conv1", "conv2"]}, (0.3, 0.9, None)),
        "amp": ({}, {"amp_epsilon": 0.3, "val_size": 50}, (0.3, 0.7, 0.5)),
        "bank_init": ({}, {"init_bank": "bank.pt"}, (0.3, 0.9, None)),
        "lpft": ({}, {**probe, "transfer": convs + ["fc"]}, (0.6, 1.0, None)),
        "probe": ({}, {**authors, "transfer": convs, "freeze": convs}, (0.5, 0.9, None)),
        "tune": ({}, {**authors, "transfer": convs}, (0.55, 1.0, None)),
        "t1": ({}, {**authors, "transfer": ["conv1"]}, (0.3, 0.9, None)),
        "t1f1": ({}, {**authors, "transfer": ["conv1"], "freeze": ["conv1"]}, (0.3, 0.9, None)),
        "t12": ({}, {**authors, "transfer": ["conv2", "conv1"]}, (0.3, 0.9, None)),
        "unfinished": ({"epoch": 2}, {}, (0.3, 0.9, None)),
    }
    g = torch.Generator().manual_seed(0)
    paths = {}
    for name, (fields, changed, (test_acc, train_acc, val_acc)) in runs.items():
        history = {"test_acc": [0.1, test_acc], "train_acc": [0.5, train_acc]}
        if val_acc is not None:
            history["val_acc"] = [0.2, val_acc]
        ckpt = {"arch": "PaperCNN", "epoch": 5, "history": history, "format": 2,
                "model": {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g)}}
        ckpt["label"], ckpt["row_order"] = STORED_ROWS.get(name, STORED_ROWS["base"])
        if "lam" in fields:  # train_advreg.py's: its λ and bank initialization, no "epoch"
            del ckpt["epoch"]
            history["epoch_done"] = 5
            ckpt.update(bank_init=False, args={**advreg, **changed})
        else:
            ckpt["args"] = {**small, **changed}
        ckpt.update(fields)
        paths[name] = folder / f"{name}.pt"
        torch.save(ckpt, paths[name])
    bank = {"kernels": torch.randn(2 * 192, 7, 7, generator=g), "layer": "conv1",
            "kernel_size": 7, "source_counts": [192, 192]}
    torch.save(bank, folder / "bank.pt")
    return folder / "bank.pt", paths


def test_collect_compare_labels_rows_and_accuracy_columns(tmp_path, capsys):
    """In-process, on fake checkpoints. Catches: two configurations mixed in one row (runs that
    differ in --lr, in the layers transferred or frozen), the row order rule broken, the train /
    val accuracy columns missing or averaged wrong, absent values not shown as "-", an
    unfinished run counted."""
    bank, paths = collect_compare_fake_runs(tmp_path)
    out = tmp_path / "cmp"
    collect_kernels.main(["--compare", *map(str, paths.values()), "--bank", str(bank),
                          "--out", str(out)])
    assert "left out:" in capsys.readouterr().out
    lines = (out / "compare.md").read_text().splitlines()
    header = [c.strip() for c in next(r for r in lines if r.startswith("| config")).split("|")]
    rows = {cells[1]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in r.split("|")] for r in lines if r.startswith("| ")
             and not r.startswith("| config"))}
    expected = ["baseline (λ = 0), lr 0.002", "baseline (λ = 0), lr 0.01", "AMP ε = 0.3",
                "λ = 0.5", "λ = 1", "λ = 1, conv1+conv2", "baseline (λ = 0), conv1 from bank",
                "transfer conv1, frozen conv1", "transfer conv1", "transfer conv1+conv2",
                "linear probe (transfer conv1-4, frozen conv1-4)", "fine-tune (transfer conv1-4)",
                "LP-FT", "bank (2 sources)"]
    assert list(rows) == expected  # every configuration its own row, in the documented order
    # two train_small.py baselines and train_advreg.py's λ = 0 (same flags) form one row
    base = rows["baseline (λ = 0), lr 0.002"]
    assert base["runs"] == "3" and base["final acc"] == "0.300 ± 0.100"
    assert base["train acc"] == "0.900 ± 0.100" and base["val acc"] == "-"
    assert rows["AMP ε = 0.3"]["val acc"] == "0.500 ± 0.000"
    assert rows["LP-FT"]["train acc"] == "1.000 ± 0.000"
    bank_row = rows["bank (2 sources)"]
    assert (bank_row["train acc"], bank_row["near-zero kernels"]) == ("-", "0.000")
    # the Frechet distance's floors: 30 seeded draws of a run's count of bank kernels, each
    # against the whole bank and against the rest (catches the in- and out-of-sample floors
    # swapped, the draws not seeded, the rest's statistics taken from the whole bank)
    kernels, std = load(bank)["kernels"].float(), collect_kernels.standardize_kernels
    g, floors = torch.Generator().manual_seed(0), ([], [])
    for _ in range(30):
        perm = torch.randperm(len(kernels), generator=g)
        for floor, reference in zip(floors, (kernels, kernels[perm[192:]])):
            floor.append(collect_kernels.frechet_distance(std(kernels[perm[:192]]), std(reference)))
    inside, outside = (torch.tensor(f, dtype=torch.float64) for f in floors)
    assert (f"for 192 kernels (30 draws of that many bank kernels): against the whole bank "
            f"{inside.mean():.3f} ± {inside.std():.3f}, against the rest of it "
            f"{outside.mean():.3f} ± {outside.std():.3f}.") in " ".join(lines)
    csv_rows = list(csv.DictReader(open(out / "compare.csv")))
    assert len(csv_rows) == len(paths) - 1  # one row per finished checkpoint
    amp = next(r for r in csv_rows if r["model"] == str(paths["amp"]))
    assert float(amp["final_train_acc"]) == 0.7 and float(amp["final_val_acc"]) == 0.5
    for fig in ("compare.png", "compare_pca.png", "compare_metrics.png", "compare_ladder.png"):
        assert (out / fig).stat().st_size > 1000
    # without a validation split in any run, the table has no val acc column
    collect_kernels.main(["--compare", str(paths["base0"]), str(paths["t1"]), "--bank",
                          str(bank), "--out", str(tmp_path / "cmp2")])
    table = (tmp_path / "cmp2" / "compare.md").read_text()
    assert "| train acc |" in table and "val acc" not in table
    assert "| baseline (λ = 0) | 1 |" in table  # no flag differs: no suffix
    torch.save({**load(paths["t1"]), "format": 1}, tmp_path / "old.pt")  # before rows were kept
    assert "checkpoint format 1, not 2" in user_error(capsys, collect_kernels.main, "--compare",
                                                      tmp_path / "old.pt", "--bank", bank)
    unmarked = {k: v for k, v in load(paths["t1"]).items() if k != "format"}  # stored no format
    torch.save(unmarked, tmp_path / "older.pt")
    assert "checkpoint format 1, not 2" in user_error(capsys, collect_kernels.main, "--compare",
                                                      tmp_path / "older.pt", "--bank", bank)
    said = user_error(capsys, collect_kernels.main, "--compare", tmp_path / "no/*/model.pt")
    assert "no/*/model.pt: no such file (a pattern that matched none?)" in said  # not "corrupt"

# ----------------------------------------------------------------------------- the microscope
def microscope_cnn(classes=10):
    """A random PaperCNN in train mode with BatchNorm running statistics far from any batch's, so
    that a forward pass in train mode computes something else than in eval mode; and its copy in
    eval mode for the plain-torch reference."""
    torch.manual_seed(0)
    cnn = collect_kernels.PaperCNN(classes)
    for m in cnn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.3, 3.0)
    return cnn.train(), copy.deepcopy(cnn).eval()


def microscope_batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def plain_loss_gradient(reference, x, y):
    """Plain torch: the loss of the eval-mode CNN at pixels x, normalized with mean 0.5 and std
    0.5 as in training, and its gradient with respect to x."""
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(reference((x - 0.5) / 0.5), y, reduction="sum")
    loss.backward()
    return loss.item(), x.grad


def test_ex12_fgsm_step_is_the_sign_step_and_raises_the_loss():
    """Catches: a sign flip (the step lowers the loss), no clamp to [0, 1], the CNN not in eval
    mode or not fed the training normalization (another gradient than the reference's)."""
    cnn, reference = microscope_cnn()
    x, y = microscope_batch()
    eps = 8 / 255
    x_adv = collect_kernels.fgsm(collect_kernels.on_pixels(cnn), x, y, eps)
    loss, grad = plain_loss_gradient(reference, x, y)
    assert ((x + eps * grad.sign() > 1) | (x + eps * grad.sign() < 0)).any()  # clamping matters
    assert torch.equal(x_adv, (x + eps * grad.sign()).clamp(0, 1))
    assert plain_loss_gradient(reference, x_adv, y)[0] > loss


def test_ex12_epsilon_zero_changes_nothing():
    """eps = 0: the attacked images are the images, and every accuracy is the clean eval-mode
    accuracy (here 0.5 exactly: half the labels are the eval-mode predictions). Catches: the CNN
    in train mode (batch statistics: other predictions), a wrong count."""
    cnn, reference = microscope_cnn()
    x, _ = microscope_batch(32)
    with torch.no_grad():
        predicted = reference((x - 0.5) / 0.5).argmax(1)
    y = torch.cat([predicted[:16], (predicted[16:] + 1) % 10])
    model = collect_kernels.on_pixels(cnn)
    assert torch.equal(collect_kernels.fgsm(model, x, y, 0.0), x)
    assert torch.equal(collect_kernels.pgd(model, x, y, 0.0, steps=3), x)
    accs = collect_kernels.robustness_row(model, x, y, epsilons=[0], steps=3, batch_size=10)
    assert accs == {"clean_acc": 0.5, "fgsm_0/255": 0.5, "pgd_0/255": 0.5}


def test_ex12_pgd_stays_in_the_eps_ball_and_in_the_image_range():
    """Catches: no projection onto the eps ball (10 steps of 2.5 eps / 10 go 2.5 eps far), no
    clamp to [0, 1], a step that lowers the loss."""
    cnn, reference = microscope_cnn()
    x, y = microscope_batch()
    eps = 8 / 255
    x_adv = collect_kernels.pgd(collect_kernels.on_pixels(cnn), x, y, eps, steps=10)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and (x_adv - x).abs().max() > eps / 2
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert plain_loss_gradient(reference, x_adv, y)[0] > plain_loss_gradient(reference, x, y)[0]


def test_ex13_saliency_map_is_the_class_score_gradient_with_the_inputs_shape():
    """|d S_y / d x|, max over the colour channels, against plain torch. Catches: the loss's
    gradient instead of the class score's, a sum or mean over channels, another class, train
    mode."""
    cnn, reference = microscope_cnn()
    x, y = microscope_batch(4)
    maps = collect_kernels.saliency(collect_kernels.on_pixels(cnn), x, y)
    assert maps.shape == (4, 32, 32)
    x_ref = x.clone().requires_grad_()
    reference((x_ref - 0.5) / 0.5)[torch.arange(4), y].sum().backward()
    assert torch.allclose(maps, x_ref.grad.abs().max(dim=1).values, rtol=1e-5, atol=1e-8)


def test_class_visualization_raises_the_class_score_from_noise():
    """Catches: descent instead of ascent, images outside [0, 1], another class optimized. (A
    random CNN's class scores are flat and not shift-invariant: its head is scaled up, the L2
    term and the jitter are off.)"""
    cnn, reference = microscope_cnn()
    for net in (cnn, reference):
        net.fc.weight.data.mul_(100)
    classes = torch.tensor([2, 7])
    images = collect_kernels.class_visualization(collect_kernels.on_pixels(cnn), classes,
                                                 steps=30, l2_reg=0.0, max_jitter=0,
                                                 seed=0)
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        before = reference((noise - 0.5) / 0.5)[torch.arange(2), classes]
        after = reference((images - 0.5) / 0.5)[torch.arange(2), classes]
        others = reference((images - 0.5) / 0.5) - reference((noise - 0.5) / 0.5)
    gain = after - before
    assert (gain > 1).all(), gain  # and more than any other class's score
    assert torch.equal(others.argmax(1), classes), others


def test_microscope_end_to_end_rows_figures_and_bad_input(tiny_data, pretrained, authors_models,
                                                         gan_data, tmp_path, capsys):
    """--compare ... --test-data: a csv row per run, a table row per configuration, both figures;
    the authors' (10-class) fakes are attacked and visualized. Catches: a run left out, rows mixed,
    the attack subset not the seeded one or the CNN in train mode (clean accuracy recomputed)."""
    _, banks = pretrained
    common = ["--data", str(tiny_data), "--per-class", "2", "--epochs", "2", "--eval-every", "1"]
    train_small.main([*common, "--seeds", "0", "1", "--out", str(tmp_path / "base")])
    train_small.main([*common, "--amp-epsilon", "0.1", "--seeds", "0", "1",
                      "--out", str(tmp_path / "amp")])
    runs = sorted(str(p) for p in tmp_path.glob("*/seed*/model.pt"))  # amp/, then base/
    runs += sorted(str(p) for p in authors_models.glob("*.pt"))
    out = tmp_path / "cmp"
    look = ["--bank", str(banks / "conv1_7x7.pt"), "--test-data", str(tiny_data)]
    collect_kernels.main(["--compare", *runs, *look, "--attack-images", "8", "--out", str(out)])
    rows = list(csv.DictReader(open(out / "microscope.csv")))
    assert sorted(r["model"] for r in rows) == sorted(runs)
    attacks = ["clean_acc", "fgsm_1/255", "fgsm_2/255", "fgsm_4/255", "pgd_1/255", "pgd_2/255",
               "pgd_4/255"]
    assert list(rows[0])[2:] == ["subset", "seed", "images", *attacks]
    assert all(r["images"] == "8" for r in rows)
    # paired under attack: AMP - baseline run by run (seed 0 with seed 0, 1 with 1; one draw, so
    # t over the 2 pairs, df = 1), against the csv's own accuracies
    with open(out / "microscope_paired.csv") as f:
        paired = {r["metric"]: r for r in csv.DictReader(f)
                  if (r["configuration"], r["against"]) == ("AMP ε = 0.1", "baseline (λ = 0)")}
    assert sorted(paired) == sorted(attacks)
    acc = {(r["configuration"], r["seed"]): r for r in rows}
    for metric, p in paired.items():
        d = [float(acc["AMP ε = 0.1", s][metric]) - float(acc["baseline (λ = 0)", s][metric])
             for s in ("0", "1")]
        half = math.tan(math.pi * 0.475) * abs(d[0] - d[1]) / 2  # t(0.975, 1) * std / sqrt(2)
        assert (p["pairs"], p["subsets"]) == ("2", "1")
        assert float(p["mean"]) == pytest.approx(sum(d) / 2, abs=1e-9)
        assert float(p["ci_low"]) == pytest.approx(sum(d) / 2 - half, abs=1e-6)
        assert float(p["ci_high"]) == pytest.approx(sum(d) / 2 + half, abs=1e-6)
    paired_md = (out / "microscope_paired.md").read_text()
    clean = float(paired["clean_acc"]["mean"])  # the clean accuracy's cell, not "-"
    assert f"| AMP ε = 0.1 | baseline (λ = 0) | 2 | 1 | {clean:+.3f} [" in paired_md
    table = (out / "microscope.md").read_text()
    for config, count in (("baseline (λ = 0)", 2), ("AMP ε = 0.1", 2),
                          ("pretrained (cifar100 (the authors' models))", 2)):
        assert f"| {config} | {count} |" in table, table
    assert "| PGD-10 4/255 |" in table
    # the clean accuracy, recomputed: the first 8 test images in train_small.py's order, eval mode
    test = torchvision.datasets.ImageFolder(tiny_data / "test")
    pick = torch.randperm(len(test.samples), generator=torch.Generator().manual_seed(0))[:8]
    images = torch.stack([pil_to_tensor(test.loader(test.samples[i][0])) for i in pick.tolist()])
    model = train_small.PaperCNN(10).eval()
    model.load_state_dict(load(runs[0])["model"])
    with torch.no_grad():
        expected = (model(images.float() / 127.5 - 1).argmax(1) == torch.tensor(
            test.targets)[pick]).float().mean().item()
    assert float(next(r for r in rows if r["model"] == runs[0])["clean_acc"]) == expected
    for fig in ("microscope_saliency.png", "microscope_classes.png", "compare.md"):
        assert (out / fig).stat().st_size > 500
    # bad input: one line each, nothing written
    said = user_error(capsys, collect_kernels.main, "--compare", runs[0], "--bank",
                      banks / "conv1_7x7.pt", "--test-data", gan_data, "--out", tmp_path / "c3")
    assert "classifies 10 classes" in said and "3 class folders" in said
    assert not (tmp_path / "c3").exists()
    assert "--epsilons must be >= 0" in user_error(capsys, collect_kernels.main, "--compare",
                                                   *runs, *look, "--epsilons", "1", "-2")
    assert "--test-data is for --compare" in user_error(capsys, collect_kernels.main,
                                                        "--test-data", tiny_data)
    _, fakes = collect_compare_fake_runs(tmp_path)  # conv1 weights only
    said = user_error(capsys, collect_kernels.main, "--compare", fakes["base0"], *look,
                      "--out", tmp_path / "c4")
    assert "another architecture" in said and not (tmp_path / "c4").exists()


@pytest.mark.parametrize("module, argv", [
    (pretrain, ["--data", "~/d", "--out", "~/o", "--evaluate", "~/a.pt", "~/b.pt"]),
    (train_small, ["--data", "~/d", "--init-from", "~/m{seed}.pt", "--out", "~/o"]),
    (train_advreg, ["--data", "~/d", "--bank", "~/b.pt", "--init-bank", "~/i.pt"]),
    (collect_kernels, ["--checkpoints", "~/c", "--bank", "~/b.pt", "--out", "~/o"]),
    (gan_labs, ["dann", "--data", "~/d", "--target-patches", "~/t", "--out", "~/o"]),
    (gan_labs, ["memorization", "--run", "~/r"])])
def test_a_quoted_tilde_in_a_path_flag_is_the_home_folder(module, argv):
    """bash leaves ~ as it is inside quotes (T="--data ~/data/cifar10" in the docs): every path
    flag expands it (catches a path read as given: "neither cifar10 ... nor a folder")."""
    args, home = vars(module.parse_args(argv)), os.path.expanduser("~")
    flags = argv if argv[0].startswith("--") else argv[1:]  # after gan_labs.py's subcommand
    for flag, value in zip(flags[::2], flags[1::2]):
        got = args[flag[2:].replace("-", "_")]
        got = got[0] if isinstance(got, list) else got
        assert got == home + value[1:], (flag, got)


def test_bad_input_gives_one_clear_error(tiny_data, pretrained, tmp_path, capsys):
    ckpts, banks = pretrained
    said = user_error(capsys, pretrain.main, "--data", "imagenet", "--out", tmp_path / "o")
    assert "neither cifar10, cifar100, mnist nor a folder" in said
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "find any class folder" in user_error(capsys, pretrain.main, "--data",
                                                 tmp_path / "empty", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert "invalid choice" in user_error(capsys, pretrain.main, "--device", "tpu")
    said = user_error(capsys, collect_kernels.main, "--checkpoints", tmp_path / "none*.pt")
    assert "no checkpoints match" in said and "pretrain.py" in said
    assert "unknown layer" in user_error(capsys, collect_kernels.main, "--checkpoints", ckpts,
                                         "--layers", "conv9")
    # a checkpoint of another architecture is refused, and the existing bank is not overwritten
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"arch": "PaperCNN", "model": {"conv1.weight": torch.zeros(32, 3, 5, 5)}},
               other / "seed0.pt")
    before = (banks / "conv1_7x7.pt").read_bytes()
    assert "another architecture" in user_error(capsys, collect_kernels.main, "--checkpoints",
                                                other, "--out", banks)
    assert (banks / "conv1_7x7.pt").read_bytes() == before
    # files that are not torch files at all, or torch files of another kind: one line each
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "seed0.pt").write_bytes(os.urandom(2000))
    said = user_error(capsys, collect_kernels.main, "--checkpoints", junk)
    assert "not a checkpoint" in said and "pretrain.py" in said
    assert "not a checkpoint" in user_error(capsys, pretrain.main, "--evaluate", junk / "seed0.pt",
                                            "--data", tiny_data, "--out", tmp_path / "e")
    torch.save({"weights": torch.zeros(3)}, other / "foreign.pt")
    assert "not a checkpoint" in user_error(capsys, collect_kernels.main, "--checkpoints",
                                            other / "foreign.pt")
    small = ["--data", tiny_data, "--per-class", 2, "--epochs", 1]
    for bank in (junk / "seed0.pt", other / "foreign.pt"):  # random bytes, a foreign torch file
        said = user_error(capsys, train_small.main, *small, "--init-bank", bank,
                          "--out", tmp_path / "s")
        assert "not a kernel bank" in said and "collect_kernels.py" in said
    nan_bank = tmp_path / "nan_bank.pt"  # a bank whose kernels are not finite: refused on loading
    torch.save({"kernels": torch.full((10, 7, 7), float("nan"))}, nan_bank)
    assert "non-finite" in user_error(capsys, train_small.main, *small, "--init-bank", nan_bank,
                                      "--out", tmp_path / "s")
    unnamed = tmp_path / "unnamed_bank.pt"  # kernels, but no layer to read the runs at
    torch.save({"kernels": torch.randn(10, 7, 7)}, unnamed)
    assert "names no layer" in user_error(capsys, collect_kernels.main, "--compare",
                                          ckpts / "seed0.pt", "--bank", unnamed)
    assert not (tmp_path / "s").exists()
    (tmp_path / "s" / "seed0").mkdir(parents=True)  # a run folder whose checkpoint is corrupt
    (tmp_path / "s" / "seed0" / "model.pt").write_bytes(os.urandom(2000))
    assert "damaged? Use another --out" in user_error(capsys, train_small.main, *small,
                                                      "--out", tmp_path / "s")


# ----------------------------------------------------------------------------- stage 3 and AMP
def test_train_small_end_to_end_and_bank_init(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    out = tmp_path / "small"
    run("train_small.py", "--data", tiny_data, "--per-class", 4, "--seeds", 0, 1, "--epochs", 3,
        "--eval-every", 2, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test_acc"]) == {"0", "1"} and set(summary["train_acc"]) == {"0", "1"}
    for seed in (0, 1):
        rows = list(csv.DictReader(open(out / f"seed{seed}" / "metrics.csv")))
        assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "test_acc"] and len(rows) == 3
        assert rows[0]["test_acc"] == "" and rows[1]["test_acc"] != ""  # evaluated at 2 and 3
        assert 0 <= float(rows[2]["train_acc"]) <= 1 and rows[2]["train_acc"] != ""
        for fig in ("test_acc.png", "kernels.png"):
            assert (out / f"seed{seed}" / fig).stat().st_size > 1000
        ckpt = load(out / f"seed{seed}" / "model.pt")
        assert ckpt["arch"] == "PaperCNN" and ckpt["epoch"] == 3 and ckpt["seed"] == seed
        assert (ckpt["label"], ckpt["row_order"]) == ("baseline (λ = 0)", [0, 0, 0, 0.0])
        assert ckpt["model"]["fc.weight"].shape == (10, 256)
    # --init-bank: at initialization every conv1 kernel is one of the bank's kernels
    bank = train_small.load_bank(str(banks / "conv1_7x7.pt"), kernel_size=7)["kernels"]
    model = train_small.PaperCNN(10)
    train_small.init_conv1_from_bank(model, bank, seed=0)
    kernels = model.conv1.weight.detach().reshape(-1, 1, 49)
    assert (kernels == bank.reshape(1, -1, 49)).all(dim=2).any(dim=1).all()


def amp_setup():
    torch.manual_seed(0)
    model = train_small.PaperCNN(10)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    loss_fn = lambda: F.cross_entropy(model(train_small.normalize(images)), labels)  # noqa: E731
    return model, loss_fn, images, labels


def test_ex09_amp_perturbation_stays_in_the_ball_and_ascends():
    """delta is not zero: it sits on the ball's surface (the projection is active for these
    small radii) and one ascent step strictly raises the loss (catches a no-op perturbation)."""
    model, loss_fn, _, _ = amp_setup()
    params = list(model.parameters())
    loss_at_theta = loss_fn().item()
    for epsilon, inner_steps in ((0.05, 1), (0.05, 3), (1e-4, 2)):
        theta, delta = train_small.perturb_adversarially(params, loss_fn, epsilon, 1.0, inner_steps)
        norm = torch.sqrt(sum((d ** 2).sum() for d in delta)).item()
        assert norm == pytest.approx(epsilon, rel=1e-4)
        moved = torch.sqrt(sum(((p - t) ** 2).sum() for p, t in zip(params, theta))).item()
        assert moved == pytest.approx(norm, rel=1e-3)  # the parameters sit at theta + delta
        if inner_steps == 1:  # on a fixed batch, one ascent step raises the loss
            assert loss_fn().item() > loss_at_theta
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)


def test_ex09_amp_with_epsilon_zero_is_the_plain_update():
    """The whole state: parameters, optimizer state, and BatchNorm's running statistics, which
    AMP's inner forward pass updates once more (as the AMP authors' code does): equal to a plain
    step whose batch went through the network once before (catches any change of the step)."""
    states = []
    for amp in (True, False):
        model, _, images, labels = amp_setup()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        args = train_small.parse_args(["--amp-epsilon", "0"] if amp else [])
        if not amp:
            with torch.no_grad():
                model(train_small.normalize(images))  # the second pass BatchNorm sees under AMP
        train_small.train_step(model, optimizer, images, labels, args)
        states.append((model.state_dict(), optimizer.state_dict()["state"]))
    (model_a, opt_a), (model_b, opt_b) = states
    for key, value in model_a.items():
        assert torch.equal(value, model_b[key]), key
    for i, s in opt_a.items():
        assert all(torch.equal(v, opt_b[i][k]) for k, v in s.items()), i


def test_amp_run_with_bank_init_and_the_compare_table(tiny_data, pretrained, tmp_path, capsys):
    _, banks = pretrained
    common = ["--data", tiny_data, "--per-class", 2, "--epochs", 2, "--eval-every", 1]
    run("train_small.py", *common, "--out", tmp_path / "plain")
    run("train_small.py", *common, "--amp-epsilon", 0.1, "--amp-inner-steps", 2, "--init-bank",
        banks / "conv1_7x7.pt", "--seeds", 0, 1, "--out", tmp_path / "amp")
    ckpt = load(tmp_path / "amp" / "seed0" / "model.pt")
    assert ckpt["args"]["amp_epsilon"] == 0.1 and ckpt["label"] == "AMP ε = 0.1, conv1 from bank"
    run("collect_kernels.py", "--compare", tmp_path / "plain" / "seed0" / "model.pt",
        *sorted((tmp_path / "amp").glob("seed*/model.pt")), "--bank", banks / "conv1_7x7.pt",
        "--out", tmp_path / "cmp")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| baseline (λ = 0) | 1 |" in table
    assert "| AMP ε = 0.1, conv1 from bank | 2 |" in table
    assert len((tmp_path / "cmp" / "compare.csv").read_text().strip().splitlines()) == 1 + 3
    for fig in ("compare.png", "compare_pca.png"):
        assert (tmp_path / "cmp" / fig).stat().st_size > 1000
    assert "--amp-epsilon must be >= 0" in user_error(capsys, train_small.main, *common,
                                                      "--amp-epsilon", -1)


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_data, tmp_path, capsys):
    common = ["--data", tiny_data, "--per-class", 2, "--eval-every", 1, "--log-every", 1]
    said = user_error(capsys, train_small.main, *common, "--epochs", 2, "--lr", 1e38,
                      "--out", tmp_path / "a")
    assert "diverged" in said and "epoch 1" in said and "--lr" in said
    assert not (tmp_path / "a" / "seed0" / "model.pt").exists()
    # one good epoch, then a learning rate that blows up (a resumed run takes the checkpoint's)
    train_small.main([str(a) for a in common] + ["--epochs", "1", "--amp-epsilon", "0.1",
                                                 "--out", str(tmp_path / "b")])
    ckpt_path = tmp_path / "b" / "seed0" / "model.pt"
    ckpt = load(ckpt_path)
    ckpt["optimizer"]["param_groups"][0]["lr"] = 1e38
    torch.save(ckpt, ckpt_path)
    before = ckpt_path.read_bytes()
    said = user_error(capsys, train_small.main, *common, "--epochs", 2, "--amp-epsilon", 0.1,
                      "--out", tmp_path / "b")
    assert "diverged" in said and "epoch 2" in said and "--lr or --amp-epsilon" in said
    assert ckpt_path.read_bytes() == before
    # train_advreg.py stops the same way (its loss is checked at every evaluation)
    banks = tmp_bank(tmp_path, torch.randn(300, 7, 7))
    said = user_error(capsys, train_advreg.main, *common, "--epochs", 2, "--lr", 1e38,
                      "--bank", banks, "--d-batch", 16, "--out", tmp_path / "c")
    assert "diverged" in said and "epoch 1" in said and "--lam" in said
    assert not (tmp_path / "c" / "lam1_seed0" / "model.pt").exists()


def test_probe_after_conv2_trains_only_a_head_on_conv2s_pooled_features(tiny_data, pretrained,
                                                                         tmp_path, capsys):
    """Seed 003's transfer lab, Q8: --probe-after conv2 trains a 128-wide head on the pooled
    output of the pretrained conv1-conv2 blocks, which do not move (weights and BatchNorm
    statistics); its logits equal a plain-torch forward to conv2's block. --probe-after conv4 is
    the linear probe, bit for bit. Catches a probe that trains or runs past its block, a head of
    the wrong width, or BatchNorm statistics that move."""
    ckpts, _ = pretrained
    common = ["--data", tiny_data, "--per-class", 2, "--epochs", 2, "--eval-every", 1,
              "--init-from", ckpts / "seed{seed}.pt", "--threads", 1]
    train_small.main([str(a) for a in common + ["--probe-after", "conv2", "--out",
                                                tmp_path / "conv2"]])
    source = load(ckpts / "seed0.pt")["model"]
    ckpt = load(tmp_path / "conv2" / "seed0" / "model.pt")
    after = ckpt["model"]
    assert ckpt["label"] == "linear probe after conv2" and ckpt["args"]["freeze"] == list(
        train_small.LAYERS[:4])
    for key, value in source.items():  # every block frozen, BatchNorm statistics included
        if not key.startswith("fc."):
            assert torch.equal(value, after[key]), key
    assert after["fc.weight"].shape == (10, 128)
    torch.manual_seed(0)
    start = train_small.Probe(10, "conv2").fc.weight  # the head's init for seed 0 ...
    assert not torch.equal(start, after["fc.weight"])  # ... has trained
    model = train_small.Probe(10, "conv2")
    model.load_state_dict(after)
    x = torch.randn(4, 3, 32, 32)

    def block(x, i, stride, pad):
        w = after[f"conv{i}.weight"]
        x = F.conv2d(x, w, stride=stride, padding=pad)
        x = F.batch_norm(x, after[f"bn{i}.running_mean"], after[f"bn{i}.running_var"],
                         after[f"bn{i}.weight"], after[f"bn{i}.bias"], eps=1e-5)
        return F.relu(x)
    pooled = block(block(x, 1, 2, 3), 2, 2, 2).mean(dim=(2, 3))
    want = pooled @ after["fc.weight"].T + after["fc.bias"]
    assert torch.allclose(model.eval()(x), want, atol=1e-5)
    # conv4: the existing linear probe (--freeze conv1 conv2 conv3 conv4), bit for bit
    train_small.main([str(a) for a in common + ["--probe-after", "conv4", "--out",
                                                tmp_path / "conv4"]])
    train_small.main([str(a) for a in common + ["--freeze", "conv1", "conv2", "conv3", "conv4",
                                                "--out", tmp_path / "probe"]])
    a, b = (load(tmp_path / n / "seed0" / "model.pt")["model"] for n in ("conv4", "probe"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # bad input: one line, nothing written
    for flags in (["--freeze", "conv1"], ["--transfer", "conv1"]):
        said = user_error(capsys, train_small.main, *common, "--probe-after", "conv1", *flags,
                          "--out", tmp_path / "x")
        assert "--probe-after needs --init-from" in said and "leave them out" in said
    said = user_error(capsys, train_small.main, "--data", tiny_data, "--probe-after", "conv1",
                      "--out", tmp_path / "x")
    assert "--probe-after needs --init-from" in said
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- stage 4
def test_train_advreg_sweep_end_to_end_resume_and_gif(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    out = tmp_path / "advreg"
    common = ["--data", tiny_data, "--bank", banks / "conv1_7x7.pt", "--per-class", 4,
              "--batch-size", 16, "--d-batch", 32, "--eval-every", 1, "--log-every", 1,
              "--gif-every", 1, "--out", out]
    run("train_advreg.py", *common, "--lam", 0, 0.5, "--seeds", 0, 1, "--epochs", 1)
    proc = run("train_advreg.py", *common, "--lam", 0, 0.5, "--seeds", 0, 1, "--epochs", 2,
               "--init-bank", banks / "conv1_7x7.pt")
    assert "lam0.5_seed0: resuming" in proc.stdout
    assert "collect_kernels.py --compare" in proc.stdout  # the table's command
    iters = 3 * 2  # 40 images / batch 16 = 3 steps per epoch, 2 epochs
    rows = list(csv.DictReader(open(out / "lam0.5_seed0" / "metrics.csv")))
    assert list(rows[0])[2:7] == list(train_advreg.LOG_COLUMNS) and len(rows) == iters
    ckpt = load(out / "lam0.5_seed0" / "model.pt")  # the CSV's columns are the logged ones
    assert [float(rows[-1][c]) for c in train_advreg.LOG_COLUMNS] == pytest.approx(
        ckpt["log"][-1].tolist(), abs=1e-5)
    assert rows[-1]["test_acc"] != "" and rows[-1]["train_acc"] != ""  # the last evaluation
    for fig in ("losses.png", "d_outputs.png", "test_acc.png", "kernels_conv1.png"):
        assert (out / "lam0.5_seed0" / fig).stat().st_size > 1000
    summary = json.loads((out / "lam0.5_seed0" / "summary.json").read_text())
    stored = load(out / "lam0.5_seed0_bankinit" / "model.pt")  # its table row, stored by the run
    assert (stored["label"], stored["row_order"]) == ("λ = 0.5, conv1 from bank", [2, True, 0, 0.5])
    # the kernel metrics of the final conv1 against the bank, standardized (the metrics' own
    # values: the closed-form tests below); catches another layer, the init, raw kernels
    kernels, bank = ckpt["model"]["conv1.weight"].reshape(-1, 7, 7), load(
        banks / "conv1_7x7.pt")["kernels"]
    assert summary["conv1_frechet"] == pytest.approx(collect_kernels.frechet_distance(
        collect_kernels.standardize_kernels(kernels), collect_kernels.standardize_kernels(bank)))
    assert summary["conv1_low_freq"] == pytest.approx(collect_kernels.low_freq_share(kernels))
    assert summary["final_train_acc"] == ckpt["history"]["train_acc"][-1]
    # D over the last 10 % of the 6 iterations: the last one; this run's own init; its time
    d_real = ckpt["log"][-1][train_advreg.LOG_COLUMNS.index("d_real")].item()
    assert summary["d_real_last10pct"] == pytest.approx(d_real, abs=1e-6)
    assert summary["init"] == "default" and summary["seconds"] > 0
    # lam = 0 has no discriminator: its D columns are empty (NaN in the CSV, null in the JSON)
    assert "nan" in (out / "lam0_seed0" / "metrics.csv").read_text().splitlines()[1]
    assert json.loads((out / "lam0_seed0" / "summary.json").read_text())["d_real_last10pct"] is None
    lam0_lines = [l for l in proc.stdout.splitlines() if l.startswith("lam0_seed0 | ")]
    assert lam0_lines and not any("nan" in l for l in lam0_lines)  # no D: no "D(real) nan"
    assert any("D(real)" in l for l in proc.stdout.splitlines() if l.startswith("lam0.5_seed0"))
    # --gif-every 1: one frame per epoch, the same across the interruption, both lams side by side
    frames = load(out / "lam0.5_seed0" / "model.pt")["frames"]
    assert len(frames) == 2 and frames[0].shape == (192, 7, 7)
    with PIL.Image.open(out / "kernels_seed1.gif") as gif:
        assert gif.n_frames == 2
    # the comparison table: one row per configuration; a run that is not finished is left out
    ckpt = load(out / "lam0.5_seed1" / "model.pt")
    ckpt["args"]["epochs"] = 5  # as if it had been stopped at epoch 2 of 5
    torch.save(ckpt, out / "lam0.5_seed1" / "model.pt")
    proc = run("collect_kernels.py", "--compare", *sorted(out.glob("*/model.pt")), "--bank",
               banks / "conv1_7x7.pt", "--out", tmp_path / "cmp")
    assert "left out:" in proc.stdout and "lam0.5_seed1" in proc.stdout
    table = (tmp_path / "cmp" / "compare.md").read_text()
    rows = ["| baseline (λ = 0) | 2 |", "| λ = 0.5 | 1 |",  # in this order: baseline, λ up,
            "| baseline (λ = 0), conv1 from bank | 2 |",  # then the bank-initialized runs
            "| λ = 0.5, conv1 from bank | 2 |"]
    assert [table.index(row) for row in rows] == sorted(table.index(row) for row in rows)
    assert (tmp_path / "cmp" / "compare_metrics.png").stat().st_size > 1000


def test_train_advreg_interrupted_run_ends_like_a_straight_one(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    common = ["--data", str(tiny_data), "--bank", str(banks / "conv1_7x7.pt"), "--per-class",
              "3", "--d-batch", "32", "--eval-every", "1", "--lam", "0.5"]
    train_advreg.main(common + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    train_advreg.main(common + ["--epochs", "1", "--out", str(tmp_path / "resumed")])
    train_advreg.main(common + ["--epochs", "2", "--out", str(tmp_path / "resumed")])
    straight = load(tmp_path / "straight" / "lam0.5_seed0" / "model.pt")
    resumed = load(tmp_path / "resumed" / "lam0.5_seed0" / "model.pt")
    for part in ("model", "d_conv1"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), key
    assert torch.equal(straight["log"].nan_to_num(), resumed["log"].nan_to_num())
    assert straight["history"]["test_acc"] == resumed["history"]["test_acc"]
    metrics = [(tmp_path / d / "lam0.5_seed0" / "metrics.csv").read_text()
               for d in ("straight", "resumed")]
    assert metrics[0] == metrics[1]


def test_train_advreg_two_layers_and_compare(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    out = tmp_path / "two"
    train_advreg.main(["--data", str(tiny_data), "--bank", str(banks / "conv1_7x7.pt"),
                       str(banks / "conv2_5x5.pt"), "--layers", "conv1", "conv2", "--per-class",
                       "2", "--epochs", "1", "--d-batch", "16", "--out", str(out)])
    ckpt = load(out / "lam1_seed0" / "model.pt")
    assert [k for k in ckpt if k.startswith("d_conv")] == ["d_conv1", "d_conv2"]
    assert (ckpt["label"], ckpt["row_order"]) == ("λ = 1, conv1+conv2", [2, False, 0, 1.0])
    # conv2's 8192 kernels: a fixed sample of 256, 16 x 16 of 5x5 at 8x, 4-px padding
    assert gan_png_shape(out / "lam1_seed0" / "kernels_conv2.png")[1:] == (708, 708)
    summary = json.loads((out / "lam1_seed0" / "summary.json").read_text())
    kernels = ckpt["model"]["conv2.weight"].reshape(-1, 5, 5)  # conv2's against conv2's bank
    assert summary["conv2_frechet"] == pytest.approx(collect_kernels.frechet_distance(
        collect_kernels.standardize_kernels(kernels),
        collect_kernels.standardize_kernels(load(banks / "conv2_5x5.pt")["kernels"])))
    collect_kernels.main(["--compare", str(out / "lam1_seed0" / "model.pt"), "--bank",
                          str(banks / "conv1_7x7.pt"), "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| bank (2 sources) |" in table
    collect_kernels.main(["--compare", str(out / "lam1_seed0" / "model.pt"), "--bank",
                          str(banks / "conv2_5x5.pt"), "--out", str(tmp_path / "cmp2")])
    table = (tmp_path / "cmp2" / "compare.md").read_text()  # the same run, judged on conv2
    assert table.startswith("Kernels of conv2 (5x5)") and "λ = 1, conv1+conv2 | 1 |" in table


def test_advreg_bad_input(pretrained, tiny_data, tmp_path, capsys):
    _, banks = pretrained
    out = tmp_path / "bad"
    base = ["--data", tiny_data, "--out", out]
    said = user_error(capsys, train_advreg.main, *base, "--bank", tmp_path / "missing.pt")
    assert "collect_kernels.py" in said and "missing.pt" in said
    assert "5x5" in user_error(capsys, train_advreg.main, *base, "--bank", banks / "conv2_5x5.pt")
    assert "--lam must be >= 0" in user_error(capsys, train_advreg.main, *base, "--bank",
                                              banks / "conv1_7x7.pt", "--lam", -1)
    assert "invalid choice: 'fc'" in user_error(capsys, train_advreg.main, *base, "--layers", "fc")
    nan_bank = tmp_path / "nan_bank.pt"
    torch.save({"kernels": torch.randn(300, 7, 7).index_fill_(0, torch.tensor([7]), math.inf)},
               nan_bank)
    said = user_error(capsys, train_advreg.main, *base, "--bank", nan_bank)
    assert "non-finite" in said and "nan_bank.pt" in said
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "any class folder" in user_error(capsys, train_advreg.main, *base, "--data",
                                            tmp_path / "empty", "--bank", banks / "conv1_7x7.pt")
    assert not out.exists()
    # a run folder made with other flags (here another D learning rate) is not continued
    common = ["--data", tiny_data, "--bank", banks / "conv1_7x7.pt", "--per-class", 2,
              "--d-batch", 16, "--out", tmp_path / "run"]
    train_advreg.main([str(a) for a in common] + ["--epochs", "1"])
    said = user_error(capsys, train_advreg.main, *common, "--epochs", 2, "--d-lr", 1e-3)
    assert "other flags" in said and "--d-lr" in said


def algorithm1_batch():
    torch.manual_seed(0)
    model, disc = train_advreg.PaperCNN(10), train_advreg.KernelDiscriminator()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    return model, disc, images, torch.randint(0, 10, (8,)), torch.Generator().manual_seed(0)


def test_ex02_ex03_generator_loss_reaches_conv1_only():
    """The generator loss's gradient reaches the regularized layer, not another one, nor D (D's
    forward and both steps' values: test_kernel_discriminator_is_the_notebooks_network and
    test_ex02_ex03_ex04_ex05_algorithm1_iteration_at_lambda_half_is_the_papers_step)."""
    model, disc, _, _, g = algorithm1_batch()
    fakes = train_advreg.sample_fakes(model, {"conv1": disc}, 64, g)
    d_fakes = train_advreg.judge({"conv1": disc}, fakes, "standardized")
    reg_loss = train_advreg.generator_loss(d_fakes)
    reg_loss.backward(inputs=list(model.parameters()), retain_graph=True)  # as train() does
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.conv2.weight.grad is None  # only the regularized layer is touched
    assert all(p.grad is None for p in disc.parameters())  # the generator step does not train D


def test_ex07_ex08_frechet_distance_and_low_frequency_share():
    torch.manual_seed(0)
    kernels = torch.randn(2000, 7, 7)
    flat = collect_kernels.standardize_kernels(kernels)
    assert abs(collect_kernels.frechet_distance(flat, flat)) < 1e-6
    distances = [collect_kernels.frechet_distance(flat, collect_kernels.standardize_kernels(
        kernels + noise * torch.randn(7, 7) * torch.ones(2000, 1, 1))) for noise in (0.0, 0.5, 2.0)]
    assert distances[0] < 1e-6 < distances[1] < distances[2]
    # white noise puts 1/6 of its energy at radius <= 0.25; a smooth blob much more
    assert collect_kernels.low_freq_share(kernels) == pytest.approx(1 / 6, abs=0.02)
    yy, xx = torch.meshgrid(torch.arange(7.0) - 3, torch.arange(7.0) - 3, indexing="ij")
    blob = torch.exp(-(xx ** 2 + yy ** 2) / 4)[None]
    assert collect_kernels.low_freq_share(blob) > 0.8
    # near-zero kernels: 3 of 10 shrunk to 5 % of their size, against a bank of the unshrunk ones
    bank = torch.randn(500, 7, 7)
    shrunk = bank[:10].clone()
    shrunk[:3] *= 0.05
    assert collect_kernels.near_zero_share(shrunk, bank) == pytest.approx(0.3)
    assert collect_kernels.near_zero_share(bank, bank) == 0


# ----------------------------------------------------------------------------- stages 1-4 values
# Each training step and metric against a few lines of plain torch or a closed form written here.
# Adam's first step is lr * sign(gradient): blind to a loss's scale. The steps are therefore
# compared through what Adam keeps of the gradient (exp_avg = (1 - beta1) * gradient), or taken
# with SGD, whose update is the gradient itself.
def assert_same_update(before, after, expected, rel=1e-4):
    """after - before equals expected - before, to `rel` of the largest expected move: a sign
    flip (2x the move) or a missing factor (>= 2x here) cannot meet it."""
    for key, b in before.items():
        if not b.is_floating_point():
            assert torch.equal(after[key], expected[key]), key
            continue
        move, want = after[key] - b, expected[key] - b
        scale = want.abs().max().item()
        assert torch.allclose(move, want, rtol=0, atol=rel * scale + 1e-12), (key, scale)


def test_ex02_ex03_ex04_ex05_algorithm1_iteration_at_lambda_half_is_the_papers_step(tiny_data,
                                                                                    tmp_path):
    """One iteration of train_advreg.py (10 images, batch 10, lambda = 0.5) against the paper's
    Algorithm 1 written here: the classifier's Adam gets the gradient of
    cls_loss + lam * (-log D(fake)), D's Adam the gradient of
    lam * (-log D(real) - log(1 - D(fake))), on standardized kernels. Catches a flipped sign or a
    missing lam in either step, the saturating generator loss."""
    lam, d_batch = 0.5, 32
    bank = torch.randn(300, 7, 7, generator=torch.Generator().manual_seed(5))
    flags = ["--data", str(tiny_data), "--per-class", "1", "--batch-size", "10", "--no-augment",
             "--d-batch", str(d_batch), "--bank", tmp_bank(tmp_path, bank)]
    train_advreg.main(flags + ["--epochs", "1", "--lam", str(lam), "--out", str(tmp_path / "r")])
    ckpt = load(tmp_path / "r" / "lam0.5_seed0" / "model.pt")
    # the reference, seed 0: the same init, batch and kernel draws as train() makes them
    args = train_advreg.parse_args(flags)
    data = train_advreg.load_small_data(args, torch.device("cpu"))
    torch.manual_seed(0)
    model = train_advreg.PaperCNN(10)
    perm = torch.randperm(10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1_000_003)
        disc = train_advreg.KernelDiscriminator()
    d_gen = torch.Generator().manual_seed(2_000_003)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d_before = {k: v.clone() for k, v in disc.state_dict().items()}
    x = data["train_x"][perm].float() / 127.5 - 1
    cls_loss = F.cross_entropy(model(x), data["train_y"][perm])
    fake = model.conv1.weight.reshape(192, 7, 7)[torch.randperm(192, generator=d_gen)[:d_batch]]

    def standardized(k):
        k = k - k.mean(dim=(1, 2), keepdim=True)
        return (k / (k.std(dim=(1, 2), keepdim=True) + 1e-8))[:, None]
    d_fake = disc(standardized(fake))
    reg_loss = -torch.log(d_fake).mean()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-3, betas=(0.5, 0.999))
    opt.zero_grad()
    (cls_loss + lam * reg_loss).backward(inputs=list(model.parameters()), retain_graph=True)
    opt.step()
    real = bank[torch.randint(300, (d_batch,), generator=d_gen)]
    d_real = disc(standardized(real))
    disc_loss = lam * (-torch.log(d_real).mean() - torch.log(1 - d_fake).mean())
    d_opt = torch.optim.Adam(disc.parameters(), lr=2e-4, weight_decay=1e-4, betas=(0.5, 0.999))
    d_opt.zero_grad()
    disc_loss.backward(inputs=list(disc.parameters()))
    d_opt.step()
    for ours, theirs, start, opt_ours, opt_theirs in (
            (ckpt["model"], model, before, ckpt["optimizer"], opt),
            (ckpt["d_conv1"], disc, d_before, ckpt["d_optimizer_conv1"], d_opt)):
        states = opt_theirs.state_dict()["state"]
        scale = max(s["exp_avg"].abs().max().item() for s in states.values())
        for (name, p), (i, state) in zip(theirs.named_parameters(), states.items()):
            m = state["exp_avg"]  # (1 - beta1) * (gradient + weight decay * weight)
            assert torch.allclose(opt_ours["state"][i]["exp_avg"], m, rtol=1e-4,
                                  atol=1e-6 * scale), name
            # the weights moved by lr * sign(gradient) (lr >= 2e-4) where it is not rounding noise
            # (D's conv biases sit before BatchNorm: their true gradient is 0)
            clear = m.abs() > 1e-3 * scale
            assert torch.allclose(ours[name][clear], p.detach()[clear], rtol=0, atol=1e-7), name
            assert not torch.equal(ours[name], start[name]), name
        for name, buffer in theirs.named_buffers():  # BatchNorm saw the same batches
            assert torch.allclose(ours[name].double(), buffer.double(), rtol=1e-5), name
    assert ckpt["log"][0, 1].item() == pytest.approx(reg_loss.item(), rel=1e-5)  # reg_loss column
    assert ckpt["log"][0, 2].item() == pytest.approx(disc_loss.item(), rel=1e-5)  # disc_loss


def test_ex09_amp_step_takes_the_gradient_at_theta_plus_delta_and_steps_from_theta():
    """train_small.train_step with epsilon > 0 (one inner step) against AMP written here: delta =
    inner_lr * grad L(theta), projected onto ||delta|| <= epsilon; the outer gradient is taken at
    theta + delta and applied (here by SGD) to theta. Catches the outer gradient taken at theta,
    the weights left at theta + delta, a descending inner step, a missing projection."""
    epsilon, inner_lr, lr = 0.5, 1.0, 0.5
    model, loss_fn, images, labels = amp_setup()
    reference = train_small.PaperCNN(10)
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = train_small.parse_args(["--amp-epsilon", str(epsilon), "--amp-inner-lr", str(inner_lr),
                                   "--amp-inner-steps", "1"])
    train_small.train_step(model, torch.optim.SGD(model.parameters(), lr=lr), images, labels, args)
    # the reference, in plain torch
    params = list(reference.parameters())
    x = images.float() / 127.5 - 1
    theta = [p.detach().clone() for p in params]
    grads = torch.autograd.grad(F.cross_entropy(reference(x), labels), params)  # at theta
    delta = [inner_lr * g for g in grads]
    norm = torch.sqrt(sum((d ** 2).sum() for d in delta))
    assert norm > epsilon  # the projection is active
    with torch.no_grad():
        for p, t, d in zip(params, theta, delta):
            p.copy_(t + d * epsilon / norm)
    outer = torch.autograd.grad(F.cross_entropy(reference(x), labels), params)  # at theta + delta
    with torch.no_grad():
        for p, t, g in zip(params, theta, outer):
            p.copy_(t - lr * g)
    assert_same_update(before, model.state_dict(), reference.state_dict())
    # the test can tell the two gradients apart: the plain step is far from AMP's
    plain = {k: v.clone() for k, v in before.items()}
    for (name, _), g in zip(reference.named_parameters(), grads):
        plain[name] = before[name] - lr * g
    move = model.state_dict()["conv1.weight"] - before["conv1.weight"]
    assert not torch.allclose(move, plain["conv1.weight"] - before["conv1.weight"], rtol=0,
                              atol=1e-2 * move.abs().max().item())


def test_kernel_discriminator_is_the_notebooks_network():
    """D's forward against the notebook's layers written in plain torch (two 3x3 convs with
    BatchNorm and LeakyReLU 0.2, global average pooling, a linear layer, a sigmoid): catches a
    lost sigmoid, another slope or pooling, another kernel size (the reference takes D's own
    weights, so their shapes are checked too)."""
    torch.manual_seed(0)
    disc = train_advreg.KernelDiscriminator()
    assert [tuple(p.shape) for p in disc.parameters()] == [
        (64, 1, 3, 3), (64,), (64,), (64,), (128, 64, 3, 3), (128,), (128,), (128,), (1, 128),
        (1,)]
    kernels = torch.randn(16, 1, 7, 7) * 3
    h = kernels
    for conv, bn in ((disc.conv1, disc.bn1), (disc.conv2, disc.bn2)):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        mean, var = h.mean(dim=(0, 2, 3), keepdim=True), h.var(dim=(0, 2, 3), unbiased=False,
                                                                 keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * bn.weight[:, None, None] + bn.bias[:, None, None]
        h = torch.where(h > 0, h, 0.2 * h)
    expected = 1 / (1 + torch.exp(-(h.mean(dim=(2, 3)) @ disc.fc.weight.T + disc.fc.bias)))
    assert torch.allclose(disc(kernels), expected[:, 0], rtol=1e-4, atol=1e-6)


def test_ex06_standardization_is_per_kernel():
    """collect_kernels.standardize_kernels and D's standardized input: each kernel minus its own
    mean, over its own (unbiased) std, with another scale and shift per kernel. Catches the mean
    or std taken over the whole bank (a global rescaling would pass a test of one scale)."""
    torch.manual_seed(0)
    base = torch.randn(6, 5, 5, dtype=torch.float64)  # float64: no rounding from the shifts
    scale = torch.tensor([0.01, 0.5, 1, 3, 20, 100.0], dtype=torch.float64)
    shift = torch.linspace(-4, 9, 6, dtype=torch.float64)
    kernels = base * scale[:, None, None] + shift[:, None, None]
    flat = base.reshape(6, -1)
    want = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    assert torch.allclose(collect_kernels.standardize_kernels(kernels), want, atol=1e-9)
    d_input = train_advreg.to_d_input(kernels, "standardized")
    assert d_input.shape == (6, 1, 5, 5)
    assert torch.allclose(d_input.reshape(6, -1), want, atol=1e-6)  # its 1e-8 guard: ~1e-6
    assert torch.equal(train_advreg.to_d_input(kernels, "raw")[:, 0], kernels)


def gaussian_samples(mean, cov, n, seed):
    """n rows whose sample mean and sample covariance are exactly `mean` and `cov`."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample cov = I
    return z @ torch.linalg.cholesky(cov).T + mean


def test_ex07_frechet_distance_of_gaussians_with_full_covariances_is_the_closed_form():
    """Two 4-d Gaussians, non-commuting full covariances (two 2x2 blocks, then one common
    rotation, which leaves the distance unchanged), means that differ in every coordinate. For a
    2x2 block, tr (C_a C_b)^1/2 = sqrt(tr(C_a C_b) + 2 sqrt(det C_a det C_b)). Both copies (stage 4
    and the GAN labs). Catches a lost mean term, tr(C_a^1/2 C_b^1/2) for the root (equal only
    for commuting covariances)."""
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    blocks_a = [f64([[2.0, 0.8], [0.8, 1.0]]), f64([[1.0, -0.3], [-0.3, 0.5]])]
    blocks_b = [f64([[1.0, 0.0], [0.0, 3.0]]), f64([[2.0, 0.9], [0.9, 1.5]])]
    mu_a, mu_b = f64([0.0, 1.0, -1.0, 2.0]), f64([0.5, -1.0, 0.0, 2.5])
    closed = ((mu_a - mu_b) ** 2).sum().item()
    for a, b in zip(blocks_a, blocks_b):
        root = math.sqrt((a @ b).trace() + 2 * math.sqrt(a.det() * b.det()))
        closed += (a.trace() + b.trace()).item() - 2 * root
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64))[0]
    cov_a, cov_b = (rotation @ torch.block_diag(*blocks) @ rotation.T
                    for blocks in (blocks_a, blocks_b))
    a = gaussian_samples(rotation @ mu_a, cov_a, 500, 1)
    b = gaussian_samples(rotation @ mu_b, cov_b, 300, 2)
    assert closed > 4  # the mean term (5.75) and the covariance term both count
    for module in (collect_kernels, gan_labs):
        assert module.frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
        assert module.frechet_distance(b, a) == pytest.approx(closed, rel=1e-9)


def test_ex08_low_frequency_share_of_cosines_and_a_constant():
    """7x7 cosines of known DFT, frequencies (fy, fx) in cycles per 7 pixels: (0, 1) has radius
    1/7 <= 0.25 cycles/pixel (low), (2, 0) and (2, 1) have 2/7 and sqrt(5)/7 > 0.25 (high).
    Kernel 1 = 3 cos(0, 1) + cos(2, 0) + 5: share 9/10 (the constant adds nothing); kernel 2 =
    10 cos(2, 1): share 0; their mean 0.45. Catches energy as |X| instead of |X|^2 (0.75), the
    mean not removed, the energy pooled over kernels (not a mean of shares), a floor on the
    energy that is not tiny (the share is scale-free: kernels of weight 1e-4 give the same)."""
    yy, xx = torch.meshgrid(*[torch.arange(7, dtype=torch.float64)] * 2, indexing="ij")

    def wave(fy, fx):
        return torch.cos(2 * math.pi * (fy * yy + fx * xx) / 7)
    kernels = torch.stack([3 * wave(0, 1) + wave(2, 0) + 5, 10 * wave(2, 1)])
    assert collect_kernels.low_freq_share(kernels[:1]) == pytest.approx(0.9, abs=1e-9)
    assert collect_kernels.low_freq_share(kernels[1:]) == pytest.approx(0.0, abs=1e-9)
    assert collect_kernels.low_freq_share(kernels) == pytest.approx(0.45, abs=1e-9)
    assert collect_kernels.low_freq_share(kernels - 5) == pytest.approx(0.45, abs=1e-9)
    assert collect_kernels.low_freq_share(kernels * 1e-4) == pytest.approx(0.45, abs=1e-9)


def test_near_zero_share_uses_the_banks_median_norm():
    """Bank norms 1, 10, 10, 10, 100 (median 10, mean 26.2): the threshold is 0.1 x 10 = 1, so of
    the model's norms 0.5, 0.9, 1.5, 2, 3 two are near zero (0.4). The model's own median (1.5)
    would say 0, the bank's mean 0.8. Catches the threshold from the wrong set or statistic."""
    g = torch.Generator().manual_seed(0)

    def with_norms(norms):
        k = torch.randn(len(norms), 5, 5, generator=g)
        return k / k.flatten(1).norm(dim=1)[:, None, None] * torch.tensor(norms)[:, None, None]
    bank, model = with_norms([1.0, 10, 10, 10, 100]), with_norms([0.5, 0.9, 1.5, 2, 3])
    assert collect_kernels.near_zero_share(model, bank) == pytest.approx(0.4)
    assert collect_kernels.near_zero_share(model, bank, fraction=0.25) == pytest.approx(0.8)


def test_group_stats_mean_and_sample_std():
    """The table's mean ± std by hand: 0.1, 0.2, 0.6 -> 0.3 ± 0.2646 (the sample std, n - 1; the
    population std would be 0.2160); a run without a value is left out of that metric; one run
    has std 0; a metric no run has is None."""
    def row(config, acc, val):
        r = dict.fromkeys(collect_kernels.METRICS)
        r.update(configuration=config, final_test_acc=acc, final_val_acc=val)
        return r
    rows = [row("a", 0.1, 0.5), row("b", 0.7, None), row("a", 0.2, None), row("a", 0.6, 0.9)]
    groups = collect_kernels.group_stats(rows)
    assert list(groups) == ["a", "b"]
    runs, stats = groups["a"]
    assert runs == 3
    assert stats["final_test_acc"] == pytest.approx((0.3, math.sqrt(0.07)))
    assert stats["final_val_acc"] == pytest.approx((0.7, math.sqrt(0.08)))
    assert groups["b"][1]["final_test_acc"] == pytest.approx((0.7, 0.0))
    assert groups["b"][1]["final_val_acc"] is None and stats["d_real"] is None


def test_init_bank_reaches_conv1_in_both_trainers_and_each_seed_draws_its_own(tiny_data,
                                                                               tmp_path):
    """--init-bank, through each trainer's main (with --lr 0, so the saved conv1 is the start):
    conv1's 192 kernels are the bank's, drawn without replacement by the run's seed, as written
    here; seeds 0 and 1 draw different ones; train_advreg.py's _bankinit rows get them and its
    default rows do not. Catches one draw for every seed."""
    bank = torch.randn(300, 7, 7, generator=torch.Generator().manual_seed(4))
    torch.save({"kernels": bank}, tmp_path / "bank.pt")
    common = ["--data", str(tiny_data), "--per-class", "1", "--epochs", "1", "--lr", "0",
              "--seeds", "0", "1", "--init-bank", str(tmp_path / "bank.pt")]
    train_small.main(common + ["--out", str(tmp_path / "small")])
    train_advreg.main(common + ["--lam", "0", "--bank", str(tmp_path / "bank.pt"),
                                "--out", str(tmp_path / "adv")])
    for seed in (0, 1):
        pick = torch.randperm(300, generator=torch.Generator().manual_seed(seed))[:192]
        want = bank[pick].reshape(64, 3, 7, 7)
        torch.manual_seed(seed)
        default = train_small.PaperCNN(10).state_dict()
        for path in (tmp_path / "small" / f"seed{seed}", tmp_path / "adv" /
                     f"lam0_seed{seed}_bankinit"):
            model = load(path / "model.pt")["model"]
            assert torch.equal(model["conv1.weight"], want), path
            assert torch.equal(model["conv2.weight"], default["conv2.weight"]), path
        plain = load(tmp_path / "adv" / f"lam0_seed{seed}" / "model.pt")["model"]
        assert torch.equal(plain["conv1.weight"], default["conv1.weight"])
    seed0, seed1 = (load(tmp_path / "small" / f"seed{s}" / "model.pt")["model"]["conv1.weight"]
                    for s in (0, 1))
    assert not torch.equal(seed0, seed1)


@pytest.mark.parametrize("layers,frozen,label", [
    (["conv2"], [], "transfer conv2"), (["conv1", "conv3"], ["conv1"], "transfer conv1+conv3, "
     "frozen conv1"), (["conv1", "conv2", "conv3", "conv4", "fc"], [], "LP-FT")])
def test_ex10_transfer_copies_exactly_the_named_layers(layers, frozen, label, tmp_path):
    """train_small.initialize from the flags, as train() calls it, from a checkpoint whose every
    tensor differs from a fresh init: each named layer (convN with its BatchNorm's weights and
    statistics; fc, the head, for LP-FT from a probe) equals the checkpoint's, every other tensor
    the seed's fresh init; exactly the --freeze layers get no gradient. Catches bnN left behind
    when convN is copied."""
    torch.manual_seed(99)
    source = train_small.PaperCNN(10)
    randomize_batchnorm(source)
    source = source.state_dict()
    (tmp_path / "seed3").mkdir()  # a train_small.py run's model.pt: LP-FT when fc comes along
    torch.save({"arch": "PaperCNN", "model": source}, tmp_path / "seed3" / "model.pt")
    args = train_small.parse_args(["--init-from", str(tmp_path / "seed{seed}" / "model.pt"),
                                   "--transfer", *layers] + (["--freeze", *frozen] if frozen
                                                              else []))
    assert train_small.row_label(args)["label"] == label  # its row in collect_kernels.py
    torch.manual_seed(3)
    model = train_small.PaperCNN(10)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    train_small.initialize(model, 3, args)
    named = [n for layer in layers for n in ([layer, layer.replace("conv", "bn")]
                                             if layer.startswith("conv") else [layer])]
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        copied = key.split(".")[0] in named
        assert torch.equal(value, source[key] if copied else fresh[key]), key
        assert copied or not torch.equal(value, source[key]), key
    frozen_names = {n for layer in frozen for n in (layer, layer.replace("conv", "bn"))}
    for key, p in model.named_parameters():
        assert p.requires_grad == (key.split(".")[0] not in frozen_names), key


# ----------------------------------------------------------------------------- throughput
@pytest.mark.skipif(not os.environ.get("THROUGHPUT_DATA"),
                    reason="a measurement: THROUGHPUT_DATA=PATH pytest -s -k throughput")
def test_throughput_tensor_pipeline_vs_dataloader():
    """Images/s of pretrain.py's loop (uint8 data on the device, batched crop + flip) against a
    plain ImageFolder + transforms + DataLoader loop, same model and batch, in one run."""
    data, steps, batch = os.environ["THROUGHPUT_DATA"], 60, 128
    train_x, train_y, _ = pretrain.load_split(data, "data", "train")

    def time_steps(batches):
        torch.manual_seed(0)
        model = pretrain.PaperCNN(10)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
        for step, (images, labels) in enumerate(batches):
            if step == 5:  # warm-up steps (allocator, DataLoader workers) are not timed
                t0 = time.time()
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == steps + 4:
                return steps * batch / (time.time() - t0)

    def tensor_pipeline():
        while True:
            perm = torch.randperm(len(train_x))
            for i in range(0, len(train_x) - batch + 1, batch):
                idx = perm[i:i + batch]
                yield pretrain.normalize(pretrain.augment(train_x[idx])), train_y[idx]

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = torchvision.datasets.ImageFolder(os.path.join(data, "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=2)
    ours, reference = time_steps(tensor_pipeline()), time_steps(iter(loader))
    print(f"\ntensor pipeline {ours:.0f} img/s, DataLoader + transforms (2 workers) "
          f"{reference:.0f} img/s: {ours / reference:.2f}x ({torch.get_num_threads()} threads)")
    assert ours > 0 and reference > 0


def user_error(capsys, main, *args):
    """A user's mistake, called in-process (no 5 s of imports per case): SystemExit, and the last
    line of what it says names the problem; returns that line."""
    module = sys.modules[main.__module__]
    with pytest.raises(SystemExit) as exit_info:  # a rewritten script: through its entry point
        getattr(module, "entry_point", lambda main, argv: main(argv))(main, [str(a) for a in args])
    code = exit_info.value.code
    said = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "error" in said, said
    return said


SCRIPTS = (pretrain, collect_kernels, train_small, train_advreg, gan_labs)


FENCE = "# ==== plumbing: skip on a first read; each copy the same, checked by test_smoke.py ===="
# below the fence, after the helpers that only some scripts need: the block all five share
BLOCK = "# ------------------------------------------------------------ in all five scripts, word for word"


def code_lines(source):
    """Lines that are code: not blank, not a comment, not inside a docstring."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(
                body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstrings)


OWN = {"parse_args", "main", "train", "write_run_outputs", "finish_run", "FREE_FLAGS",
       "RUN_FLAGS", "Progress", "plot_curves"}  # each script's own by design


def top_level_sources(source):
    """name -> source text of every top-level function, class and constant of a script."""
    lines, out = source.splitlines(), {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        out[name] = "\n".join(lines[start - 1:node.end_lineno])
    return out


def differing_copies(sources):
    """Names defined in more than one script (outside OWN) whose copies are not identical."""
    defined = collections.defaultdict(dict)
    for script, source in sources.items():
        for name, text in top_level_sources(source).items():
            defined[name][script] = text
    return {name: sorted(copies) for name, copies in defined.items()
            if name not in OWN and len(copies) > 1 and len(set(copies.values())) > 1}


def test_train_accuracy_is_the_accuracy_on_the_training_images(tiny_data, tmp_path):
    """The train_acc column is the eval-mode accuracy on exactly the 100 (here 20) training
    images: recomputed from the saved weights (catches a column computed on other images). With
    --curve-size 7 of the 50 test images, the last evaluation still takes all 50 (catches the
    final accuracy measured on the curve's sample)."""
    out = tmp_path / "acc"
    train_small.main(["--data", str(tiny_data), "--per-class", "2", "--epochs", "2",
                      "--eval-every", "2", "--curve-size", "7", "--out", str(out)])
    args = train_small.parse_args(["--data", str(tiny_data), "--per-class", "2"])
    data = train_small.load_small_data(args, torch.device("cpu"))
    model = train_small.PaperCNN(10)
    model.load_state_dict(load(out / "seed0" / "model.pt")["model"])
    history = load(out / "seed0" / "model.pt")["history"]
    assert history["train_acc"][-1] == train_small.evaluate(model, data["train_x"], data["train_y"])
    assert history["test_acc"][-1] == train_small.evaluate(model, data["test_x"], data["test_y"])
    assert len(data["test_x"]) == 50 and history["test_acc"][-1] != train_small.evaluate(
        model, data["test_x"][:7], data["test_y"][:7])  # the two can be told apart


def test_validation_split_is_disjoint_from_the_subset_and_the_test_set(tiny_data, capsys):
    args = train_small.parse_args(["--data", str(tiny_data), "--per-class", "3",
                                   "--val-size", "50"])
    data = train_small.load_small_data(args, torch.device("cpu"))
    assert len(data["train_x"]) == 30 and len(data["val_x"]) == 50
    flat = {k: set(map(tuple, data[k].flatten(1).tolist())) for k in ("train_x", "val_x", "test_x")}
    assert len(flat["val_x"]) == 50  # 50 distinct images (the generated images are all distinct)
    assert not flat["train_x"] & flat["val_x"] and not flat["val_x"] & flat["test_x"]
    same = train_small.load_small_data(args, torch.device("cpu"))  # the same split every time
    assert all(torch.equal(same[k], data[k]) for k in ("val_x", "train_x"))
    # the draws by value: the validation images by --subset-seed + 1 among the images outside
    # the subset, the test order by seed 0 (catches another seed, or an unseeded draw)
    all_x, all_y, _ = train_small.load_split(str(tiny_data), "data", "train")
    rest = torch.isin(torch.arange(len(all_y)), train_small.small_subset(all_y, 3, 0),
                      invert=True).nonzero().flatten()
    val = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(1))[:50]]
    assert torch.equal(data["val_x"], train_small.as_cifar_images(all_x[val]))
    test_x, _, _ = train_small.load_split(str(tiny_data), "data", "test")
    order = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
    assert torch.equal(data["test_x"], train_small.as_cifar_images(test_x[order]))
    said = user_error(capsys, train_small.main, "--data", tiny_data, "--per-class", 3,
                      "--val-size", 91)  # 120 train images - 30 = 90 outside the subset
    assert "--val-size 91" in said and "90" in said


def test_transfer_from_both_layouts_and_freezing(tiny_data, pretrained, authors_models, tmp_path,
                                                 capsys):
    ckpts, _ = pretrained
    common = ["--data", tiny_data, "--per-class", 2, "--epochs", 2, "--eval-every", 1]
    # ours: pretrain.py's checkpoint, all four convs frozen = the linear probe
    run("train_small.py", *common, "--init-from", ckpts / "seed{seed}.pt", "--freeze", "conv1",
        "conv2", "conv3", "conv4", "--seeds", 0, 1, "--out", tmp_path / "probe")
    for seed in (0, 1):
        source = load(ckpts / f"seed{seed}.pt")["model"]
        after = load(tmp_path / "probe" / f"seed{seed}" / "model.pt")["model"]
        for key, value in source.items():  # frozen weights and BatchNorm statistics do not move
            if not key.startswith("fc."):
                assert torch.equal(value, after[key]), key
        assert not torch.equal(source["fc.weight"], after["fc.weight"])  # the head trained
    # the authors' layout: conv1 transferred, then trained (not frozen): it moves
    train_small.main([str(a) for a in common] + ["--init-from",
                     str(authors_models / "model1_seed{seed}.pt"), "--transfer", "conv1",
                     "--out", str(tmp_path / "conv1")])
    names = {v: k for k, v in train_small.AUTHORS_LAYERS.items()}
    theirs = torch.load(authors_models / "model1_seed0.pt", weights_only=True)
    ours = load(tmp_path / "conv1" / "seed0" / "model.pt")["model"]
    assert not torch.equal(theirs[f"{names['conv1']}.weight"], ours["conv1.weight"])
    torch.manual_seed(123)  # not the fake authors' init: only the transferred layer may agree
    start = train_small.PaperCNN(10)
    train_small.transfer(start, train_small.read_checkpoint(
        str(authors_models / "model1_seed0.pt"))["model"], ["conv1"])
    assert torch.equal(start.conv1.weight, theirs[f"{names['conv1']}.weight"])
    assert torch.equal(start.bn1.running_var, theirs[f"{names['bn1']}.running_var"])
    assert not torch.equal(start.conv2.weight, theirs[f"{names['conv2']}.weight"])
    # bad input: one line each, nothing written
    other = tmp_path / "other.pt"
    torch.save({"arch": "PaperCNN", "model": {"conv1.weight": torch.zeros(32, 3, 5, 5)}}, other)
    said = user_error(capsys, train_small.main, *common, "--init-from", other,
                      "--out", tmp_path / "x")
    assert "not the paper's CNN" in said and "conv1.weight" in said
    hundred = tmp_path / "hundred.pt"
    torch.save({"arch": "PaperCNN", "model": pretrain.PaperCNN(100).state_dict()}, hundred)
    said = user_error(capsys, train_small.main, *common, "--init-from", hundred, "--transfer",
                      "conv1", "fc", "--out", tmp_path / "x")
    assert "100 classes" in said and "fc" in said
    assert "invalid choice" in user_error(capsys, train_small.main, *common, "--init-from", other,
                                          "--transfer", "conv5")
    assert "nothing would train" in user_error(capsys, train_small.main, *common, "--freeze",
                                               "conv1", "conv2", "conv3", "conv4", "fc")
    assert not (tmp_path / "x").exists()


def test_train_small_resumes_to_the_straight_runs_weights_and_refuses_other_flags(
        tiny_data, tmp_path, capsys):
    common = ["--data", str(tiny_data), "--per-class", "2", "--eval-every", "1"]
    train_small.main(common + ["--epochs", "3", "--out", str(tmp_path / "straight")])
    train_small.main(common + ["--epochs", "1", "--out", str(tmp_path / "resumed")])
    train_small.main(common + ["--epochs", "3", "--out", str(tmp_path / "resumed")])
    straight, resumed = [load(tmp_path / d / "seed0" / "model.pt") for d in ("straight", "resumed")]
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert straight["history"] == resumed["history"]
    # the same command again on a finished run: accepted, nothing more trained (catches a run
    # of exactly --epochs epochs refused as one of more)
    train_small.main(common + ["--epochs", "3", "--out", str(tmp_path / "straight")])
    again = load(tmp_path / "straight" / "seed0" / "model.pt")
    assert again["epoch"] == 3 and all(torch.equal(v, again["model"][k])
                                       for k, v in straight["model"].items())
    # another learning rate into the same folder: refused, naming the flag; nothing changes
    before = (tmp_path / "resumed" / "seed0" / "model.pt").read_bytes()
    said = user_error(capsys, train_small.main, *common, "--epochs", 4, "--lr", 0.1,
                      "--out", tmp_path / "resumed")
    assert "other flags" in said and "--lr 0.002" in said
    assert (tmp_path / "resumed" / "seed0" / "model.pt").read_bytes() == before
    # flags that cannot change the result stay free: more epochs, other threads, log interval
    train_small.main(common + ["--epochs", "4", "--log-every", "2", "--threads", "1",
                               "--out", str(tmp_path / "resumed")])
    assert load(tmp_path / "resumed" / "seed0" / "model.pt")["epoch"] == 4


def test_train_small_progress_line_has_the_epochs_mean_loss_and_the_flags_to_lower(
        tiny_data, tmp_path, monkeypatch, capsys):
    """Each progress line's loss is its epoch's mean over the training images, the value of
    metrics.csv (catches a sum), and its divergence hint names the flags to lower: --lr, with
    AMP --amp-epsilon too (catches a hint that names none)."""
    seen, text = [], train_small.progress_text
    monkeypatch.setattr(train_small, "progress_text", lambda *a: seen.append(a) or text(*a))
    for amp, flags in (([], "--lr"), (["--amp-epsilon", "0.5"], "--lr or --amp-epsilon")):
        out = tmp_path / flags[-3:]
        train_small.main(["--data", str(tiny_data), "--per-class", "2", "--epochs", "2",
                          "--eval-every", "2", "--log-every", "1", *amp, "--out", str(out)])
        history = load(out / "seed0" / "model.pt")["history"]
        assert [a[0] for a in seen] == pytest.approx(history["train_loss"], rel=1e-6)
        assert [a[4] for a in seen] == [flags, flags]
        assert capsys.readouterr().out.count("\nseed 0 | 2/2 | loss ") == 1
        seen.clear()
    assert text(10.0, {}, 2.3, 0.1, "--lr").endswith("diverging? lower --lr")


def test_a_full_disk_gives_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    """A real failed write (the file-size limit, as a full disk): one line, the previous checkpoint
    byte for byte, no temporary file."""
    import resource
    import signal

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    common = ["--data", tiny_data, "--per-class", 2, "--eval-every", 1, "--out", tmp_path / "r"]
    run("train_small.py", *common, "--epochs", 1)
    ckpt = tmp_path / "r" / "seed0" / "model.pt"
    before = ckpt.read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_small.py"),
                           *map(str, common), "--epochs", "2"], cwd=ROOT, capture_output=True,
                          text=True, env=env, preexec_fn=small_disk, timeout=120)
    assert_user_error(proc, "could not write", "model.pt", "last version is kept")
    assert ckpt.read_bytes() == before
    assert not list((tmp_path / "r").rglob("*.tmp*"))


def test_lambda_zero_is_the_baseline_of_train_small(tiny_data, tmp_path):
    """train_advreg.py --lam 0 and train_small.py with the same flags end with the same weights
    (bit for bit) and accuracies: the real code paths, not a gradient computed in this test."""
    common = ["--data", str(tiny_data), "--per-class", "2", "--epochs", "2", "--eval-every", "1",
              "--seeds", "3"]
    train_small.main(common + ["--out", str(tmp_path / "small")])
    bank = tmp_bank(tmp_path, torch.randn(300, 7, 7))
    train_advreg.main(common + ["--lam", "0", "--bank", bank, "--out", str(tmp_path / "adv")])
    small = load(tmp_path / "small" / "seed3" / "model.pt")
    adv = load(tmp_path / "adv" / "lam0_seed3" / "model.pt")
    for key, value in small["model"].items():
        assert torch.equal(value, adv["model"][key]), key
    assert small["history"]["test_acc"] == adv["history"]["test_acc"]
    assert small["history"]["train_acc"] == adv["history"]["train_acc"]
    assert (adv["label"], adv["row_order"]) == ("baseline (λ = 0)", [0, 0, 0, 0.0])  # its row


def test_ex02_ex03_ex04_one_d_pass_on_the_fakes_gives_the_three_pass_losses_and_gradients():
    """D(G(z)) is computed once and serves both the generator loss and D's fake term. On a fixed
    batch, losses and the gradients of classifier and D equal those of the three-pass step (the
    generator loss through a frozen D, then D on real and on detached fakes): catches a reuse that
    lets D's gradient reach the classifier, or the generator loss train D."""
    bank = torch.randn(300, 7, 7, generator=torch.Generator().manual_seed(1))
    args = train_advreg.parse_args(["--d-batch", "64"])
    results = []
    for reuse in (False, True):
        model, disc, images, labels, g = algorithm1_batch()
        cls_loss = F.cross_entropy(model(train_advreg.normalize(images)), labels)
        fakes = train_advreg.sample_fakes(model, {"conv1": disc}, 64, g)["conv1"]
        if reuse:  # train_advreg.py's step
            d_fakes = train_advreg.judge({"conv1": disc}, {"conv1": fakes}, "standardized")
            reg_loss = train_advreg.generator_loss(d_fakes)
            (cls_loss + reg_loss).backward(inputs=list(model.parameters()), retain_graph=True)
            d_opt = {"conv1": torch.optim.SGD(disc.parameters(), lr=0.0)}  # keeps .grad to read
            d = train_advreg.discriminator_step({"conv1": disc}, d_opt, {"conv1": bank}, d_fakes,
                                                1.0, args, g)
            disc_loss = d["disc_loss"]
        else:  # the three passes, written out
            disc.requires_grad_(False)
            d_fake = disc(train_advreg.to_d_input(fakes, "standardized"))
            disc.requires_grad_(True)
            reg_loss = F.binary_cross_entropy(d_fake, torch.ones_like(d_fake))
            (cls_loss + reg_loss).backward()
            real = bank[torch.randint(len(bank), (64,), generator=g)]
            d_real = disc(train_advreg.to_d_input(real, "standardized"))
            d_fake = disc(train_advreg.to_d_input(fakes.detach(), "standardized"))
            disc_loss = (F.binary_cross_entropy(d_real, torch.ones_like(d_real))
                         + F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake)))
            disc_loss.backward()
        results.append((reg_loss.item(), disc_loss.item(),
                        [p.grad.clone() for p in model.parameters()],
                        [p.grad.clone() for p in disc.parameters()]))
    (reg_a, disc_a, grads_a, d_grads_a), (reg_b, disc_b, grads_b, d_grads_b) = results
    assert reg_a == pytest.approx(reg_b, rel=1e-6) and disc_a == pytest.approx(disc_b, rel=1e-6)
    for a, b in zip(grads_a + d_grads_a, grads_b + d_grads_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def recording_conv1_dtypes(cls, dtypes):
    """A subclass of a model class whose conv1 adds the dtype of each of its outputs to `dtypes`.
    """
    class Recorded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conv1.register_forward_hook(lambda module, x, out: dtypes.add(out.dtype))
    return Recorded


def test_bf16_runs_finish_and_write_their_outputs(tiny_data, pretrained, tmp_path, monkeypatch):
    """--precision bf16 on the CPU: a short run of each stage-3/4 trainer computes its
    classifier's and D's convolutions in bfloat16 in every forward pass (catches autocast off, or
    off in one of the passes: training, AMP's inner step, D's real batch, evaluation), and ends
    with finite losses and its files (catches an autocast region that breaks a loss)."""
    _, banks = pretrained
    common = ["--data", str(tiny_data), "--per-class", "2", "--epochs", "2", "--eval-every", "1",
              "--precision", "bf16"]
    dtypes = {"small": set(), "adv": set(), "d": set()}
    monkeypatch.setattr(train_small, "PaperCNN",
                        recording_conv1_dtypes(train_small.PaperCNN, dtypes["small"]))
    monkeypatch.setattr(train_advreg, "PaperCNN",
                        recording_conv1_dtypes(train_advreg.PaperCNN, dtypes["adv"]))
    monkeypatch.setattr(train_advreg, "KernelDiscriminator",
                        recording_conv1_dtypes(train_advreg.KernelDiscriminator, dtypes["d"]))
    train_small.main(common + ["--amp-epsilon", "0.1", "--out", str(tmp_path / "small")])
    train_advreg.main(common + ["--bank", str(banks / "conv1_7x7.pt"), "--d-batch", "16",
                                "--out", str(tmp_path / "adv")])
    assert dtypes == {"small": {torch.bfloat16}, "adv": {torch.bfloat16}, "d": {torch.bfloat16}}
    losses = [float(r["train_loss"]) for r in csv.DictReader(
        open(tmp_path / "small" / "seed0" / "metrics.csv"))]
    assert all(math.isfinite(v) for v in losses)
    rows = list(csv.DictReader(open(tmp_path / "adv" / "lam1_seed0" / "metrics.csv")))
    assert all(math.isfinite(float(r["reg_loss"])) and 0 < float(r["d_fake"]) < 1 for r in rows)
    assert (tmp_path / "adv" / "lam1_seed0" / "summary.json").exists()


@pytest.mark.skipif(not os.environ.get("THROUGHPUT_DATA"),
                    reason="a measurement: THROUGHPUT_DATA=PATH pytest -s -k throughput")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_throughput_of_the_100_image_trainers_against_a_plain_loop(precision, capsys):
    """train_small.py and train_advreg.py (lambda = 1) as a user runs them, against a plain loop
    of the same model, batches (the same crop + flip on the resident uint8 images) and steps, in
    one process: the ms/epoch of the trainers' last progress line (50 epochs, no evaluation
    inside) vs the plain loop's. The ratio is what the trainers' bookkeeping costs."""
    data, epochs = os.environ["THROUGHPUT_DATA"], 100
    flags = ["--data", data, "--epochs", str(epochs), "--log-every", "50", "--eval-every", "1000",
             "--test-limit", "100", "--curve-size", "0", "--precision", precision]
    args = train_small.parse_args(flags)
    small = train_small.load_small_data(args, torch.device("cpu"))
    train_x, y = small["train_x"], small["train_y"]
    bank = torch.randn(960, 7, 7)

    def plain(lam):
        torch.manual_seed(0)
        model, disc = train_small.PaperCNN(10), train_advreg.KernelDiscriminator()
        opt, d_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(disc.parameters())
        t0 = time.time()
        for _ in range(50):
            perm = torch.randperm(100)
            for i in range(0, 100, 16):  # the same batches: crop + flip of the uint8 images
                idx = perm[i:i + 16]
                x = train_small.normalize(train_small.augment(train_x[idx]))
                with train_small.autocast(precision, x.device):
                    loss = F.cross_entropy(model(x), y[idx])
                    if lam:
                        fake = model.conv1.weight.reshape(-1, 7, 7)[torch.randperm(192)[:128]]
                        d_fake = disc(train_advreg.to_d_input(fake, "standardized"))
                if lam:
                    d_fake = d_fake.float()
                    loss = loss + F.binary_cross_entropy(d_fake, torch.ones_like(d_fake))
                opt.zero_grad()
                loss.backward(inputs=list(model.parameters()), retain_graph=bool(lam))
                opt.step()
                if lam:
                    with train_small.autocast(precision, x.device):
                        d_real = disc(train_advreg.to_d_input(bank[:128], "standardized"))
                    d_loss = (F.binary_cross_entropy(d_real.float(), torch.ones(128))
                              + F.binary_cross_entropy(d_fake, torch.zeros(128)))
                    d_opt.zero_grad()
                    d_loss.backward(inputs=list(disc.parameters()))
                    d_opt.step()
        return (time.time() - t0) / 50

    def trainer(main, extra, tmp):
        main(flags + extra + ["--out", tmp])
        lines = [line for line in capsys.readouterr().out.splitlines() if "ms/epoch" in line]
        return float(lines[-1].split("ms/epoch")[0].split("|")[-1]) / 1000

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("train_small.py", trainer(train_small.main, [], tmp + "/s"), plain(0)),
                ("train_advreg.py, lambda = 1", trainer(train_advreg.main, [
                    "--bank", str(tmp_bank(tmp, bank)), "--d-batch", "128"], tmp + "/a"),
                 plain(1))]
    with capsys.disabled():
        for name, ours, reference in rows:
            print(f"\n{precision} {name}: {100 / ours:.0f} img/s, plain loop {100 / reference:.0f}"
                  f" img/s, ratio {reference / ours:.2f} ({torch.get_num_threads()} threads)")
    assert all(ours > 0 and reference > 0 for _, ours, reference in rows)


def tmp_bank(folder, kernels):
    path = os.path.join(folder, "bank.pt")
    torch.save({"kernels": kernels}, path)
    return path


def test_every_link_and_image_in_the_docs_resolves():
    """README.md and docs/*.md: every relative link and image names a file that exists, and every
    #anchor a heading of its page (catches a moved figure or a renamed section)."""
    import re
    pages = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
        if f.endswith(".md"))

    def anchors(path):
        heads = re.findall(r"^#+ (.+)$", open(path).read(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    checked = 0
    for page in pages:
        text = open(page).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            assert os.path.exists(path), (page, target)
            if anchor and path.endswith(".md"):
                assert anchor in anchors(path), (page, target)
            checked += 1
    assert checked > 50
    assert len(open(pages[0]).read().splitlines()) <= 260  # the README stays a front page


@pytest.mark.skipif(not os.environ.get("THROUGHPUT_DATA"),
                    reason="a measurement: THROUGHPUT_DATA=PATH pytest -s -k throughput")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_throughput_of_pretraining_against_a_plain_loop(precision, capsys, tmp_path):
    """pretrain.py as a user runs it (its last epoch's img/s, on 5000 training images) against a
    plain loop of the same model, batch 128, crop + flip and steps, in one process."""
    data, limit = os.environ["THROUGHPUT_DATA"], 5000
    pretrain.main(["--data", data, "--train-limit", str(limit), "--test-limit", "100",
                   "--epochs", "2", "--eval-every", "100", "--seeds", "0", "--precision",
                   precision, "--out", str(tmp_path)])
    last = [line for line in capsys.readouterr().out.splitlines() if "img/s" in line][-1]
    ours = float(last.split("img/s")[0].split("|")[-1])
    train_x, train_y, _ = pretrain.load_split(data, "data", "train")
    train_x, train_y = train_x[:limit], train_y[:limit]
    torch.manual_seed(0)
    model = pretrain.PaperCNN(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    t0, perm = time.time(), torch.randperm(limit)
    for i in range(0, limit, 128):
        idx = perm[i:i + 128]
        with pretrain.autocast(precision, train_x.device):
            loss = F.cross_entropy(model(pretrain.normalize(pretrain.augment(train_x[idx]))),
                                   train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    reference = limit / (time.time() - t0)
    with capsys.disabled():
        print(f"\n{precision} pretrain.py: {ours:.0f} img/s, plain loop {reference:.0f} img/s, "
              f"ratio {ours / reference:.2f} ({torch.get_num_threads()} threads)")
    assert ours > 0 and reference > 0


@pytest.mark.skipif(not os.environ.get("THROUGHPUT_DATA"),
                    reason="a measurement: THROUGHPUT_DATA=PATH pytest -s -k throughput")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_throughput_of_the_dcgan_lab_against_a_plain_loop(precision, capsys, tmp_path):
    """gan_labs.py dcgan as a user runs it (its s/iter, 2 epochs on 3,840 images of the data)
    against a plain loop of the same nets, batch 128 and BCE game, in one process."""
    source, folder = os.environ["THROUGHPUT_DATA"], tmp_path / "subset"
    for split, count in (("train", 384), ("test", 40)):  # per class: a quick, real subset
        for c in sorted(os.listdir(os.path.join(source, split))):
            (folder / split / c).mkdir(parents=True)
            for f in sorted(os.listdir(os.path.join(source, split, c)))[:count]:
                os.symlink(os.path.join(source, split, c, f), folder / split / c / f)
    gan_labs.main(["dcgan", "--data", str(folder), "--epochs", "2", "--eval-samples", "0",
                   "--precision", precision, "--out", str(tmp_path / "run")])
    ours = json.loads((tmp_path / "run" / "summary.json").read_text())["s_per_iter"]
    args = gan_labs.parse_args(["dcgan", "--data", str(folder)])
    torch.manual_seed(0)
    layout = gan_labs.net_layout(precision)  # the lab's layout
    g, d = (net.to(memory_format=layout) for net in gan_labs.build_models(args, 3, 0))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    x = gan_labs.to_float(gan_labs.resize_uint8(gan_labs.load_split(str(folder), "data",
                                                                    "train")[0], 32))
    t0, steps = time.time(), len(x) // 128
    for i in range(steps):
        real = x[i * 128:(i + 1) * 128]
        with gan_labs.autocast(precision, real.device):
            fake = g(torch.randn(128, 100))
            d_real, d_fake = d(real).float(), d(fake.detach()).float()
            loss_d = F.binary_cross_entropy(d_real, torch.ones_like(d_real)) + \
                F.binary_cross_entropy(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with gan_labs.autocast(precision, real.device):
            d_gen = d(fake).float()
            loss_g = F.binary_cross_entropy(d_gen, torch.ones_like(d_gen))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    reference = (time.time() - t0) / steps
    with capsys.disabled():
        print(f"\n{precision} gan_labs.py dcgan: {ours:.3f} s/iter, plain loop {reference:.3f} "
              f"s/iter, ratio {reference / ours:.2f} ({torch.get_num_threads()} threads)")
    assert ours > 0 and reference > 0


# ============================================================================= gan_labs.py
# Runs every gan_labs.py subcommand as the README tells a user to, on a tiny generated ImageFolder
# (3 classes of 28x28 grayscale PNGs) and on the CIFAR-shaped RGB one above, and checks the
# mathematics that can silently go wrong. Error paths run in-process (a subprocess costs ~5 s).
import contextlib  # noqa: E402  (the GAN part's own imports)
import io  # noqa: E402
import re  # noqa: E402

GAN_CLASSES = 3
GAN_TINY = ["--batch-size", "16", "--ngf", "8", "--ndf", "8", "--epochs", "1",
            "--eval-samples", "24", "--log-every", "1", "--threads", "1", "--device", "cpu"]


def gan_run(*args, ok=True):
    return run("gan_labs.py", *args, ok=ok, timeout=120)


def gan_user_error(capsys, argv, *phrases):
    """gan_labs.main(argv) through the file's user_error: one line, holding every phrase."""
    said = user_error(capsys, gan_labs.main, *argv)
    assert "\n" not in said.strip() and all(p in said for p in phrases), (phrases, said)


def gan_read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def gan_png_shape(path):
    with PIL.Image.open(path) as img:
        return tuple(pil_to_tensor(img).shape)


def gan_ckpt(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="session")
def gan_data(tmp_path_factory):
    """A tiny MNIST-like ImageFolder: 28x28 grayscale PNGs, one bright bar per class, plus noise."""
    root = tmp_path_factory.mktemp("gan_data")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("test", 24)):
        for i in range(n):
            c = i % GAN_CLASSES
            img = torch.randint(0, 40, (1, 28, 28), generator=g, dtype=torch.uint8)
            img[0, 4 + 7 * c:10 + 7 * c, 4:24] = 255
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            to_pil_image(img).save(root / split / str(c) / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def gan_common(gan_data, tmp_path_factory):
    """Flags every run shares; the metric classifier is trained once here, by its subcommand
    (in-process: the subprocess runs below reuse the cached file)."""
    cache = tmp_path_factory.mktemp("gan_cache")
    flags = ["--data", gan_data, "--cache-dir", cache]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        gan_labs.main(["classifier", *map(str, flags), "--epochs", "3", "--threads", "1",
                       "--device", "cpu"])
    assert "test accuracy" in stdout.getvalue()
    assert [p for p in cache.iterdir() if p.name.startswith("classifier_")]
    return flags


def gan_check_run(out, bce=True, size=32, channels=1):
    """What every lab run must leave behind, with sane numbers."""
    for name in ("checkpoint.pt", "metrics.csv", "curves.png", "samples_epoch01.png",
                 "interpolation_epoch01.png", "eval.csv", "summary.json"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.tmp*")), "a temporary file was left behind"
    side = 8 * (size + 2) + 2  # 64 samples, 8 x 8, 2-px padding
    assert gan_png_shape(out / "samples_epoch01.png") == (3, side, side)  # save_image writes RGB
    assert gan_png_shape(out / "interpolation_epoch01.png") == (3, size + 4, 11 * (size + 2) + 2)
    rows = gan_read_csv(out / "metrics.csv")
    assert rows
    for r in rows:
        for k in ("loss_d", "d_real", "d_fake"):
            assert math.isfinite(float(r[k])), (k, r)
        # loss_g is nan in a log window without a G step (--g-every, --n-critic); never inf
        assert not math.isinf(float(r["loss_g"])), r
        if bce:  # Jensen: the mean of -log D is at least -log of D's mean (catches a loss_d
            # logged with another sign or scale, or columns that are not D's outputs)
            bound = -math.log(float(r["d_real"])) - math.log(1 - float(r["d_fake"]))
            assert float(r["loss_d"]) >= bound - 1e-4, r
    assert any(math.isfinite(float(r["loss_g"])) for r in rows), "G never trained"
    gen, floor = gan_read_csv(out / "eval.csv")
    assert gen["comparison"].startswith("generated") and floor["comparison"].startswith("train")
    for r in (gen, floor):
        assert math.isfinite(float(r["fid"]))  # its value: test_ex07_gan_frechet_distance
        assert 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1
        # (min <= 1/n <= max holds for any shares that sum to 1; this catches swapped columns)
        assert 0 <= float(r["class_share_min"]) <= float(r["class_share_max"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == int(rows[-1]["iter"]) > 0
    assert summary["args"]["channels"] == channels and summary["args"]["image_size"] == size
    assert isinstance(summary["args"]["classes"], list) and len(summary["args"]["classes"]) > 1
    assert summary["metrics"][0]["fid"] == float(gen["fid"])  # summary and eval.csv agree
    return rows, gen, floor


@pytest.fixture(scope="session")
def gan_dcgan_run(gan_common, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan_runs") / "dcgan"
    gan_run("dcgan", *gan_common, *GAN_TINY, "--out", out)
    return out


# ----------------------------------------------------------------------------- labs' last questions
def dann_batch():
    torch.manual_seed(0)
    x_s, x_t = torch.randn(8, 3, 28, 28), torch.randn(8, 3, 28, 28) + 1
    return x_s, torch.arange(8) % 3, x_t


def test_ex16_gan_dann_without_reversal_features_get_the_label_plus_the_domain_gradient():
    """Seed 003 Q1 and Q3: --no-reversal is lambda = -1 in the layer, so G_f's step is the label
    gradient PLUS the domain gradient; with the layer (lambda = 0.4) it is the label gradient
    minus 0.4 times it. Both computed here in plain torch, without the reversal layer (catches a
    layer left in under --no-reversal, or a sign or factor lost on the way to G_f)."""
    assert gan_labs.adaptation_weight(gan_labs.parse_args(["dann", "--no-reversal"]), 0.7) == -1
    assert gan_labs.adaptation_weight(gan_labs.parse_args(["dann", "--lam", "0.3"]), 0.7) == 0.3
    assert gan_labs.adaptation_weight(gan_labs.parse_args(["dann", "--no-adapt"]), 0.7) == 0
    assert gan_labs.adaptation_weight(gan_labs.parse_args(["dann"]), 0.7) == 0.7
    x_s, y_s, x_t = dann_batch()
    domain = torch.cat([torch.zeros(8), torch.ones(8)])
    for lam in (-1.0, 0.4):
        torch.manual_seed(1)
        net, plain = gan_labs.DANN(3), gan_labs.DANN(3)
        plain.load_state_dict(net.state_dict())
        params = list(plain.features.parameters())
        loss_y = F.cross_entropy(plain.label_classifier(plain.features(x_s)), y_s)
        grad_y = torch.autograd.grad(loss_y, params)
        d_logit = plain.domain_classifier(plain.features(torch.cat([x_s, x_t])))
        grad_d = torch.autograd.grad(F.binary_cross_entropy_with_logits(d_logit, domain), params)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # 1st step: p -= lr * grad
        gan_labs.dann_step(net, opt, x_s, y_s, x_t, lam, 0.1)
        for p, q, gy, gd in zip(net.features.parameters(), params, grad_y, grad_d):
            assert torch.allclose(p, q - 0.1 * (gy - lam * gd), atol=1e-6), lam
        assert (grad_d[0].abs() > 0).any()  # the domain gradient is not zero: the test can fail


@pytest.mark.parametrize("flags, want", [(["--lam", "0.3"], "fixed"), (["--no-reversal"], -1.0),
                                         ([], "schedule")])
def test_gan_dann_lambda_flags_reach_the_step(flags, want, gan_data, tiny_data, tmp_path):
    """The lambda each dann_step receives in a real run: the fixed --lam, -1 without the layer,
    the paper's rising schedule by default (catches a flag parsed but not used)."""
    seen = []
    step = gan_labs.dann_step

    def recording_step(net, opt, x_s, y_s, x_t, lam, lr, y_t=None):
        seen.append(lam)
        return step(net, opt, x_s, y_s, x_t, lam, lr, y_t)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gan_labs, "dann_step", recording_step)
        gan_labs.main(["dann", "--data", str(gan_data), "--target-patches", str(tiny_data),
                       "--epochs", "1", "--batch-size", "16", "--threads", "1", *flags,
                       "--out", str(tmp_path)])
    assert len(seen) == 3  # 48 source images / 16
    if want == "fixed":
        assert seen == [0.3] * 3
    elif want == "schedule":
        assert seen[0] == 0 and 0 < seen[1] < seen[2] < 1
    else:
        assert seen == [want] * 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == {"fixed": "DANN, lambda = 0.3", "schedule": "DANN"}.get(
        want, "no reversal")


def test_ex16_gan_pseudo_labels_keep_only_confident_predictions():
    """A hand-made net whose softmax is known: only rows above the threshold keep a label, their
    argmax; the others get -1 (catches a reversed comparison, or the wrong class kept)."""
    logits = torch.tensor([[4.0, 0, 0], [0, 0, 1], [0, 5, 0], [2, 2, 0], [0, 0, 9]])
    # top softmax probabilities: 0.965, 0.576, 0.987, 0.468, 1.000
    net = torch.nn.Module()
    net.features, net.label_classifier = torch.nn.Flatten(), lambda f: logits
    x = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    assert gan_labs.pseudo_labels(net, x, 0.9).tolist() == [0, -1, 1, -1, 2]
    assert gan_labs.pseudo_labels(net, x, 0.97).tolist() == [-1, -1, 1, -1, 2]
    # the step's label loss is then the mean over the source and the labelled target images
    x_s, y_s, x_t = dann_batch()
    y_t = torch.tensor([0, -1, 1, -1, 2, -1, -1, 0])
    torch.manual_seed(1)
    net, plain = gan_labs.DANN(3), gan_labs.DANN(3)
    plain.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = gan_labs.dann_step(net, opt, x_s, y_s, x_t, 0.0, 0.1, y_t)
    logits = plain.label_classifier(plain.features(torch.cat([x_s, x_t[y_t >= 0]])))
    want = F.cross_entropy(logits, torch.cat([y_s, y_t[y_t >= 0]]))
    assert out["loss_y"].item() == pytest.approx(want.item(), rel=1e-5)
    without = F.cross_entropy(plain.label_classifier(plain.features(x_s)), y_s)
    assert abs(without.item() - want.item()) > 1e-3  # the target's labels count


def test_gan_dann_pseudo_labels_run_beside_dann_and_source_only(gan_dann_runs, gan_data,
                                                                tiny_data, tmp_path, capsys):
    """--pseudo-labels RUN: the source-only run labels the target; a new net trains on source +
    pseudo-labelled target at lambda = 0, with the same outputs as DANN's. Every target batch
    reaches the step with the labeller's confident labels; bad input is one line."""
    labeller = gan_labs.DANN(3)
    labeller.load_state_dict(gan_ckpt(gan_dann_runs / "no_adapt")["net"])
    argv = ["dann", "--data", str(gan_data), "--target-patches", str(tiny_data), "--epochs", "2",
            "--batch-size", "16", "--threads", "1", "--device", "cpu"]
    data, _ = gan_labs.load_dann_data(gan_labs.parse_args(argv), torch.device("cpu"))
    with torch.no_grad():  # a threshold that keeps about half: the tiny labeller is unsure
        f = labeller.features(gan_labs.to_float(data["target"]))
        threshold = F.softmax(labeller.label_classifier(f), 1).max(1).values.median().item()
    seen = []
    step = gan_labs.dann_step

    def recording_step(net, opt, x_s, y_s, x_t, lam, lr, y_t=None):
        seen.append((lam, x_t, y_t))
        return step(net, opt, x_s, y_s, x_t, lam, lr, y_t)
    argv += ["--threshold", str(threshold), "--pseudo-labels", str(gan_dann_runs / "no_adapt"),
             "--out", str(tmp_path / "pl")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gan_labs, "dann_step", recording_step)
        gan_labs.main(argv)
    assert len(seen) == 6 and all(lam == 0 for lam, _, _ in seen)
    with torch.no_grad():
        for _, x_t, y_t in seen:
            prob = F.softmax(labeller.label_classifier(labeller.features(x_t)), 1)
            want = torch.where(prob.max(1).values > threshold, prob.argmax(1), -1)
            assert torch.equal(y_t, want)
    kept = torch.cat([y_t for _, _, y_t in seen]) >= 0
    assert 0 < kept.float().mean() < 1  # some target images labelled, some not
    pl, dann = (gan_read_csv(p / "metrics.csv") for p in (tmp_path / "pl", gan_dann_runs / "adapt"))
    assert list(pl[0]) == list(dann[0])  # the same columns as DANN and source only
    summary = json.loads((tmp_path / "pl" / "summary.json").read_text())
    assert summary["method"] == f"pseudo-labels > {threshold:g}"
    stats = summary["pseudo_labels"]
    assert 0 < stats["train_kept"] <= 1 and 0 <= stats["test_kept"] <= 1
    x_test, y_test = data["target_test"]  # what the threshold keeps there, and how many are right
    with torch.no_grad():
        prob = F.softmax(labeller.eval().label_classifier(labeller.features(
            gan_labs.to_float(x_test))), 1)
    kept = prob.max(1).values > threshold
    assert stats["test_kept"] == pytest.approx(kept.float().mean().item())
    assert stats["test_kept_acc"] == pytest.approx(
        (prob.argmax(1)[kept] == y_test[kept]).float().mean().item())
    common = argv[:-4] + ["--out", str(tmp_path / "bad")]
    for flags, want in (
            (["--threshold", "1"], "--threshold must be in (0, 1)"),
            (["--threshold", "0"], "--threshold must be in (0, 1)"),
            (["--pseudo-labels", tmp_path / "nowhere"], "no finished dann run there"),
            (["--pseudo-labels", tmp_path / "pl", "--data", tiny_data], "--data"),
            (["--lam", "-0.5"], "--lam must be >= 0"),
            (["--no-adapt", "--lam", "1"], "choose one"),
            (["--no-reversal", "--pseudo-labels", tmp_path / "pl"], "choose one")):
        gan_user_error(capsys, common + flags, *([want] if isinstance(want, str) else want))
    assert not (tmp_path / "bad").exists()


def test_gan_seed_004_flags_change_the_nets():
    """--g-bn: BatchNorm1d after each hidden layer of the MLP G; wgan --d-dropout: the MLP
    critic's dropout, active in train mode only; --init weight-norm: every weight is g v / ||v||
    per output unit, and the nets start as PyTorch's init left them (catches a flag that builds
    the default nets, or weight norm over the wrong dimension)."""
    def nets(*flags):
        torch.manual_seed(0)
        return gan_labs.build_models(gan_labs.parse_args(list(flags)), 1, 0)
    g_default, _ = nets("vanilla")
    g_bn, _ = nets("vanilla", "--g-bn")
    assert [m.num_features for m in g_bn if isinstance(m, torch.nn.BatchNorm1d)] == [256, 512,
                                                                                   1024]
    assert not [m for m in g_default if isinstance(m, torch.nn.BatchNorm1d)]
    z = torch.randn(16, 100)
    hidden = g_bn[:2](z)  # the first Linear + BatchNorm, in train mode: per-batch normalised
    assert torch.allclose(hidden.mean(0), torch.zeros(256), atol=1e-5)
    x = torch.randn(16, 1, 28, 28)
    for p, active in (("0.5", True), ("0.0", False)):
        _, critic = nets("wgan", "--critic", "mlp", "--generator", "mlp", "--d-dropout", p)
        critic.train()
        assert (not torch.equal(critic(x), critic(x))) == active, p
        critic.eval()
        assert torch.equal(critic(x), critic(x))
    g_plain, d_plain = nets("wgan")
    g_wn, d_wn = nets("wgan", "--init", "weight-norm")
    normed = 0
    for m in [*g_wn.modules(), *d_wn.modules()]:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            g, v = m.parametrizations.weight.original0, m.parametrizations.weight.original1
            unit = 1 if isinstance(m, torch.nn.ConvTranspose2d) else 0  # the output units
            dims = [i for i in range(v.dim()) if i != unit]
            norm = v.pow(2).sum(dims, keepdim=True).sqrt()
            assert torch.allclose(m.weight, g * v / norm)
            normed += 1
    assert normed == 4 + 5  # G: 4 transposed convs; the conv critic: 4 convs + its linear layer
    z = torch.randn(4, 100)
    g_plain.eval(), g_wn.eval()
    assert torch.allclose(g_plain(z), g_wn(z), atol=1e-5)
    assert torch.allclose(d_plain(g_plain(z)), d_wn(g_wn(z)), atol=1e-4)


def test_gan_seed_004_runs_conv_critic_diffaug_weight_norm_and_g_bn(gan_common, tmp_path,
                                                                    capsys):
    """Seed 004's remaining configurations end to end: the conv critic with DiffAugment, the MLP
    G with BatchNorm, weight norm under the gradient penalty (its double backward), and the
    MLP critic with dropout; bad combinations are one line."""
    runs = {"conv": ["--critic", "conv", "--diffaug", "translation,cutout", "--init",
                     "weight-norm", "--g-bn"],
            "mlp": ["--critic", "mlp", "--d-dropout", "0.3"]}
    for name, flags in runs.items():
        out = tmp_path / name
        gan_labs.main([str(a) for a in ("wgan", *gan_common, *GAN_TINY, "--generator", "mlp",
                                        "--n-critic", "1", *flags, "--out", out)])
        rows, _, _ = gan_check_run(out, bce=False, size=28)
        assert all(float(r["gp"]) >= 0 for r in rows)
    ckpt = gan_ckpt(tmp_path / "conv")
    assert "1.running_mean" in ckpt["g"]  # G's BatchNorm after its first layer
    assert "0.parametrizations.weight.original0" in ckpt["d"]
    base = ["wgan", "--out", tmp_path / "bad"]
    gan_user_error(capsys, base + ["--d-dropout", "0.3"], "--d-dropout needs --critic mlp")
    gan_user_error(capsys, base + ["--g-bn"], "--g-bn needs --generator mlp")
    assert not (tmp_path / "bad").exists()


def test_gan_dcgan_trains_resumes_and_has_bn_after_the_first_conv(gan_dcgan_run, gan_common,
                                                                  capsys):
    rows, gen, floor = gan_check_run(gan_dcgan_run)
    assert [int(r["iter"]) for r in rows] == [1, 2, 3]  # --log-every 1: a row every iteration
    # the real-vs-real floor in a feature space that separates the classes beats one epoch of a GAN
    assert float(floor["fid"]) < float(gen["fid"])
    d = gan_ckpt(gan_dcgan_run)["d"]
    assert "1.running_mean" in d and d["1.weight"].shape == (8,)  # seed 003: BN after D's conv1
    # in-process (no 5 s of imports): the same command with --epochs 2 continues the run
    gan_labs.main(["dcgan", *map(str, gan_common), *GAN_TINY, "--epochs", "2",
                   "--out", str(gan_dcgan_run)])
    stdout = capsys.readouterr().out
    assert "resuming dcgan" in stdout and "[evaluate]" in stdout
    rows = gan_read_csv(gan_dcgan_run / "metrics.csv")
    assert int(rows[-1]["iter"]) == 2 * 48 // 16
    assert (gan_dcgan_run / "samples_epoch02.png").exists()
    assert (gan_dcgan_run / "interpolation_epoch02.png").exists()


def test_gan_first_layer_bn_flag():
    with_bn = gan_labs.dcgan_discriminator(8, 1, 32)
    without = gan_labs.dcgan_discriminator(8, 1, 32, False)
    assert isinstance(with_bn[1], torch.nn.BatchNorm2d)
    assert isinstance(without[1], torch.nn.Identity)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn) == 3  # conv1, conv2, conv3
    assert gan_labs.parse_args(["dcgan", "--no-first-bn"]).first_bn is False
    assert gan_labs.parse_args(["dcgan"]).first_bn is True


def test_gan_64px_defaults_are_pytorch_examples_nets():
    """At 64 px the DCGAN nets default to pytorch/examples' (width 64, no BatchNorm after D's
    first conv: the 64-px diagnosis); at 32 px they stay seed 003's; explicit flags win."""
    def nets(*flags):
        args = gan_labs.parse_args(["dcgan", *flags])
        return args.ngf, args.ndf, args.first_bn
    assert nets() == (32, 32, True)
    assert nets("--image-size", "64") == (64, 64, False)
    assert nets("--image-size", "64", "--first-bn", "--ngf", "32") == (32, 64, True)
    assert nets("--no-first-bn", "--ndf", "16") == (32, 16, False)
    assert gan_labs.parse_args(["cdcgan", "--image-size", "64"]).first_bn is False
    assert gan_labs.parse_args(["wgan", "--image-size", "64"]).ngf == 64


def test_gan_folder_names_and_help(capsys):
    def out(*flags):
        return gan_labs.parse_args(list(flags)).out
    assert out("dcgan") == os.path.join("runs", "gan", "mnist", "dcgan")
    wgan_mlp = out("wgan", "--critic", "mlp", "--generator", "mlp")
    assert wgan_mlp.endswith("wgan_discriminator-mlp_generator-mlp")
    assert out("dcgan", "--no-first-bn").endswith("dcgan_first-bn-False")
    # at 64 px, --no-first-bn is the default, so it does not name the folder; --first-bn does
    assert out("dcgan", "--no-first-bn", "--image-size", "64").endswith("dcgan_image-size-64")
    assert out("dcgan", "--first-bn", "--image-size", "64").endswith("image-size-64_first-bn")
    # seed 004's 784 inputs
    assert gan_labs.parse_args(["wgan", "--generator", "mlp"]).image_size == 28
    with pytest.raises(SystemExit):
        gan_labs.parse_args(["vanilla", "--help"])
    assert "counts D steps" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("lab", ["dcgan", "cdcgan", "vanilla", "wgan", "classifier", "dann",
                                 "memorization"])
def test_gan_help_says_each_default_once_with_its_source(lab, capsys):
    """Catches argparse's ArgumentDefaultsHelpFormatter coming back (it appended "(default: True)"
    to --no-first-bn and a second "(default: )" to --out) and a flag whose help hides its default.
    """
    with pytest.raises(SystemExit):
        gan_labs.parse_args([lab, "--help"])
    options = capsys.readouterr().out.split("show this help message and exit")[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=--)", options) if e.strip()]
    assert len(entries) >= 6  # the common flags (4 to 6) and the subcommand's own
    for entry in entries:  # one per flag: "--flag METAVAR its help ..."
        assert entry.count("(default") == 1, entry
        assert "(default: True)" not in entry and "(default: )" not in entry, entry


def test_gan_source_conventions():
    """Every file goes through write_atomic, every torch.load is weights_only, lines fit in 100;
    one fence; nothing above it but the lesson; nothing writes into args after parse_args."""
    source = inspect.getsource(gan_labs)
    assert source.count("os.replace(") == 1 and "open(" not in source.replace("Image.open(", "")
    assert source.count("torch.load(") == source.count("weights_only=True") > 0
    assert max(map(len, source.splitlines())) <= 100
    assert source.count(FENCE) == 1
    lesson = source.split(FENCE)[0]
    for name in ("def write_atomic", "def save_checkpoint", "def resume", "def load_split"):
        assert name not in lesson, name
    # the only writes into args: fill_defaults, which parse_args calls
    writers = {node.name for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.FunctionDef)
               and any(isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "args"
                       for a in ast.walk(node) if isinstance(a, ast.Assign) for t in a.targets)}
    assert writers == {"fill_defaults"}, writers


@pytest.mark.parametrize("lab", ["dcgan", "cdcgan", "vanilla", "wgan"])
def test_gan_resume_gives_the_same_weights_as_an_uninterrupted_run(lab, gan_data, tmp_path):
    """Stopped after epoch 1 and resumed to 2 = a straight 2-epoch run, bit for bit (in-process);
    and --g-every / --n-critic really skip G steps (G's optimizer counts its steps)."""
    g_every = {"dcgan": 1, "cdcgan": 1, "vanilla": 2, "wgan": 3}[lab]
    flags = {"dcgan": ["--no-first-bn"], "cdcgan": [],
             "vanilla": ["--g-every", "2", "--diffaug", "translation,cutout"],
             "wgan": ["--critic", "conv", "--generator", "mlp", "--n-critic", "3"]}[lab]
    common = [lab, *flags, "--data", str(gan_data), "--cache-dir", str(tmp_path / "cache"),
              *GAN_TINY[:6], "--eval-samples", "0", "--log-every", "2", "--threads", "1",
              "--device", "cpu"]
    gan_labs.main(common + ["--epochs", "1", "--out", str(tmp_path / "resumed")])
    gan_labs.main(common + ["--epochs", "2", "--out", str(tmp_path / "resumed")])
    gan_labs.main(common + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    resumed, straight = gan_ckpt(tmp_path / "resumed"), gan_ckpt(tmp_path / "straight")
    assert resumed["epoch"] == straight["epoch"] == 2
    for net in ("g", "d"):
        assert all(torch.equal(resumed[net][k], straight[net][k]) for k in straight[net]), net
    curves = [[{k: v for k, v in r.items() if k != "s_per_iter"} for r in c["history"]]
              for c in (resumed, straight)]
    assert json.dumps(curves[0]) == json.dumps(curves[1])  # json: nan == nan
    # 2 epochs of 48 // 16 = 3 D steps: G steps at the D steps 1..6 divisible by N. Catches a
    # --g-every / --n-critic that is parsed but ignored (G would count 6 steps)
    for c in (resumed, straight):
        assert c["opt_d"]["state"][0]["step"] == 6
        assert c["opt_g"]["state"][0]["step"] == 6 // g_every


def test_gan_cdcgan_class_grid_and_conditional_accuracy(gan_common, tmp_path):
    out = tmp_path / "cdcgan"
    gan_run("cdcgan", *gan_common, *GAN_TINY, "--out", out)
    _, gen, _ = gan_check_run(out)
    assert 0 <= float(gen["cond_acc"]) <= 1
    # classes x z
    assert gan_png_shape(out / "class_grid.png") == (3, GAN_CLASSES * 34 + 2, 8 * 34 + 2)
    grid = pil_to_tensor(PIL.Image.open(out / "class_grid.png")).float()
    cell = grid[:, 2:34, 2:34]  # a sample of [-1, 1]: an untrained G's ~0 is mid-grey
    assert cell.std() > 0 and 64 < cell.mean() < 192
    assert gan_ckpt(out)["d"]["0.weight"].shape[1] == 1 + GAN_CLASSES  # x and the label planes
    # in-process: no 5 s of imports
    gan_labs.main(["cdcgan", *map(str, gan_common), *GAN_TINY, "--no-label-in-d",
                   "--eval-samples", "0", "--out", str(tmp_path / "nolabel")])
    assert gan_ckpt(tmp_path / "nolabel")["d"]["0.weight"].shape[1] == 1  # D sees the image only


def test_gan_vanilla_with_diffaug_and_saturating_loss(gan_common, tmp_path):
    out = tmp_path / "vanilla"
    gan_run("vanilla", *gan_common, *GAN_TINY, "--g-every", "2", "--d-dropout", "0.3",
            "--g-loss", "saturating", "--diffaug", "translation,cutout,color", "--out", out)
    rows, _, _ = gan_check_run(out, size=28)  # vanilla: seed 004's 784 = 28 x 28 inputs
    # the saturating G loss log(1 - D(G(z))) is negative
    assert all(float(r["loss_g"]) < 0 for r in rows if r["loss_g"] != "nan")


def test_gan_wgan_clip_keeps_weights_in_range(gan_common, tmp_path):
    out = tmp_path / "wgan_clip"
    gan_run("wgan", *gan_common, *GAN_TINY, "--constraint", "clip", "--clip", "0.01",
            "--n-critic", "2", "--out", out)
    rows, _, _ = gan_check_run(out, bce=False)
    ckpt = gan_ckpt(out)
    assert max(v.abs().max().item() for v in ckpt["d"].values()) <= 0.01 + 1e-9
    assert "step" in ckpt["opt_d"]["state"][0] and "exp_avg" not in ckpt["opt_d"]["state"][0]
    # the last row is logged after the last step, so its bound is the saved critic's: catches a
    # logged Lipschitz column computed from another net (or a stale one)
    critic = gan_labs.conv_critic(1, 32)
    critic.load_state_dict(ckpt["d"])
    product, bound = gan_labs.lipschitz_bound(critic)
    assert float(rows[-1]["lip_product"]) == pytest.approx(product.item(), rel=1e-6)
    assert float(rows[-1]["lip_bound"]) == pytest.approx(bound.item(), rel=1e-6)


def test_gan_wgan_gp_conv_critic_with_the_mlp_generator(gan_common, tmp_path):
    """Seed 004: its MLP generator fixed, the critic convolutional, at 28 x 28."""
    out = tmp_path / "wgan_gp"
    gan_run("wgan", *gan_common, *GAN_TINY, "--critic", "conv", "--generator", "mlp",
            "--n-critic", "2", "--out", out)
    rows, _, _ = gan_check_run(out, bce=False, size=28)
    assert all(math.isfinite(float(r["gp"])) for r in rows)  # its value: test_gan_wgan_steps_...
    # four 4x4 stride-2 convs, each sqrt(4) = 2 above its reshaped norm, the linear layer 1: the
    # bound is exactly 16 x the product (catches a wrong overlap factor)
    for r in rows:
        assert float(r["lip_bound"]) == pytest.approx(16 * float(r["lip_product"]), rel=1e-5)
    ckpt = gan_ckpt(out)
    assert ckpt["d"]["0.weight"].shape == (16, 1, 4, 4)
    assert ckpt["g"]["0.weight"].shape == (256, 100)


@pytest.fixture(scope="session")
def gan_rgb_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gan_rgb_cache")


@pytest.mark.parametrize("size", [32, 64])
def test_gan_cifar_shaped_rgb_end_to_end(size, tiny_data, gan_rgb_cache, tmp_path):
    """32x32 RGB JPEG-like input, 10 classes, as CIFAR-10; at 32 and at 64 pixels (seed 003)."""
    out = tmp_path / f"rgb{size}"
    gan_run("dcgan", "--data", tiny_data, "--cache-dir", gan_rgb_cache, *GAN_TINY,
            "--image-size", size, "--out", out)
    gan_check_run(out, size=size, channels=3)
    # G's first block: ngf*8 at 64
    assert gan_ckpt(out)["g"]["1.weight"].shape[1] == 8 * (8 if size == 64 else 4)


def test_gan_non_finite_loss_stops_with_one_line(gan_common, tmp_path, capsys):
    out = tmp_path / "nan"
    gan_user_error(capsys, ["vanilla", *gan_common, *GAN_TINY, "--lr-d", "1e30", "--lr-g", "1e30",
                            "--epochs", "2", "--eval-samples", "0", "--out", out],
                   "diverged", "at epoch 1,", "--lr-d")
    assert not (out / "checkpoint.pt").exists()  # stopped before the first checkpoint


@pytest.mark.parametrize(
    "case", ["unknown_lab", "other_run", "corrupt_classifier", "image_size", "empty_folder",
             "corrupt_checkpoint", "foreign_checkpoint"])
def test_gan_bad_input_is_one_clear_line(case, gan_dcgan_run, gan_common, tmp_path, capsys):
    """In-process (a subprocess costs 5 s of imports); each case's phrase is its own cause."""
    lab, flags = "dcgan", [*gan_common, *GAN_TINY, "--out", tmp_path / "run"]
    (tmp_path / "run").mkdir()
    if case == "unknown_lab":
        lab, flags, want = "stylegan", [], "invalid choice"
    elif case == "other_run":  # another lab's (or another setting's) folder is not resumed
        lab, flags = "wgan", [*gan_common, *GAN_TINY, "--out", gan_dcgan_run]
        want = "--lab 'dcgan' (now 'wgan')"
    elif case == "corrupt_classifier":
        cache = tmp_path / "cache"
        cache.mkdir()
        classifier = next(p for p in gan_common[3].iterdir() if p.name.startswith("classifier_"))
        (cache / classifier.name).write_bytes(b"truncated")
        flags, want = flags + ["--cache-dir", cache], "is not a metric classifier"
    elif case == "image_size":
        flags, want = flags + ["--image-size", "48"], "--image-size must be 32 or 64"
    elif case == "empty_folder":
        (tmp_path / "empty" / "train" / "0").mkdir(parents=True)
        (tmp_path / "empty" / "test").mkdir()
        flags, want = flags + ["--data", tmp_path / "empty"], "Found no valid file"
    elif case == "corrupt_checkpoint":
        (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
        want = "cannot read"
    else:
        torch.save({"state_dict": {}}, tmp_path / "run" / "checkpoint.pt")
        want = "has checkpoint format 1, not 2"
    gan_user_error(capsys, [lab, *flags], want)


# ----------------------------------------------------------------------------- the mathematics
def test_gan_saturated_d_gives_a_finite_loss_and_gradient():
    # D's logit far beyond float32's range of sigmoid: D = 0 or 1 exactly, as with a very wide D
    logits = torch.tensor([-200.0, -20.0, 0.0, 20.0, 200.0], requires_grad=True)
    for log_term in (gan_labs.log_clamped(torch.sigmoid(logits)),
                     gan_labs.log_clamped(1 - torch.sigmoid(logits))):
        grad, = torch.autograd.grad(log_term.sum(), logits)
        assert log_term.min() == -100 and torch.isfinite(grad).all()
    naive = torch.log(1 - torch.sigmoid(logits)).clamp(min=-100)  # what the helper must not be
    assert torch.isnan(torch.autograd.grad(naive.sum(), logits)[0]).any()


def test_ex15_gan_gradient_penalty_zero_for_unit_norm_linear_critic():
    """The penalty's lambda and its "- 1" (a linear critic's gradient is the same at every
    point, so this cannot see where the interpolates lie: test_ex15_gan_wgan_steps_are_the_papers
    checks that with a tanh critic)."""
    torch.manual_seed(0)
    real, fake = torch.randn(64, 1, 8, 8), torch.randn(64, 1, 8, 8)
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        critic[1].weight /= critic[1].weight.norm()  # exactly 1-Lipschitz: ||grad|| = 1 everywhere
    assert gan_labs.gradient_penalty(critic, real, fake, 10.0).item() < 1e-9
    with torch.no_grad():
        critic[1].weight *= 3.0  # ||grad|| = 3 -> 10 * (3 - 1)^2
    gp = gan_labs.gradient_penalty(critic, real, fake, 10.0).item()
    assert gp == pytest.approx(40.0, rel=1e-4)


def test_ex15_gan_gradient_penalty_reaches_the_critic():
    critic = gan_labs.conv_critic(1, 32)
    real, fake = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    gp = gan_labs.gradient_penalty(critic, real, fake, 10.0)
    gp.backward()
    assert gp.item() > 0 and critic[0].weight.grad.abs().sum() > 0


def test_ex15_gan_clip_weights():
    critic = gan_labs.conv_critic(1, 32)
    gan_labs.clip_weights(critic, 0.01)
    assert all(p.abs().max() <= 0.01 for p in critic.parameters())
    # default init exceeds c: clipping acted
    assert any((p.abs() == 0.01).any() for p in critic.parameters())


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_gan_lipschitz_bound_dominates_measured_ratios(kind):
    """The bound holds for the critics (catches a bound that is too small) and is exact where it
    must be: a single linear layer (catches a factor applied to linear layers)."""
    torch.manual_seed(0)
    critic = (gan_labs.conv_critic(1, 32) if kind == "conv"
              else gan_labs.mlp_discriminator(1, 32, sigmoid=False))
    product, bound = gan_labs.lipschitz_bound(critic)
    x = torch.randn(256, 1, 32, 32, requires_grad=True)
    # near pairs: the ratio approaches the local gradient norm
    y = x.detach() + 1e-3 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (critic(x) - critic(y)).abs() / (x - y).flatten(1).norm(dim=1)
    grad, = torch.autograd.grad(critic(x).sum(), x)
    measured = max(ratio.max().item(), grad.flatten(1).norm(dim=1).max().item())
    assert 0 < measured <= bound.item()
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    grad, = torch.autograd.grad(linear(x).sum(), x)  # a linear map's gradient norm is its L
    assert gan_labs.lipschitz_bound(linear)[1].item() == pytest.approx(grad.norm().item(), rel=1e-5)


def test_gan_reshaped_norm_is_not_a_conv_bound_but_the_overlap_factor_is():
    """A 4x4 stride-2 convolution reuses each input pixel in up to 4 patches: its operator norm
    (power iteration) exceeds the reshaped matrix's norm (lipschitz_bound's product), never the
    bound. Catches a bound without the overlap factor, or with too small a one."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 16, 4, 2, 1, bias=False)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        for _ in range(100):
            x = torch.nn.functional.conv_transpose2d(conv(x), conv.weight, stride=2, padding=1)
            x = x / x.norm()
        op_norm = conv(x).norm().item()
    product, bound = gan_labs.lipschitz_bound(torch.nn.Sequential(conv))
    assert product.item() < op_norm <= bound.item()


def test_ex07_gan_frechet_distance():
    torch.manual_seed(0)
    a = torch.randn(2000, 8) * torch.linspace(0.5, 2, 8)
    assert abs(gan_labs.frechet_distance(a, a)) < 1e-6
    # diagonal Gaussians: FD = ||mu_a - mu_b||^2 + sum (s_a - s_b)^2 with s the standard deviations
    b = torch.randn(200000, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([1.0, 0.0, 0.0])
    c = torch.randn(200000, 3) * torch.tensor([2.0, 2.0, 1.0])
    assert gan_labs.frechet_distance(b, c) == pytest.approx(1 + 1 + 0 + 4, rel=0.02)


def test_gan_precision_recall():
    torch.manual_seed(0)
    real = torch.randn(500, 4).double()
    assert gan_labs.precision_recall(real, real.clone()) == (1.0, 1.0)
    p, r = gan_labs.precision_recall(real, real + 100)
    assert p == 0 and r == 0
    collapsed = real[:5].repeat(100, 1)  # mode collapse: high precision, low recall
    p, r = gan_labs.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.2


@pytest.mark.parametrize("size", [32, 64])
def test_gan_models_shapes_and_d_range(size):
    """Shapes; G ends in tanh and D in a sigmoid of its last layer's output (the same nets
    without that activation: catches a lost or swapped activation); the label reaches both."""
    g = gan_labs.dcgan_generator(100, 8, 3, size, n_classes=10)  # the cDCGAN's: z and a label
    d = gan_labs.dcgan_discriminator(8, 3, size, n_classes=10)
    y, z0 = torch.arange(4) % 10, torch.randn(4, 100)
    x = g(z0, y)
    assert x.shape == (4, 3, size, size)
    assert torch.allclose(x, torch.tanh(gan_labs.Net(*list(g)[:-1], n_classes=10)(z0, y)))
    out = d(x, y)
    logits = gan_labs.Net(*list(d)[:-2], n_classes=10)(x, y).flatten()
    assert out.shape == (4,) and torch.allclose(out, torch.sigmoid(logits))
    # the label reaches both nets: another y, another image and another verdict
    z = torch.randn(4, 100)
    assert not torch.equal(g.eval()(z, y), g(z, (y + 1) % 10)) and not torch.equal(d(x, y),
                                                                                 d(x, (y + 1) % 10))
    critics = (gan_labs.conv_critic(3, size), gan_labs.mlp_discriminator(3, size, sigmoid=False))
    for critic in critics:
        assert critic(x).shape == (4,)
    x = gan_labs.mlp_generator(100, 1, 28)(torch.randn(4, 100))
    assert x.shape == (4, 1, 28, 28) and gan_labs.conv_critic(1, 28)(x).shape == (4,)
    mlp = gan_labs.mlp_discriminator(1, 28, dropout=0.3).eval()
    out = mlp(x)
    assert out.shape == (4,) and torch.allclose(out, torch.sigmoid(mlp[:-2](x).flatten()))


def test_gan_diffaug_keeps_shape_and_gradient():
    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    out = gan_labs.diff_augment(x, ["translation", "cutout", "color"])
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    cut = gan_labs.diff_augment(torch.ones(8, 1, 32, 32), ["cutout"])
    assert (cut == 0).flatten(1).any(1).all()


# ----------------------------------------------------------------------------- seed 003 Q1
@pytest.mark.parametrize("only", ["d", "g"])
def test_gan_train_only_one_net_keeps_the_other_at_its_init(only, gan_data, tmp_path):
    """--train-only d / g: the frozen net's weights equal a fresh init of the same seed, the other
    net's do not. Catches a flag that is parsed but still steps the frozen net's optimizer."""
    argv = ["dcgan", "--train-only", only, "--data", str(gan_data), *GAN_TINY[:6],
            "--eval-samples", "0", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]
    gan_labs.main(argv)
    ckpt = gan_ckpt(tmp_path)
    torch.manual_seed(0)  # --seed 0: train() builds the nets right after this call
    init_g, init_d = gan_labs.build_models(gan_labs.parse_args(argv), 1, 0)
    frozen, trained = ("g", "d") if only == "d" else ("d", "g")
    for net, init in ((frozen, {"g": init_g, "d": init_d}[frozen]),
                      (trained, {"g": init_g, "d": init_d}[trained])):
        same = all(torch.equal(ckpt[net][name], p) for name, p in init.named_parameters())
        assert same == (net == frozen), net
    assert ckpt[f"opt_{frozen}"]["state"] == {} and ckpt[f"opt_{trained}"]["state"]
    rows = gan_read_csv(tmp_path / "metrics.csv")
    assert all((r["loss_g"] == "nan") == (only == "d") for r in rows)  # G's loss: G steps only


# ----------------------------------------------------------------------------- memorization
def test_gan_nearest_matches_brute_force_across_chunks():
    """nearest() reads refs in chunks of 5000: catches a wrong chunk offset or a lost neighbour."""
    torch.manual_seed(0)
    queries, refs = torch.randn(30, 5), torch.randn(12000, 5)
    d, i = gan_labs.nearest(queries, refs, 3)
    want_d, want_i = torch.cdist(queries, refs).topk(3, largest=False)
    assert torch.equal(i, want_i) and torch.allclose(d, want_d, atol=1e-5)


def test_gan_memorization_check_flags_a_copying_generator(gan_data):
    """A "generator" that returns training images: its samples' nearest training images are
    themselves (distance ~0 in both spaces) while real test images keep their distance.
    Catches neighbours taken from the wrong set or distances measured in the wrong space."""
    x_train = gan_labs.load_data(str(gan_data), "data", "train", 32, torch.device("cpu"))[0]
    x_test = gan_labs.load_data(str(gan_data), "data", "test", 32, torch.device("cpu"))[0]

    class Copier(torch.nn.Module):
        def forward(self, z, y=None):
            return gan_labs.to_float(x_train[torch.arange(len(z)) % len(x_train)])
    torch.manual_seed(0)
    net = gan_labs.metric_classifier(1, GAN_CLASSES)
    shown, near_f, near_p, d_fake, d_test = gan_labs.memorization_check(
        Copier(), net, x_train, x_test, 100, 0, 0, 24)
    assert torch.equal(near_p[1][:, 0], torch.arange(64) % 48)
    assert near_p[0][:, 0].max() < 1e-3 and near_f[0][:, 0].max() < 1e-3
    assert d_fake.max() < 0.01 * d_test.median() and len(d_fake) == len(d_test) == 24


@pytest.mark.parametrize("case", ["trained", "no_checkpoint", "no_generator"])
def test_gan_memorization_subcommand(case, gan_dcgan_run, gan_common, tmp_path, capsys):
    """On a lab's run: the figure, the histogram and the numbers; a folder without a generator
    (none at all, or a DANN run's) gives one line."""
    if case == "trained":
        gan_labs.main(["memorization", "--run", str(gan_dcgan_run), "--cache-dir",
                       str(gan_common[3]), "--threads", "1", "--device", "cpu"])
        summary = json.loads((gan_dcgan_run / "memorization.json").read_text())
        assert summary["n"] == 24 and len(summary["nearest_of_shown"]["pixels"]) == 64
        for name in ("samples", "test"):
            assert 0 < summary[name]["p05"] <= summary[name]["median"] <= summary[name]["p95"]
        # 2 columns of 32 rows of 7 tiles: taller than wide
        width, height = PIL.Image.open(gan_dcgan_run / "memorization.png").size
        assert height > 2 * width and (gan_dcgan_run / "nn_distances.png").exists()
        return
    if case == "no_generator":
        gan_labs.save_checkpoint(tmp_path / "checkpoint.pt", {"lab": "dann", "flags": {}})
    gan_user_error(capsys, ["memorization", "--run", tmp_path],
                   "holds no generator (a dann run)" if case == "no_generator" else "no ")


# ----------------------------------------------------------------------------- DANN
def test_ex16_gan_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(5, 7, requires_grad=True)
    out = gan_labs.GradientReversal.apply(x, 0.3)
    assert torch.equal(out, x)
    grad = torch.randn(5, 7)
    out.backward(grad)
    assert torch.allclose(x.grad, -0.3 * grad)


def test_gan_dann_schedules():
    assert gan_labs.dann_schedules(0.0, 0.01, 10, 0.75, 10) == (0.01, 0.0)
    lr, lam = gan_labs.dann_schedules(1.0, 0.01, 10, 0.75, 10)
    assert lr == pytest.approx(0.01 / 11 ** 0.75)
    assert lam == pytest.approx(2 / (1 + math.exp(-10)) - 1)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_ex16_gan_dann_step_lambda_zero_is_the_source_only_update(lam):
    """With lambda = 0 the domain loss trains only the domain classifier: the features and the
    label classifier take the same step as with the label loss alone (catches --no-adapt leaking
    the domain gradient into the features); with lambda = 1 the features' step differs."""
    torch.manual_seed(0)
    a, b = gan_labs.DANN(3), gan_labs.DANN(3)
    b.load_state_dict(a.state_dict())
    x_s, x_t, y_s = torch.randn(8, 3, 28, 28), torch.randn(8, 3, 28, 28) + 1, torch.arange(8) % 3
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    gan_labs.dann_step(a, opt_a, x_s, y_s, x_t, lam, 0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(b.label_classifier(b.features(x_s)), y_s).backward()
    opt_b.step()
    for part in ("features", "label_classifier"):
        same = all(torch.allclose(p, q, atol=1e-7) for p, q in
                   zip(getattr(a, part).parameters(), getattr(b, part).parameters()))
        assert same == (lam == 0 or part == "label_classifier"), part
    assert not torch.equal(a.domain_classifier[0].weight, b.domain_classifier[0].weight)


@pytest.fixture(scope="session")
def gan_dann_runs(gan_data, tiny_data, tmp_path_factory):
    """DANN and its source-only baseline on tiny data: 3-class 28x28 grey digits -> the same
    digits blended with crops of the 32x32 RGB images; and a DANN run interrupted (Ctrl-C) right
    after its first checkpoint, then run again."""
    root = tmp_path_factory.mktemp("dann")
    common = ["dann", "--data", str(gan_data), "--target-patches", str(tiny_data), "--epochs", "2",
              "--batch-size", "16", "--threads", "1", "--device", "cpu"]
    for name, flags in (("adapt", []), ("no_adapt", ["--no-adapt"])):
        gan_labs.main(common + flags + ["--out", str(root / name)])
    save = gan_labs.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gan_labs, "save_checkpoint", save_then_interrupt)
        with pytest.raises(SystemExit, match="interrupted"):
            gan_labs.entry_point(gan_labs.main, common + ["--out", str(root / "resumed")])
    assert gan_ckpt(root / "resumed")["epoch"] == 1
    gan_labs.main(common + ["--out", str(root / "resumed")])
    return root


def test_gan_dann_end_to_end_with_and_without_adaptation(gan_dann_runs):
    for name in ("adapt", "no_adapt"):
        out = gan_dann_runs / name
        for file in ("metrics.csv", "summary.json", "features.png", "checkpoint.pt"):
            assert (out / file).exists(), file
        assert not list(out.glob("*.tmp*"))
        rows = gan_read_csv(out / "metrics.csv")
        assert [int(r["iter"]) for r in rows] == [3, 6]  # 48 source images / 16 per step
        assert list(rows[0]) == ["epoch", "iter", "lambda", "lr", "loss_y", "loss_d",
                                 "train_domain_acc", "source_acc", "target_acc", "domain_acc",
                                 "s_per_iter"]  # the columns users' scripts read
        # each epoch logs its last step's schedules, at progress p = step / all steps (3 per
        # epoch, 2 epochs): catches a progress that restarts each epoch or counts epochs only
        for r, p in zip(rows, (2 / 6, 5 / 6)):
            lam = 0.0 if name == "no_adapt" else 2 / (1 + math.exp(-10 * p)) - 1
            assert float(r["lambda"]) == pytest.approx(lam, rel=1e-6)
            assert float(r["lr"]) == pytest.approx(0.01 / (1 + 10 * p) ** 0.75, rel=1e-6)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["adapt"] == (name == "adapt") and summary["train_wall_s"] > 0
        for key in ("source_acc", "target_acc", "domain_acc"):
            assert 0 <= summary[key] <= 1 and summary[key] == float(rows[-1][key])
    adapt, no_adapt = (gan_ckpt(gan_dann_runs / n)["net"] for n in ("adapt", "no_adapt"))
    # the same seed, the same batches: only the reversed domain gradient separates the two runs
    assert not torch.equal(adapt["features.0.weight"], no_adapt["features.0.weight"])


def test_gan_dann_resume_gives_the_same_weights(gan_dann_runs, gan_data, tiny_data, tmp_path,
                                               capsys):
    """Interrupted after epoch 1 and run again = uninterrupted, bit for bit (catches a schedule
    or batch order that restarts); another --epochs is another schedule: refused."""
    resumed, straight = (gan_ckpt(gan_dann_runs / n) for n in ("resumed", "adapt"))
    assert resumed["epoch"] == 2
    assert all(torch.equal(resumed["net"][k], v) for k, v in straight["net"].items())
    argv = ["dann", "--data", gan_data, "--target-patches", tiny_data, "--epochs", "3",
            "--batch-size", "16", "--out", gan_dann_runs / "adapt"]
    gan_user_error(capsys, argv, "--epochs 2 (now 3)")


def test_gan_dann_reads_a_ready_target_set(gan_data, tmp_path):
    """--target PATH (e.g. the real MNIST-M) replaces the built one; here the source itself."""
    gan_labs.main(["dann", "--data", str(gan_data), "--target", str(gan_data), "--epochs", "1",
                   "--batch-size", "16", "--threads", "1", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["args"]["target"] == str(gan_data) and 0 <= summary["target_acc"] <= 1


@pytest.mark.parametrize("case", ["missing_target", "small_patches", "other_lab_option",
                                  "gan_folder", "target_size"])
def test_gan_dann_bad_input_is_one_clear_line(case, gan_data, tiny_data, gan_dcgan_run, tmp_path,
                                              capsys):
    argv = ["dann", "--data", gan_data, "--target-patches", tiny_data, "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--out", tmp_path / "run"]
    if case == "missing_target":
        argv[4], want = tmp_path / "nowhere", "nor a folder"
    elif case == "small_patches":
        for i in range(2):
            (tmp_path / "small" / "train" / "0").mkdir(parents=True, exist_ok=True)
            to_pil_image(torch.zeros(3, 16, 16, dtype=torch.uint8)).save(
                tmp_path / "small" / "train" / "0" / f"{i}.png")
        argv[4], want = tmp_path / "small", "smaller than the 28x28 digits"
    elif case == "other_lab_option":
        argv, want = argv + ["--ngf", "8"], "unrecognized arguments: --ngf"
    elif case == "target_size":  # 32x32 images as the target of 28x28 digits
        argv, want = argv + ["--target", tiny_data], "has 32x32 images, the source 28x28"
    else:  # a GAN lab's folder is not resumed as a DANN run
        argv[-1], want = gan_dcgan_run, "--lab 'dcgan' (now 'dann')"
    gan_user_error(capsys, argv, want)


@pytest.mark.parametrize("lab", ["dcgan", "wgan"])
def test_gan_bf16_runs_finish_and_write_their_outputs(lab, gan_common, tmp_path, monkeypatch):
    """--precision bf16 on the CPU: the BCE game and the WGAN-GP game (its double backward too)
    train G's and D's first convolutions in bfloat16 (catches autocast off), end with finite
    losses and every file of a run (catches an autocast region that breaks a loss, or a log
    taken in bfloat16)."""
    out = tmp_path / lab
    extra = ["--n-critic", "1"] if lab == "wgan" else []  # 3 steps of tiny data: G steps too
    dtypes, build = {"g": set(), "d": set()}, gan_labs.build_models

    def recording_build(*args, **kwargs):
        nets = build(*args, **kwargs)
        for name, net in zip("gd", nets):
            first = next(m for m in net if isinstance(m, (torch.nn.Conv2d,
                                                          torch.nn.ConvTranspose2d)))
            first.register_forward_hook(  # training passes (samples for figures: fp32)
                lambda m, x, y, name=name: dtypes[name].add(y.dtype) if m.training else None)
        return nets
    monkeypatch.setattr(gan_labs, "build_models", recording_build)
    gan_labs.main([str(a) for a in (lab, *gan_common, *GAN_TINY, *extra, "--precision", "bf16",
                                    "--out", out)])
    assert dtypes == {"g": {torch.bfloat16}, "d": {torch.bfloat16}}
    gan_check_run(out, bce=lab == "dcgan")
    ckpt = gan_ckpt(out)
    assert ckpt["flags"]["precision"] == "bf16"
    conv = [w for w in ckpt["g"].values() if w.dim() == 4][0]  # the faster layout was used
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# ----------------------------------------------------------------------------- the exercises
# docs/exercises.md: each exercise is a function (or a few) a student writes, graded by the
# tests whose names carry its tag: `python -m pytest -q -k ex07 test_smoke.py`. The handout and
# the grade are this file's command line (pytest takes no options of ours without a conftest.py):
#     python test_smoke.py handout --out DIR [--exercises ex03 ex07 | --lab NAME]
#     python test_smoke.py grade [DIR]
# The proof that each exercise can be graded (its emptied function fails, the reference passes,
# each typical wrong answer fails) is a test, skipped unless asked for:
#     EXERCISE_PROOF=1 python -m pytest -q -s -k proof test_smoke.py
import argparse  # noqa: E402  (this part's own imports)
import re  # noqa: E402
import shutil  # noqa: E402

Exercise = collections.namedtuple("Exercise", "tag title lab functions wrong")
# functions: (script, name) pairs, "Class.method" for a method; (script, name, (first, last))
# empties only the statements from the one starting with `first` to the one starting with `last`. A
# function that several scripts share (the same text) is emptied in each of them.
# wrong: (what, ((file, old text, new text), ...)): a typical wrong answer, planted by the proof;
# the old text occurs exactly once in its file.
CNN_COPIES = ("pretrain.py", "train_small.py", "train_advreg.py", "collect_kernels.py")
FRECHET_COPIES = ("collect_kernels.py", "train_advreg.py", "gan_labs.py")
KERNEL_COPIES = ("collect_kernels.py", "train_advreg.py")


def in_every(files, old, new):
    """The same replacement in every copy of a shared function."""
    return tuple((name, old, new) for name in files)


EXERCISES = (
    Exercise("ex01", "the paper's CNN", "paper", (("pretrain.py", "PaperCNN.__init__"),
                                                  ("pretrain.py", "PaperCNN.forward")), (
        ("a bias in conv1 (BatchNorm follows it: the paper has none)", in_every(
            CNN_COPIES, "nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)",
            "nn.Conv2d(3, 64, 7, stride=2, padding=3)")),
        ("conv2 without padding", in_every(
            CNN_COPIES, "nn.Conv2d(64, 128, 5, stride=2, padding=2, bias=False)",
            "nn.Conv2d(64, 128, 5, stride=2, padding=0, bias=False)")),
        ("no ReLU after the second block", in_every(
            CNN_COPIES, "x = F.relu(self.bn2(self.conv2(x)))", "x = self.bn2(self.conv2(x))")),
        ("global max pooling instead of the average", in_every(
            CNN_COPIES, "(self.conv4(x)))\n        return self.fc(x.mean(dim=(2, 3)))",
            "(self.conv4(x)))\n        return self.fc(x.amax(dim=(2, 3)))")))),
    Exercise("ex02", "G(z) = z and D(G(z))", "paper", (("train_advreg.py", "sample_fakes"),
                                                       ("train_advreg.py", "judge")), (
        ("the fakes detached from conv1 (the generator loss then trains nothing)", (
            ("train_advreg.py", "kernels = kernels_of(getattr(model, layer).weight)\n        pick",
             "kernels = kernels_of(getattr(model, layer).weight.detach())\n        pick"),)),
        ("the kernels drawn with torch's global generator, not D's own", (
            ("train_advreg.py", "torch.randperm(len(kernels), generator=d_gen, device=",
             "torch.randperm(len(kernels), device="),)),
        ("D shown the raw kernels, not standardized ones", (
            ("train_advreg.py", "disc(to_d_input(fakes[layer], d_input))",
             "disc(fakes[layer][:, None])"),)))),
    Exercise("ex03", "the generator loss", "paper", (("train_advreg.py", "generator_loss"),), (
        ("the saturating loss log(1 - D(G(z)))", (
            ("train_advreg.py", "return sum((bce(d_fake, 1.0) for",
             "return sum((-bce(d_fake, 0.0) for"),)),
        ("the fakes' target 0, D's own (the generator helps D)", (
            ("train_advreg.py", "return sum((bce(d_fake, 1.0) for",
             "return sum((bce(d_fake, 0.0) for"),)))),
    Exercise("ex04", "D's step", "paper", (("train_advreg.py", "discriminator_step"),), (
        ("the labels swapped (bank 0, fakes 1)", (
            ("train_advreg.py", "disc_loss = lam * (bce(d_real, 1.0) + bce(d_fake, 0.0))",
             "disc_loss = lam * (bce(d_real, 0.0) + bce(d_fake, 1.0))"),)),
        ("D's loss without lam", (
            ("train_advreg.py", "disc_loss = lam * (bce(d_real, 1.0) + bce(d_fake, 0.0))",
             "disc_loss = bce(d_real, 1.0) + bce(d_fake, 0.0)"),)),
        ("D's loss differentiated into the classifier too", (
            ("train_advreg.py", "disc_loss.backward(inputs=list(disc.parameters()))",
             "disc_loss.backward()"),)))),
    Exercise("ex05", "Algorithm 1, one iteration", "paper", (
        ("train_advreg.py", "train", ("with autocast(args.precision, device):",
                                      "optimizer.step()")),), (
        ("the classifier step on cls_loss - lam * reg_loss", (
            ("train_advreg.py", "(cls_loss + lam * reg_loss).backward(",
             "(cls_loss - lam * reg_loss).backward("),)),
        ("the classifier step without lam", (
            ("train_advreg.py", "(cls_loss + lam * reg_loss).backward(",
             "(cls_loss + reg_loss).backward("),)))),
    Exercise("ex06", "standardized kernels", "metrics", (
        ("collect_kernels.py", "standardize_kernels"), ("train_advreg.py", "to_d_input")), (
        ("the mean over all kernels", in_every(
            KERNEL_COPIES, "flat = flat - flat.mean(dim=1, keepdim=True)",
            "flat = flat - flat.mean()")),
        ("one std for all kernels", in_every(
            KERNEL_COPIES, "return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-12)",
            "return flat / flat.std().clamp_min(1e-12)")),
        ("D's input: one std for the whole batch", (
            ("train_advreg.py", "kernels / (kernels.std(dim=(1, 2), keepdim=True) + 1e-8)",
             "kernels / (kernels.std() + 1e-8)"),)))),
    Exercise("ex07", "the Fréchet distance", "metrics", (
        ("collect_kernels.py", "psd_sqrt"), ("collect_kernels.py", "frechet_distance")), (
        ("without the means' term", in_every(
            FRECHET_COPIES, "((a.mean(0) - b.mean(0)) ** 2).sum().item()", "0.0")),
        ("tr(C_a^1/2 C_b^1/2) for the root's trace", in_every(
            FRECHET_COPIES, "inner = root_a @ cov_b @ root_a\n    tr_covmean = torch.linalg."
            "eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()",
            "tr_covmean = (root_a @ psd_sqrt(cov_b)).trace()")),
        ("the matrix root taken element by element", in_every(
            FRECHET_COPIES,
            "w, v = torch.linalg.eigh(m)\n    return (v * w.clamp(min=0).sqrt()) @ v.T",
            "return m.clamp(min=0).sqrt()")))),
    Exercise("ex08", "the low-frequency share", "metrics", (
        ("collect_kernels.py", "low_freq_share"),), (
        ("the mean not removed", in_every(
            KERNEL_COPIES, "centered = kernels.double() - kernels.double().mean(dim=(-2, -1), "
            "keepdim=True)", "centered = kernels.double()")),
        ("|X| instead of |X|^2", in_every(
            KERNEL_COPIES, "power = torch.fft.fft2(centered).abs() ** 2",
            "power = torch.fft.fft2(centered).abs()")),
        ("the energy pooled over kernels", in_every(
            KERNEL_COPIES, "return (power[:, low].sum(1) / power.sum(dim=(1, 2)).clamp_min(1e-12)"
            ").mean().item()", "return (power[:, low].sum() / power.sum()).item()")))),
    Exercise("ex09", "AMP's perturbation and step", "transfer", (
        ("train_small.py", "perturb_adversarially"), ("train_small.py", "train_step")), (
        ("the inner step descends", (
            ("train_small.py", "d.add_(g, alpha=inner_lr)", "d.add_(g, alpha=-inner_lr)"),)),
        ("no projection onto the ball", (
            ("train_small.py", "shrink = torch.clamp(epsilon / (norm + 1e-12), max=1.0)",
             "shrink = 1.0"),)),
        ("delta rescaled onto the sphere ||delta|| = eps", (
            ("train_small.py", "shrink = torch.clamp(epsilon / (norm + 1e-12), max=1.0)",
             "shrink = epsilon / (norm + 1e-12)"),)),
        ("the weights left at theta + delta", (
            ("train_small.py", "                p.copy_(t)\n", "                pass\n"),)))),
    Exercise("ex10", "freezing and the probe", "transfer", (
        ("train_small.py", "freeze"), ("train_small.py", "train_mode"),
        ("train_small.py", "Probe.forward")), (
        ("convN frozen without its BatchNorm", (
            ("train_small.py", "getattr(model, name).requires_grad_(False)",
             "getattr(model, layer).requires_grad_(False)"),)),
        ("a frozen BatchNorm left in train mode", (
            ("train_small.py", "getattr(model, name).eval()", "getattr(model, name).train()"),)),
        ("the probe one block short", (
            ("train_small.py", "for i in range(1, self.depth + 1):",
             "for i in range(1, self.depth):"),)),
        ("the probe without its ReLUs", (
            ("train_small.py", 'x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))',
             'x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))'),)))),
    Exercise("ex11", "the paired difference and its t interval", "metrics", (
        ("collect_kernels.py", "t_quantile"), ("collect_kernels.py", "paired_difference")), (
        ("the t quantile's integral with 4 Simpson intervals", (
            ("collect_kernels.py", "def cdf(x, n=2000):", "def cdf(x, n=4):"),)),
        ("the interval over the pairs, not over the draws", (
            ("collect_kernels.py", "values = per_subset if len(per_subset) > 1 else list("
             "pairs.values())", "values = list(pairs.values())"),)),
        ("the std over n, not n - 1", (
            ("collect_kernels.py", "for v in values) / (n - 1))", "for v in values) / n)"),)),
        ("the normal's 1.96 instead of the t quantile", (
            ("collect_kernels.py", "half = t_quantile(0.975, n - 1) * std",
             "half = 1.96 * std"),)))),
    Exercise("ex12", "FGSM and PGD", "attacks", (("collect_kernels.py", "fgsm"),
                                                 ("collect_kernels.py", "pgd")), (
        ("FGSM with the opposite sign", (
            ("collect_kernels.py", "return (x + eps * loss_gradient(model, x, y).sign())",
             "return (x - eps * loss_gradient(model, x, y).sign())"),)),
        ("FGSM without the clamp to [0, 1]", (
            ("collect_kernels.py", "return (x + eps * loss_gradient(model, x, y).sign()).clamp("
             "0, 1)", "return x + eps * loss_gradient(model, x, y).sign()"),)),
        ("PGD without the projection onto the eps ball", (
            ("collect_kernels.py", "torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)",
             "x_adv.clamp(0, 1)"),)),
        ("PGD's step eps / steps instead of 2.5 eps / steps", (
            ("collect_kernels.py", "step = 2.5 * eps / steps", "step = eps / steps"),)),
        ("PGD without the clamp", (
            ("collect_kernels.py", "torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)",
             "torch.min(torch.max(x_adv, x - eps), x + eps)"),)))),
    Exercise("ex13", "the saliency map", "attacks", (("collect_kernels.py", "on_pixels"),
                                                     ("collect_kernels.py", "saliency")), (
        ("the CNN left in train mode", (
            ("collect_kernels.py", "    cnn.eval()\n", "    cnn.train()\n"),)),
        ("the pixels fed without the training normalization", (
            ("collect_kernels.py", "return lambda x: cnn((x - 0.5) / 0.5)",
             "return lambda x: cnn(x)"),)),
        ("the map summed over the colour channels", (
            ("collect_kernels.py", "return torch.autograd.grad(score, x)[0].abs().amax(dim=1)",
             "return torch.autograd.grad(score, x)[0].abs().sum(dim=1)"),)),
        ("the predicted class's score, not the true class's", (
            ("collect_kernels.py", "score = model(x).gather(1, y[:, None]).sum()",
             "score = model(x).max(1).values.sum()"),)),
        ("the loss's gradient, not the class score's", (
            ("collect_kernels.py", "score = model(x).gather(1, y[:, None]).sum()",
             'score = F.cross_entropy(model(x), y, reduction="sum")'),)))),
    Exercise("ex14", "the GAN game", "gans", (("gan_labs.py", "bce_step"),), (
        ("D's loss with the opposite sign", (
            ("gan_labs.py", "loss_d = -(log_clamped(d_real).mean() + log_clamped(1 - d_fake)"
             ".mean())", "loss_d = log_clamped(d_real).mean() + log_clamped(1 - d_fake).mean()"),)),
        ("the non-saturating G loss with the opposite sign", (
            ("gan_labs.py", "else -log_clamped(d_gen).mean()", "else log_clamped(d_gen).mean()"),)),
        ("the fakes shown to D with the real images' labels", (
            ("gan_labs.py", "d(fake_a, y_fake)\n", "d(fake_a, y_real)\n"),)),
        ("DiffAugment on the real batch only", (
            ("gan_labs.py", "real_a, fake_a = aug(real), aug(fake.detach())",
             "real_a, fake_a = aug(real), fake.detach()"),)))),
    Exercise("ex15", "the WGAN critic, its penalty and clipping", "gans", (
        ("gan_labs.py", "wgan_critic_step"), ("gan_labs.py", "gradient_penalty"),
        ("gan_labs.py", "clip_weights")), (
        ("the critic's loss with the opposite sign", (
            ("gan_labs.py", "loss_d = d_fake.mean() - d_real.mean()",
             "loss_d = d_real.mean() - d_fake.mean()"),)),
        ("the penalty at the real points only", (
            ("gan_labs.py", "x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)",
             "x_hat = real.clone().requires_grad_(True)"),)),
        ("one interpolation weight for the whole batch", (
            ("gan_labs.py", "eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1),",
             "eps = torch.rand(1, *[1] * (real.dim() - 1),"),)),
        ("the penalty without its - 1", (
            ("gan_labs.py", "return lam * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()",
             "return lam * grad.flatten(1).norm(dim=1).pow(2).mean()"),)),
        ("the weights clipped before the critic's step", (
            ("gan_labs.py", "    opt_d.step()  # RMSProp (WGAN line 6) or Adam (WGAN-GP line 9)\n"
             "    if constraint == \"clip\":\n        clip_weights(d, clip)",
             "    if constraint == \"clip\":\n        clip_weights(d, clip)\n"
             "    opt_d.step()"),)))),
    Exercise("ex16", "DANN: gradient reversal, the step, pseudo-labels", "dann", (
        ("gan_labs.py", "GradientReversal.forward"), ("gan_labs.py", "GradientReversal.backward"),
        ("gan_labs.py", "dann_step"), ("gan_labs.py", "pseudo_labels")), (
        ("the reversal with the opposite sign", (
            ("gan_labs.py", "return -ctx.lam * grad_output, None",
             "return ctx.lam * grad_output, None"),)),
        ("the domain classifier fed the features without the reversal", (
            ("gan_labs.py", "GradientReversal.apply(f, lam)", "f"),)),
        ("the step's learning rate ignored", (
            ("gan_labs.py", "        group[\"lr\"] = lr\n", "        pass\n"),)),
        ("pseudo-labels kept below the threshold", (
            ("gan_labs.py", "torch.where(confidence > threshold, predicted, -1)",
             "torch.where(confidence < threshold, predicted, -1)"),)),
        ("the pseudo-labelled target images left out of the label loss", (
            ("gan_labs.py", "F.cross_entropy(net.label_classifier(f), torch.cat([y_source, "
             "y_target]),", "F.cross_entropy(net.label_classifier(f[:len(x_source)]), y_source,"),
        )))),
)
LABS = {"paper": "ex01 ex02 ex03 ex04 ex05", "metrics": "ex06 ex07 ex08 ex11",
        "transfer": "ex09 ex10", "attacks": "ex12 ex13", "gans": "ex14 ex15", "dann": "ex16"}
COURSE = ("pretrain.py", "collect_kernels.py", "train_small.py", "train_advreg.py", "gan_labs.py",
          "test_smoke.py", os.path.join("docs", "exercises.md"))


def find_def(tree, name):
    """The def or class `name` ("Class.method" for a method) in a parsed module."""
    node = tree
    for part in name.split("."):
        node = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        assert node is not None, f"{name}: not defined"
    return node


def empty_functions(source, targets):
    """`source` with the body of each target's function (name, tag, part) replaced by a
    NotImplementedError naming the exercise, its docstring kept; with a part (first, last: how
    their lines start) only the statements from the first to the last."""
    lines = source.splitlines(keepends=True)
    tree, spans = ast.parse(source), []
    for name, tag, part in targets:
        node, what = find_def(tree, name), name.split(".")[-1]
        if part is None:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            start, end = body[0], body[-1]
        else:
            def starting(text):
                found = [s for s in ast.walk(node) if isinstance(s, ast.stmt)
                         and lines[s.lineno - 1].strip().startswith(text)]
                assert len(found) == 1, f"{name}: {len(found)} statements start with {text!r}"
                return found[0]
            start, end, what = starting(part[0]), starting(part[1]), f"the lines of {what}"
        spans.append((start.lineno, end.end_lineno, " " * start.col_offset + (
            f'raise NotImplementedError("{tag}: write {what}, docs/exercises.md")\n')))
    for first, last, stub in sorted(spans, reverse=True):
        lines[first - 1:last] = [stub]
    new = "".join(lines)
    ast.parse(new)
    return new


def emptied_sources(root, tags):
    """script -> its source with the exercises' functions emptied, in every script that has a
    copy of a shared function (a function of OWN only in its own script)."""
    sources, targets = {}, collections.defaultdict(list)
    for name in COURSE[:5]:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            sources[name] = f.read()
    defined = {name: top_level_sources(source) for name, source in sources.items()}
    for exercise in (e for e in EXERCISES if e.tag in tags):
        for script, name, *part in exercise.functions:
            top = name.split(".")[0]
            copies = [s for s in sources if defined[s].get(top) == defined[script][top]]
            for copy_ in copies if top not in OWN else [script]:
                targets[copy_].append((name, exercise.tag, part[0] if part else None))
    return {name: empty_functions(source, targets[name]) for name, source in sources.items()}


def chosen_exercises(exercises, lab):
    tags = exercises or (LABS[lab].split() if lab else [e.tag for e in EXERCISES])
    unknown = sorted(set(tags) - {e.tag for e in EXERCISES})
    if unknown:
        raise SystemExit(f"error: no exercise {' '.join(unknown)} (ex01-ex{len(EXERCISES):02d})")
    return [e.tag for e in EXERCISES if e.tag in tags]


def copy_course(out, root=ROOT):
    for name in COURSE:
        os.makedirs(os.path.join(out, os.path.dirname(name)), exist_ok=True)
        shutil.copy(os.path.join(root, name), os.path.join(out, name))


def handout(out, tags):
    """The course in `out`, with the chosen exercises' functions emptied."""
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} is not empty; give a new folder")
    copy_course(out)
    for name, source in emptied_sources(ROOT, tags).items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(source)
    with open(os.path.join(out, "handout.json"), "w", encoding="utf-8") as f:
        json.dump({"exercises": tags}, f)


def grading(folder, tag, first_failure=False):
    """Run an exercise's grading command in `folder`: (exit code, output, seconds by the clock,
    seconds of CPU: what the clock would read on an idle CPU with one thread)."""
    env = {k: v for k, v in os.environ.items() if k != "EXERCISE_PROOF"}
    start, cpu = time.time(), os.times()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--tb=short", *(["-x"] if first_failure else []), "-k", tag,
                           "test_smoke.py"], cwd=folder, capture_output=True, text=True, env=env)
    used = os.times()
    cpu = used.children_user + used.children_system - cpu.children_user - cpu.children_system
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start, cpu


def verdict(tag, code, output):
    if code == 0:
        return "pass"
    if code == 5:
        return "FAIL (no test carries the tag)"
    waiting = sorted(set(re.findall(r"NotImplementedError: (ex\d\d)", output)))
    if tag in waiting:
        return "not started (NotImplementedError)"
    if waiting:
        return f"FAIL (waits for {' '.join(waiting)})"
    return "FAIL"


def grade(folder, tags):
    print(f"grading {os.path.abspath(folder)}: python -m pytest -q -k exNN test_smoke.py")
    passed = 0
    for exercise in (e for e in EXERCISES if e.tag in tags):
        code, output, seconds, _ = grading(folder, exercise.tag)
        passed += code == 0
        print(f"{exercise.tag}  {exercise.title:<50} {verdict(exercise.tag, code, output):<36} "
              f"{seconds:5.1f} s", flush=True)
    print(f"{passed} of {len(tags)} pass")
    return 0 if passed == len(tags) else 1


def exercises_main(argv=None):
    p = argparse.ArgumentParser(prog="python test_smoke.py", description="The exercises of "
                                "docs/exercises.md: a handout with their functions emptied, and "
                                "the grade of each.")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("handout", help="copy the course with the chosen exercises emptied")
    h.add_argument("--out", required=True, help="a new folder")
    which = h.add_mutually_exclusive_group()
    which.add_argument("--exercises", nargs="+", metavar="exNN", help="(default: all)")
    which.add_argument("--lab", choices=sorted(LABS), help="a lab's exercises: " + "; ".join(
        f"{lab} {tags}" for lab, tags in LABS.items()))
    g = sub.add_parser("grade", help="pass / FAIL / not started, one line per exercise")
    g.add_argument("folder", nargs="?", default=ROOT, help="a handout (default: this course)")
    g.add_argument("--exercises", nargs="+", metavar="exNN",
                   help="(default: the handout's, else all)")
    args = p.parse_args(argv)
    if args.command == "handout":
        tags = chosen_exercises(args.exercises, args.lab)
        handout(os.path.expanduser(args.out), tags)
        print(f"{args.out}: the course with {' '.join(tags)} to write; grade it with "
              f"python test_smoke.py grade {args.out}")
        return 0
    folder = os.path.expanduser(args.folder)
    given = os.path.join(folder, "handout.json")
    tags = args.exercises or (json.load(open(given))["exercises"] if os.path.exists(given)
                              else None)
    return grade(folder, chosen_exercises(tags, None))


if __name__ == "__main__":
    sys.exit(exercises_main())


def test_ex01_paper_cnn_blocks_have_the_papers_shapes():
    """Each copy of the paper's CNN against the network written here with the model's own
    weights: four blocks of convolution (stride 2, padding k // 2, no bias), BatchNorm and ReLU,
    64 x 16 x 16 -> 128 x 8 x 8 -> 128 x 4 x 4 -> 256 x 2 x 2 for a 32 x 32 image, global
    average pooling, the linear head. Catches a bias, a missing padding or ReLU, a max pool."""
    x = torch.randn(2, 3, 32, 32)
    for module in (pretrain, train_small, train_advreg, collect_kernels):
        torch.manual_seed(0)
        model = module.PaperCNN(10).eval()
        randomize_batchnorm(model)
        shapes = []
        for i in range(1, 5):
            getattr(model, f"bn{i}").register_forward_hook(
                lambda m, inputs, out: shapes.append(tuple(out.shape[1:])))
        logits = model(x)
        assert shapes == [(64, 16, 16), (128, 8, 8), (128, 4, 4), (256, 2, 2)], module
        h = x
        for i, k in enumerate((7, 5, 5, 3), 1):
            conv, bn = getattr(model, f"conv{i}"), getattr(model, f"bn{i}")
            assert conv.bias is None and conv.kernel_size == (k, k), module
            h = F.conv2d(h, conv.weight, stride=2, padding=k // 2)
            h = F.relu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias))
        want = h.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
        assert logits.shape == (2, 10) and torch.allclose(logits, want, atol=1e-5), module


def test_ex10_freeze_train_mode_and_the_probe_against_plain_torch():
    """freeze: exactly the named layers (convN with its bnN) get no gradient; train_mode: the
    model trains, but a frozen layer's BatchNorm keeps its running statistics through a forward
    pass; Probe after conv2: conv1-conv2's blocks, global average pooling, a 128-wide head,
    against plain torch. Catches bnN left trainable or in train mode, a probe a block short or
    without its ReLUs."""
    torch.manual_seed(0)
    model = train_small.PaperCNN(10)
    randomize_batchnorm(model)
    frozen = {"conv1", "bn1", "conv3", "bn3"}
    train_small.freeze(model, ["conv1", "conv3"])
    for key, p in model.named_parameters():
        assert p.requires_grad == (key.split(".")[0] not in frozen), key
    train_small.train_mode(model.eval(), ["conv1", "conv3"])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 32, 32))
    for key, value in stats.items():
        moved = not torch.equal(model.state_dict()[key], value)
        assert moved == (key.split(".")[0] not in frozen), key
    probe = train_small.Probe(10, "conv2")
    randomize_batchnorm(probe)
    x = torch.randn(4, 3, 32, 32)
    h = x
    for i, k in ((1, 7), (2, 5)):
        conv, bn = getattr(probe, f"conv{i}"), getattr(probe, f"bn{i}")
        h = F.conv2d(h, conv.weight, stride=2, padding=k // 2)
        h = F.relu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    want = h.mean(dim=(2, 3)) @ probe.fc.weight.T + probe.fc.bias
    assert probe.fc.weight.shape == (10, 128)
    assert torch.allclose(probe.eval()(x), want, atol=1e-5)


def test_the_exercises_tags_functions_wrong_answers_and_page_agree():
    """Every tag in a test's name is an exercise's, and every exercise has tests; every function
    to write is found (and emptied without a syntax error); every wrong answer's text occurs
    once in its file; docs/exercises.md has each exercise's heading and grading command."""
    tags = [e.tag for e in EXERCISES]
    assert tags == [f"ex{i:02d}" for i in range(1, len(EXERCISES) + 1)]
    named = collections.Counter(tag for name in globals() if name.startswith("test_")
                                for tag in re.findall(r"ex\d\d", name))
    assert set(named) == set(tags), named
    assert {t for lab in LABS.values() for t in lab.split()} == set(tags)
    emptied = emptied_sources(ROOT, tags)
    with open(os.path.join(ROOT, "docs", "exercises.md"), encoding="utf-8") as f:
        page = f.read()
    for name in COURSE[:5]:
        assert "NotImplementedError" not in open(os.path.join(ROOT, name)).read(), name
    for exercise in EXERCISES:
        for script, name, *_ in exercise.functions:
            assert f'raise NotImplementedError("{exercise.tag}: write' in emptied[script], name
        for what, plants in exercise.wrong:
            assert f"  - {what}\n" in page.split(f"## {exercise.tag}: ")[1].split("\n## ")[0], what
            for script, old, new in plants:
                count = open(os.path.join(ROOT, script)).read().count(old)
                assert count == 1, (what, script, count)
    for exercise in EXERCISES:
        assert f"## {exercise.tag}: {exercise.title}\n" in page, exercise.tag
        assert f"python -m pytest -q -k {exercise.tag} test_smoke.py" in page, exercise.tag


@pytest.mark.skipif(not os.environ.get("EXERCISE_PROOF"), reason="about 15 minutes: "
                    "EXERCISE_PROOF=1 python -m pytest -q -s -k proof test_smoke.py")
@pytest.mark.parametrize("number", range(1, len(EXERCISES) + 1), ids="exercise{:02d}".format)
def test_exercise_proof_empty_fails_reference_passes_each_wrong_answer_fails(number, tmp_path):
    """For one exercise: its handout's grading fails on the NotImplementedError; the reference's
    passes, in at most 20 s of CPU; each listed wrong answer, planted in a copy of the course,
    fails."""
    exercise = EXERCISES[number - 1]
    tag = exercise.tag
    handout(str(tmp_path / "handout"), [tag])
    code, output, seconds, _ = grading(tmp_path / "handout", tag, first_failure=True)
    print(f"\n{tag} emptied: exit {code}, {seconds:.1f} s")
    assert code == 1 and f"NotImplementedError: {tag}" in output, output[-3000:]
    copy_course(tmp_path / "reference")
    code, output, seconds, cpu = grading(tmp_path / "reference", tag)
    print(f"{tag} reference: {output.strip().splitlines()[-1]} ({seconds:.1f} s by the clock, "
          f"{cpu:.1f} s of CPU)")
    assert code == 0, output[-3000:]
    assert cpu <= 20  # the clock reads more where other jobs share the CPU
    for i, (what, plants) in enumerate(exercise.wrong):
        folder = tmp_path / f"wrong{i}"
        copy_course(folder)
        for script, old, new in plants:
            text = (folder / script).read_text(encoding="utf-8")
            assert text.count(old) == 1, (what, script, old)
            (folder / script).write_text(text.replace(old, new), encoding="utf-8")
        code, output, seconds, _ = grading(folder, tag, first_failure=True)
        print(f"{tag} wrong, {what}: exit {code}, {seconds:.1f} s")
        assert code == 1, (what, output[-3000:])


# ----------------------------------------------------------------------------- front page and flags
import argparse  # noqa: E402  (this part's own imports)
import fnmatch  # noqa: E402
import glob  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

BF16_SCRIPTS = (pretrain, train_small, train_advreg, gan_labs)  # the scripts with --precision
SLOW_BF16 = "warning: this CPU has no native bf16"


def bf16_warnings(capsys):
    """The slow-bf16 warning lines a run wrote to stderr, and whether stderr starts with one."""
    err = capsys.readouterr().err.splitlines()
    return sum(SLOW_BF16 in line for line in err), bool(err) and SLOW_BF16 in err[0]


@pytest.mark.parametrize("module", BF16_SCRIPTS, ids=lambda m: m.__name__)
def test_bf16_on_a_cpu_without_native_bf16_warns_once_at_the_start(module, tiny_data, gan_data,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """Told that the CPU has no native bf16, every script with --precision says so in one line,
    stderr's first, once for a run of two seeds or epochs (catches a warning never printed, or
    printed per seed); with fp32 it says nothing."""
    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "run"
    if module is gan_labs:
        argv = ["dann", "--data", gan_data, "--target-patches", tiny_data, "--epochs", "2",
                "--batch-size", "16", "--threads", "1", "--device", "cpu"]
    else:
        argv = ["--data", tiny_data, "--seeds", "0", "1", "--epochs", "1", "--device", "cpu"]
        argv += {pretrain: ["--batch-size", "32"],
                 train_small: ["--per-class", "2", "--eval-every", "1"],
                 train_advreg: ["--per-class", "2", "--eval-every", "1", "--d-batch", "16",
                                "--bank", tmp_bank(tmp_path, torch.randn(64, 7, 7))]}[module]
    for precision, warnings in (("fp32", 0), ("bf16", 1)):
        module.main([str(a) for a in argv + ["--precision", precision,
                                             "--out", out / precision]])
        said, first = bf16_warnings(capsys)
        assert (said, first) == (warnings, warnings == 1), precision


def test_the_bf16_warning_only_where_bf16_is_emulated(monkeypatch, capsys):
    """The warning asks for --precision bf16, a CPU and no native bf16, all three (catches a
    warning on a GPU or with native bf16); it names the flag to use instead."""
    for precision, device, native in [(p, d, n) for p in ("fp32", "bf16")
                                      for d in ("cpu", "cuda", "mps") for n in (False, True)]:
        monkeypatch.setattr(train_small, "cpu_has_native_bf16", lambda: native)
        train_small.warn_if_bf16_is_slow(precision, torch.device(device))
        err = capsys.readouterr().err
        assert (SLOW_BF16 in err) == (precision == "bf16" and device == "cpu" and not native)
        assert err.count("\n") == (SLOW_BF16 in err) and ("--precision fp32" in err or not err)


def test_native_bf16_is_read_from_torch_or_from_proc_cpuinfo(monkeypatch):
    """torch's capabilities decide; without them, /proc/cpuinfo's flags; without either, no
    warning. An AVX2-only CPU (the issue's: 13x slower in bf16) has none of the flags."""
    detect = train_small.cpu_has_native_bf16
    avx2, amx = {"avx2": True, "avx512_bf16": False}, {"avx2": True, "amx_bf16": True}
    for capabilities, native in ((avx2, False), ({"avx512_bf16": True}, True), (amx, True),
                                 ({"architecture": "arm64", "bf16": True}, True)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        assert detect() == native, capabilities
    real_cpuinfo = os.path.exists("/proc/cpuinfo")
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    if real_cpuinfo:  # this machine: both ways give one answer
        monkeypatch.undo()
        torch_says = detect()
        monkeypatch.delattr(torch.cpu, "get_capabilities")
        assert detect() == torch_says
    for cpuinfo, native in (("flags\t: fpu sse2 avx2 fma\n", False),
                            ("flags\t: avx2 avx512f avx512_bf16\n", True),
                            ("Features\t: fp asimd bf16 i8mm\n", True), (None, True)):
        monkeypatch.setattr(pathlib.Path, "read_text", lambda path, *a, text=cpuinfo, **k: text)
        monkeypatch.setattr(pathlib.Path, "exists", lambda path, text=cpuinfo: text is not None)
        assert detect() == native, cpuinfo  # None: no /proc/cpuinfo at all


def test_dann_under_bf16_computes_its_activations_in_bfloat16(gan_data, tiny_data, tmp_path,
                                                             monkeypatch):
    """dann --precision bf16: the features of the training step are bfloat16, with fp32 they are
    float32 (catches the flag parsed but the step not autocast); the run ends with finite
    losses, its flag recorded."""
    dtypes = []

    class Spied(gan_labs.DANN):
        def __init__(self, n_classes):
            super().__init__(n_classes)
            self.features.register_forward_hook(
                lambda module, inputs, output: dtypes.append(output.dtype)
                if torch.is_grad_enabled() and output.requires_grad else None)
    monkeypatch.setattr(gan_labs, "DANN", Spied)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        dtypes.clear()
        out = tmp_path / precision
        gan_labs.main(["dann", "--data", str(gan_data), "--target-patches", str(tiny_data),
                       "--epochs", "1", "--batch-size", "16", "--threads", "1", "--device", "cpu",
                       "--precision", precision, "--out", str(out)])
        assert dtypes and set(dtypes) == {dtype}, (precision, set(dtypes))
        assert gan_ckpt(out)["flags"]["precision"] == precision
        rows = gan_read_csv(out / "metrics.csv")
        assert all(math.isfinite(float(r["loss_y"]) + float(r["loss_d"])) for r in rows)


class ParserBuilt(Exception):
    """Raised in place of parsing: carries the parser a script's parse_args built."""


def parser_of(module):
    """The argparse parser of a script's parse_args, built in this process and not run."""
    def capture(parser, *args, **kwargs):
        raise ParserBuilt(parser)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(ParserBuilt) as built:
            module.parse_args([])
    return built.value.args[0]


def accepted_flags():
    """{"train_small.py": {"--lr", ...}, "gan_labs.py dcgan": {...}, ...}: what --help lists."""
    flags = {}
    for module in SCRIPTS:
        parser, name = parser_of(module), module.__name__ + ".py"
        flags[name] = set(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    flags[f"{name} {sub}"] = set(subparser._option_string_actions)
    return flags


def split_page(text):
    """A Markdown page as (the lines of its fenced code blocks, a line ending in a backslash
    joined to the next; its prose)."""
    code, prose, inside = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        else:
            (code if inside else prose).append(line)
    return "\n".join(code).replace("\\\n", " ").splitlines(), "\n".join(prose)


def commands_of(code_lines, scripts):
    """(script, its words) of every `python SCRIPT.py ...` in shell lines; $NAME is expanded
    from an earlier NAME=VALUE line (the README's T="--data ... --seeds ...")."""
    variables, found = {}, []
    for line in code_lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell
            continue
        expanded = []
        for word in words:
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", word, re.S)
            variable = re.fullmatch(r"\$\{?(\w+)\}?", word)
            if assignment and not expanded:
                variables[assignment[1]] = assignment[2]
            elif variable and variable[1] in variables:
                expanded += variables[variable[1]].split()
            else:
                expanded.append(word)
        for i, word in enumerate(expanded[1:], 1):
            if os.path.basename(word) in scripts and expanded[i - 1].startswith("python"):
                found.append((os.path.basename(word), expanded[i + 1:]))
    return found


def undefined_flags_in_commands(text, accepted):
    """Every flag of a command in the page's code blocks that its parser lacks, and every
    gan_labs.py subcommand that does not exist."""
    wrong = []
    for script, words in commands_of(split_page(text)[0], {k for k in accepted if " " not in k}):
        name = script
        if any(key.startswith(script + " ") for key in accepted):  # gan_labs.py SUBCOMMAND
            subcommand = words[0] if words else ""
            name = f"{script} {subcommand}"
            if name not in accepted:
                wrong.append(name)
                continue
        for word in words:
            flag = word.split("=")[0]
            if flag.startswith("--") and flag not in accepted[name]:
                wrong.append(f"{name} {flag}")
    return wrong


def prose_units(prose):
    """Sentences, list items and table rows of Markdown prose, each on one line."""
    units = []
    for block in re.split(r"\n\s*\n|\n(?=\s*[-*|] )|\n(?=\|)", prose):
        block = " ".join(block.split())
        units += re.split(r"(?<=\.)\s+(?=[A-Z`*(\[])", block)
    return units


def takes(script, flag, named, accepted):
    """Whether a flag said of `script` in a sentence naming the words `named` is the script's.
    For gan_labs.py: its every subcommand the sentence does not name has it, or one it names
    (\"every subcommand but `memorization`\"); a flag said of gan_labs.py alone is its every
    subcommand's."""
    subcommands = {k.split()[1] for k in accepted if k.startswith(script + " ")}
    if not subcommands:
        return flag in accepted[script]
    said_of = subcommands & named
    return (any(flag in accepted[f"{script} {s}"] for s in said_of)
            or all(flag in accepted[f"{script} {s}"] for s in subcommands - said_of))


def undefined_flags_in_prose(text, accepted):
    """The page's prose against --help: every backticked --flag exists in some script; in a
    sentence, list item or table row that names scripts, it is taken by one of them."""
    scripts = {k for k in accepted if " " not in k}
    everywhere = set().union(*accepted.values())
    wrong = []
    for unit in prose_units(split_page(text)[1]):
        spans = re.findall(r"`([^`]*)`", unit)
        flags = {f for span in spans for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)}
        named = {word for span in spans for word in re.findall(r"[\w.]+", span)}
        said_of = sorted(named & scripts)
        for flag in sorted(flags):
            if flag not in everywhere:
                wrong.append(f"{flag}: no script has it: {unit[:80]}")
            elif said_of and not any(takes(s, flag, named, accepted) for s in said_of):
                wrong.append(f"{flag}: said of {', '.join(said_of)}, which lacks it (name the "
                             f"subcommands that take it): {unit[:80]}")
    return wrong


def front_pages():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_readme_and_docs_commands_use_only_flags_that_help_lists():
    """Every `python SCRIPT.py [SUBCOMMAND] --flag ...` in the code blocks of README.md and
    docs/*.md, and in the scripts' docstrings (the top of --help), uses flags its parser has;
    every flag the README's prose names is taken by the scripts it is said of. Read from the
    pages as they are, whatever commands they hold; a misspelt flag is found (checked below)."""
    accepted = accepted_flags()
    assert {"train_small.py", "gan_labs.py dann", "gan_labs.py memorization"} <= set(accepted)
    assert "--precision" in accepted["gan_labs.py dann"] and "--seed" not in accepted[
        "gan_labs.py memorization"]
    pages = {path: open(path).read() for path in front_pages()}
    pages.update({module.__name__ + ".py": f"```\n{module.__doc__}\n```" for module in SCRIPTS})
    counted = sum(len(commands_of(split_page(t)[0], set(accepted))) for t in pages.values())
    readme = pages[front_pages()[0]]
    assert len(commands_of(split_page(readme)[0], set(accepted))) >= 5 and counted >= 50
    wrong = {os.path.basename(p): undefined_flags_in_commands(t, accepted)
             for p, t in pages.items()}
    wrong["README.md prose"] = undefined_flags_in_prose(readme, accepted)
    assert {page: w for page, w in wrong.items() if w} == {}
    # the check can fail: a misspelt flag, a flag of another lab, a lab that does not exist,
    # a flag said of gan_labs.py that one of its subcommands lacks
    planted = {"python train_small.py --data x --eval-evry 10": ["train_small.py --eval-evry"],
               "T=\"--seeds 0 --thread 1\"\npython pretrain.py $T": ["pretrain.py --thread"],
               "python gan_labs.py dann --ngf 8": ["gan_labs.py dann --ngf"],
               "python gan_labs.py dcagn --data mnist": ["gan_labs.py dcagn"]}
    for command, found in planted.items():
        assert undefined_flags_in_commands(f"```\n{command}\n```", accepted) == found, command
    said = "`gan_labs.py` takes `--data`, `--device` and `--seed` (one run per call)."
    assert [w.split(":")[0] for w in undefined_flags_in_prose(said, accepted)] == ["--data",
                                                                                   "--seed"]
    assert undefined_flags_in_prose("The trainers take `--precison bf16`.", accepted)


def shell_commands(text, home="/home/student"):
    """Every `python SCRIPT ...` that a page's code blocks run, as bash expands it: the blocks
    run in order in one bash, with `python` a function that prints its words, nothing on PATH
    (no other program runs) and HOME a fixed folder; [(block number, words)]."""
    script = ['python() { printf "%s\x1f" "@@$BLOCK" "$@"; printf "\n"; }', 'nohup() { "$@"; }']
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M)
    for i, (info, body) in enumerate(blocks):
        if info.strip() in ("", "bash", "sh"):
            script.append(f"BLOCK={i}; read -r -d '' BODY <<'END_OF_BLOCK_{i}'\n{body}"
                          f"END_OF_BLOCK_{i}\neval \"$BODY\" 2>/dev/null")
    proc = subprocess.run([shutil.which("bash"), "-c", "\n".join(script)], capture_output=True,
                          text=True, env={"HOME": home, "PATH": ""}, cwd=tempfile.mkdtemp(),
                          timeout=60)
    words = [line.split("\x1f")[:-1] for line in proc.stdout.splitlines()]
    return [(int(w[0][2:]), w[1:]) for w in words if w and w[0].startswith("@@")]


def path_values(parser, words):
    """(flag, value) of every path flag (a string flag without choices) that a command's words
    give, as argparse reads them; and the command's --out (or its default)."""
    with contextlib.redirect_stderr(io.StringIO()):
        found, parsed = [], parser.parse_args(words)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers:
        parser = subparsers[0].choices[words[0]]
    for action in parser._actions:
        dest = getattr(parsed, action.dest, None)
        if (action.option_strings and action.type is None and action.choices is None
                and action.nargs != 0 and dest and action.dest not in ("layers", "diffaug")
                and any(w.split("=")[0] in action.option_strings for w in words)):
            found += [(action.option_strings[-1], v) for v in ([dest] if isinstance(dest, str)
                                                                else dest)]
    return found, getattr(parsed, "out", None)


def misplaced_paths(pages, home="/home/student"):
    """Each documented command that its parser refuses (a placeholder such as `--seed S`), and
    each path flag's value that is neither a dataset name, nor under $HOME, nor under the --out
    of a documented command (a misspelt variable, which bash expands to nothing; a path that no
    command makes); --out, --data-root and --cache-dir name outputs and are not checked."""
    parsers = {m.__name__ + ".py": parser_of(m) for m in SCRIPTS}
    datasets = set(train_small.TORCHVISION_DATASETS)
    commands, outs, wrong = [], [], []
    for page, text in pages.items():
        for block, words in shell_commands(text, home):
            script = os.path.basename(words[0]) if words else ""
            if script in parsers:
                try:
                    with pytest.MonkeyPatch.context() as mp:  # the scripts expand ~ themselves
                        mp.setenv("HOME", home)
                        values, out = path_values(parsers[script], words[1:])
                except SystemExit:
                    wrong.append(f"{page} block {block}: {script} does not parse: {words[1:]}")
                    continue
                commands.append((page, block, script, values))
                outs += [out] if out else []
    for page, block, script, values in commands:
        for flag, value in values:
            if flag in ("--out", "--data-root", "--cache-dir") or value in datasets \
                    or value.startswith(home + "/"):
                continue
            parts = value.split("/")
            if not any(len(o.split("/")) <= len(parts) and all(
                    fnmatch.fnmatch(p, q) or fnmatch.fnmatch(q, p)
                    for p, q in zip(parts, o.rstrip("/").split("/"))) for o in outs):
                wrong.append(f"{page} block {block}: {script} {flag} {value}: no command makes it")
    return wrong


def test_docs_command_blocks_run_as_written_in_bash():
    """The code blocks of README.md and docs/*.md, run by bash (their assignments and loops
    expanded as a user's shell does, no program run): every command parses (types, choices),
    and every path it reads is a dataset name, under $HOME, or made by a documented command.
    The check can fail: a misspelt variable, a placeholder and a path nothing makes are found
    (a `~` inside quotes is fine: bash leaves it, and every path flag expands it)."""
    pages = {os.path.basename(p): open(p).read() for p in front_pages()}
    assert sum(len(shell_commands(t)) for t in pages.values()) >= 150
    assert misplaced_paths(pages) == []
    planted = {'T="--data $HOEM/data/cifar10 --seeds 0"\npython train_small.py $T --out runs/x':
               "train_small.py --data /data/cifar10: no command makes it",
               "python gan_labs.py dcgan --seed S --out runs/g": "gan_labs.py does not parse",
               "python train_advreg.py --bank kernels/nowhere.pt": "train_advreg.py --bank"}
    for block, said in planted.items():
        found = misplaced_paths({"page": f"```\n{block}\n```\n"})
        assert len(found) == 1 and said in found[0], (block, found)


class FakeTorchvisionSet:
    """A few images in the shape of torchvision's CIFAR10 / MNIST: .data, .targets, .classes,
    and (PIL image, label) items. No download."""
    shape, classes, mode = (32, 32, 3), ["airplane", "automobile", "bird"], "RGB"

    def __init__(self, root, train=True, download=False):
        n = 24 if train else 12  # over 10: file names must sort as the indices do
        g = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (n, *self.shape), generator=g, dtype=torch.uint8)
        self.targets = [(i * 2) % len(self.classes) for i in range(n)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return PIL.Image.fromarray(self.data[i].numpy(), mode=self.mode), self.targets[i]


class FakeMNIST(FakeTorchvisionSet):
    shape, classes, mode = (28, 28), ["0 - zero", "1 - one", "2 - two"], "L"


def export_snippets():
    """The README's command that makes the offline ImageFolder from a torchvision download."""
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(),
                            re.S):
        start = block.find('python -c "')
        if start >= 0 and "torchvision.datasets" in block and ".save(" in block:
            found.append(block[start:block.index("\n", block.index('"', start + 11))])
    assert found, "README.md has no `python -c \"...torchvision.datasets...save(\"` export block"
    return found


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_the_imagefolder_export_gives_what_the_torchvision_name_gives(name, tmp_path,
                                                                     monkeypatch):
    """The documented export of a torchvision download to PNGs, run on a fake dataset: the
    scripts' loader reads the tree (train/<class>/x.png, test/<class>/x.png) as the torchvision
    name's images, labels and classes, in the same order, class by class (catches a lossy format,
    classes out of order, a split written into the other, the torchvision split left in its own
    interleaved order: then a seeded sample of test images would differ between the two)."""
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeTorchvisionSet)
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    for k, snippet in enumerate(export_snippets()):
        words = shlex.split(snippet)
        assert words[:2] == ["python", "-c"] and len(words) == 5, words
        out = tmp_path / f"{name}_{k}"
        monkeypatch.setattr(sys, "argv", ["-c", name, str(out)])
        exec(words[2], {})
        for split in ("train", "test"):
            train_small.load_split.cache_clear()
            x, y, classes = train_small.load_split(str(out), "data", split)
            want_x, want_y, want_classes = train_small.load_split(name, "data", split)
            assert classes == want_classes and len(list((out / split).glob("*/*.png"))) == len(y)
            # one order for both loaders, class by class (the fake set interleaves its classes),
            # so every seeded sample (the 100 images, --test-limit, --curve-size) is the same
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
            assert torch.equal(y, torch.sort(y).values) and len(set(y[:3].tolist())) == 1
    train_small.load_split.cache_clear()


# ----------------------------------------------------------------------------- gan_labs values
# Each game's step against the game written here in plain torch, with SGD (its update is the
# gradient itself: a flipped sign or a missing factor moves the weights elsewhere).
def gan_sgd_step(net, loss, lr):
    """Plain SGD on `net` for `loss`, in place."""
    grads = torch.autograd.grad(loss, list(net.parameters()))
    with torch.no_grad():
        for p, grad in zip(net.parameters(), grads):
            p.sub_(lr * grad)


def gan_assert_same_nets(ours, reference, start):
    """Every parameter and buffer of `ours` equals the reference's, to 1e-4 of the largest move
    from `start` (the nets before the step), which must be a real move."""
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, expected[key]), key
            continue
        move = (expected[key] - start[key]).abs().max().item()
        assert torch.allclose(value, expected[key], rtol=0, atol=1e-4 * move + 1e-9), key
    assert any(not torch.equal(v, start[k]) for k, v in ours.state_dict().items())


def gan_aug(x):
    """A deterministic, differentiable stand-in for DiffAugment: it must reach every D input."""
    return 0.5 * x.flip(3) + 0.1


@pytest.mark.parametrize("case", ["dcgan", "cdcgan", "diffaug_saturating"])
def test_ex14_gan_bce_step_is_the_gan_game(case):
    """gan_labs.bce_step against Goodfellow et al.'s Alg. 1 (k = 1) written here: D descends
    -log D(x) - log(1 - D(G(z))) on real and detached fakes, then G descends -log D(G(z))
    (saturating: log(1 - D(G(z)))) through the UPDATED D, on the same fakes; the cDCGAN's labels
    go into G and D; DiffAugment on every D input. Catches a flipped or saturating loss where it
    should not be, the fakes judged with the real images' labels, the augmentation on one side
    only."""
    k = 3 if case == "cdcgan" else 0
    aug = gan_aug if case == "diffaug_saturating" else gan_labs.identity
    saturating, lr = case == "diffaug_saturating", 0.5
    torch.manual_seed(0)
    g = gan_labs.dcgan_generator(8, 4, 1, 32, n_classes=k)
    d = gan_labs.dcgan_discriminator(4, 1, 32, n_classes=k)
    g.apply(gan_labs.dcgan_init)
    d.apply(gan_labs.dcgan_init)
    g_ref, d_ref = (copy.deepcopy(net) for net in (g, d))
    start_g, start_d = ({k_: v.clone() for k_, v in net.state_dict().items()} for net in (g, d))
    real, z = torch.rand(8, 1, 32, 32) * 2 - 1, torch.randn(8, 8)
    y_real, y_fake = (torch.arange(8) % 3, torch.arange(8) // 3 % 3) if k else (None, None)
    out = gan_labs.bce_step(g, d, torch.optim.SGD(g.parameters(), lr=lr),
                            torch.optim.SGD(d.parameters(), lr=lr), real, z, y_real, y_fake,
                            aug, saturating=saturating)
    # the reference: (1) D on real and on detached fakes, (2) G through the updated D
    fake = g_ref(z, y_fake)
    d_real, d_fake = d_ref(aug(real), y_real), d_ref(aug(fake.detach()), y_fake)
    loss_d = -(torch.log(d_real).mean() + torch.log(1 - d_fake).mean())
    gan_sgd_step(d_ref, loss_d, lr)
    d_gen = d_ref(aug(fake), y_fake)
    loss_g = torch.log(1 - d_gen).mean() if saturating else -torch.log(d_gen).mean()
    gan_sgd_step(g_ref, loss_g, lr)
    gan_assert_same_nets(d, d_ref, start_d)
    gan_assert_same_nets(g, g_ref, start_g)
    for key, want in (("loss_d", loss_d), ("loss_g", loss_g), ("d_real", d_real.mean()),
                      ("d_fake", d_fake.mean())):
        assert out[key].item() == pytest.approx(want.item(), rel=1e-5), key


def gan_smooth_critic():
    """A critic whose gradient depends on its input (tanh), unlike a linear one: the gradient
    penalty then depends on where the interpolates lie."""
    torch.manual_seed(1)
    return gan_labs.Net(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                        torch.nn.Linear(16, 1), torch.nn.Flatten(0))


@pytest.mark.parametrize("constraint", ["gp", "clip"])
def test_ex15_gan_wgan_steps_are_the_papers(constraint):
    """wgan_critic_step against WGAN-GP's Alg. 1 lines 4-9 (the critic descends D(G(z)) - D(x) +
    10 (||grad D(x_hat)|| - 1)^2 at x_hat = e x + (1 - e) G(z), e ~ U[0, 1] per sample) or WGAN's
    lines 3-7 (the same without the penalty, then every weight clipped to [-c, c]), and
    wgan_generator_step against lines 11-12 (G descends -D(G(z))). Catches a flipped critic or
    generator loss, a penalty at the wrong points or with one e for the batch (a linear critic
    could not tell), clipping before the step."""
    lr = 0.1
    d = gan_smooth_critic()
    torch.manual_seed(2)
    g = gan_labs.Net(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Unflatten(1, (1, 8, 8)))
    d_ref, g_ref = copy.deepcopy(d), copy.deepcopy(g)
    start_d, start_g = ({k: v.clone() for k, v in net.state_dict().items()} for net in (d, g))
    real, z, z_g = torch.randn(16, 1, 8, 8), torch.randn(16, 4), torch.randn(16, 4)
    # the reference first, to choose a clip bound that clips some weights and not others
    fake = gan_aug(g_ref(z).detach())
    loss_d = d_ref(fake).mean() - d_ref(gan_aug(real)).mean()
    torch.manual_seed(3)  # the interpolation weights e, as gradient_penalty draws them
    e = torch.rand(16, 1, 1, 1)
    x_hat = (e * gan_aug(real) + (1 - e) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(d_ref(x_hat).sum(), x_hat, create_graph=True)
    gp = 10 * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    gan_sgd_step(d_ref, loss_d + gp if constraint == "gp" else loss_d, lr)
    c = 0.5 * max(p.abs().max().item() for p in d_ref.parameters())
    if constraint == "clip":
        with torch.no_grad():
            for p in d_ref.parameters():
                p.clamp_(-c, c)
    torch.manual_seed(3)
    out = gan_labs.wgan_critic_step(g, d, torch.optim.SGD(d.parameters(), lr=lr), real, z,
                                    gan_aug, constraint, c)
    assert out["wdist"].item() == pytest.approx(-loss_d.item(), rel=1e-5)  # D(x) - D(G(z))
    gan_assert_same_nets(d, d_ref, start_d)
    assert torch.equal(g.state_dict()["0.weight"], start_g["0.weight"])  # the critic step only
    if constraint == "gp":
        assert gp.item() > 0.1 and out["gp"].item() == pytest.approx(gp.item(), rel=1e-5)
    assert out["loss_d"].item() == pytest.approx(
        (loss_d + (gp if constraint == "gp" else 0)).item(), rel=1e-5)
    gan_labs.wgan_generator_step(g, d, torch.optim.SGD(g.parameters(), lr=lr), z_g, gan_aug)
    gan_sgd_step(g_ref, -d_ref(gan_aug(g_ref(z_g))).mean(), lr)
    gan_assert_same_nets(g, g_ref, start_g)


def test_ex16_gan_dann_step_features_get_the_label_gradient_minus_lambda_domain_gradient():
    """dann_step (SGD, lambda = 0.7, the step's lr 0.05 over the optimizer's 1.0) against the
    DANN paper's update written here: G_f moves by -lr (dL_y/dtheta_f - lambda dL_d/dtheta_f),
    G_y by -lr dL_y/dtheta_y, G_d by -lr dL_d/dtheta_d, with L_d the logistic loss of source = 0,
    target = 1. Catches a reversal of the wrong sign, the domain loss on one domain, the step's
    learning rate not applied."""
    lam, lr = 0.7, 0.05
    torch.manual_seed(0)
    net = gan_labs.DANN(3)
    ref = copy.deepcopy(net)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    x_s, x_t, y_s = torch.randn(8, 3, 28, 28), torch.randn(6, 3, 28, 28) + 1, torch.arange(8) % 3
    gan_labs.dann_step(net, torch.optim.SGD(net.parameters(), lr=1.0), x_s, y_s, x_t, lam, lr)
    f_s, f_t = ref.features(x_s), ref.features(x_t)
    loss_y = F.cross_entropy(ref.label_classifier(f_s), y_s)
    logits = ref.domain_classifier(torch.cat([f_s, f_t]))
    loss_d = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.zeros(8), torch.ones(6)]))
    parts = {name: list(getattr(ref, name).parameters())
             for name in ("features", "label_classifier", "domain_classifier")}
    g_y = torch.autograd.grad(loss_y, parts["features"] + parts["label_classifier"],
                              retain_graph=True)
    g_d = torch.autograd.grad(loss_d, parts["features"] + parts["domain_classifier"])
    n_f = len(parts["features"])
    with torch.no_grad():
        for i, p in enumerate(parts["features"]):
            p.sub_(lr * (g_y[i] - lam * g_d[i]))
        for p, grad in zip(parts["label_classifier"], g_y[n_f:]):
            p.sub_(lr * grad)
        for p, grad in zip(parts["domain_classifier"], g_d[n_f:]):
            p.sub_(lr * grad)
    gan_assert_same_nets(net, ref, start)


# ----------------------------------------------------------------------------- data to numbers
# Each path that carries the data to a published number, on inputs built so that the plausible
# wrong computation gives another answer than the right one.
def small_args(data, **flags):
    return argparse.Namespace(**dict(dict(data=str(data), data_root="data", per_class=3,
                                          subset_seed=0, val_size=0, test_limit=0), **flags))


@pytest.mark.parametrize("loader", ["imagefolder", "torchvision"])
def test_the_draw_of_the_images_follows_subset_seed_and_keeps_each_pair(loader, tiny_data,
                                                                       monkeypatch):
    """--subset-seed draws --per-class images of every class: the same seed the same images,
    another seed other images (catches a seed that is ignored: five "draws" would be one), each
    image with its own label (found again in the whole split), with either loader."""
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeTorchvisionSet)
    data = tiny_data if loader == "imagefolder" else "cifar10"
    train_small.load_split.cache_clear()
    all_x, all_y, _ = train_small.load_split(str(data), "data", "train")
    draws = [train_small.load_small_data(small_args(data, subset_seed=s), torch.device("cpu"))
             for s in (0, 0, 1, 2)]
    train_small.load_split.cache_clear()
    assert torch.equal(draws[0]["train_x"], draws[1]["train_x"])
    for a, b in ((0, 2), (0, 3), (2, 3)):
        assert not torch.equal(draws[a]["train_x"], draws[b]["train_x"]), (a, b)
    for d in draws:
        assert torch.bincount(d["train_y"]).tolist() == [3] * len(all_y.unique())
        for x, y in zip(d["train_x"], d["train_y"]):
            at = [i for i in range(len(all_x)) if torch.equal(all_x[i], x)]
            assert at and all_y[at[0]] == y  # the image is in the split, with this label


def test_pretrain_train_and_test_limit_keep_image_label_pairs(tiny_data):
    """--train-limit / --test-limit take a fixed random subset of the images WITH their labels
    (catches images and labels sampled apart: the accuracy would be chance)."""
    pretrain.load_split.cache_clear()
    args = argparse.Namespace(data=str(tiny_data), data_root="data", train_limit=17, test_limit=7)
    train_x, train_y, test_x, test_y, _ = pretrain.load_pretraining_data(args, torch.device("cpu"))
    assert len(train_x) == 17 and len(test_x) == 7
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        all_x, all_y, _ = pretrain.load_split(str(tiny_data), "data", split)
        assert not torch.equal(ys, all_y[:len(ys)])  # a random subset, not the first images
        for x, y in zip(xs, ys):
            at = [i for i in range(len(all_x)) if torch.equal(all_x[i], x)]
            assert at and all_y[at[0]] == y
    pretrain.load_split.cache_clear()


def test_augment_draws_every_offset_both_ways_and_flips_half():
    """The crop's offset (dy, dx) is uniform on -4..+4 in both axes and half of the images are
    mirrored, read back from images whose pixels hold their own row and column (catches a crop
    that shifts one way only, a flip rate other than 1/2, a flip of the rows)."""
    n, pad = 4000, 4
    rows, cols = torch.meshgrid(torch.arange(1, 33), torch.arange(1, 33), indexing="ij")
    image = torch.stack([rows, cols, torch.full_like(rows, 255)]).to(torch.uint8)  # 0 = padding
    torch.manual_seed(0)
    out = pretrain.augment(image.expand(n, -1, -1, -1).contiguous(), pad)
    centre = out[:, :, 8:24, 8:24].long()  # never padding: offsets are at most 4
    # output pixel (r, j) shows input row r + dy, and column j + dx, or 31 - j + dx if mirrored
    dy = centre[:, 0, 0, 0] - 9  # (the centre's (0, 0) is the output's (8, 8); values are + 1)
    mirrored = centre[:, 1, 0, 1] < centre[:, 1, 0, 0]
    dx = torch.where(mirrored, centre[:, 1, 0, 0] - 24, centre[:, 1, 0, 0] - 9)
    for shift in (dy, dx):
        counts = torch.bincount(shift + pad, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1 and counts.min() > n / 9 * 0.8, counts.tolist()
    assert abs(mirrored.float().mean().item() - 0.5) < 0.03
    for i in range(0, n, 397):  # the whole image is that crop, padding included
        padded = F.pad(image, (pad, pad, pad, pad))[:, pad + dy[i]:pad + dy[i] + 32,
                                                     pad + dx[i]:pad + dx[i] + 32]
        assert torch.equal(out[i], padded.flip(2) if mirrored[i] else padded), i


@pytest.mark.parametrize("module", [pretrain, train_small, train_advreg])
def test_the_trainers_augment_by_default_and_not_with_no_augment(module, tiny_data, tmp_path,
                                                                monkeypatch):
    """The paper trains with crop + flip: every training batch goes through augment by default,
    none with --no-augment (catches the flag read the wrong way round)."""
    calls = []
    monkeypatch.setattr(module, "augment", lambda x: calls.append(len(x)) or x)
    flags = {pretrain: ["--train-limit", "32", "--test-limit", "8", "--batch-size", "16"],
             train_small: ["--per-class", "2", "--eval-every", "1"],
             train_advreg: ["--per-class", "2", "--eval-every", "1", "--lam", "0", "--bank",
                            tmp_bank(tmp_path, torch.randn(300, 7, 7))]}[module]
    for extra, images in (([], 32 if module is pretrain else 20), (["--no-augment"], 0)):
        calls.clear()
        module.main(["--data", str(tiny_data), "--epochs", "1", "--seeds", "0", *flags, *extra,
                     "--out", str(tmp_path / f"run{len(extra)}")])
        assert sum(calls) == images, extra


def test_ex09_amp_delta_lies_inside_a_ball_larger_than_its_step():
    """With a radius ten times one ascent step, delta is that step, lr * grad L(theta), strictly
    inside the ball (catches delta rescaled onto the sphere ||delta|| = eps), and the parameters
    sit at theta + delta."""
    model, loss_fn, _, _ = amp_setup()
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    grads = torch.autograd.grad(loss_fn(), params)
    lr = 1e-3
    epsilon = 10 * lr * torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    theta, delta = train_small.perturb_adversarially(params, loss_fn, epsilon, lr, 1)
    for t, d, g, p, s in zip(theta, delta, grads, params, start):
        assert torch.equal(t, s)
        assert torch.allclose(d, lr * g, rtol=1e-5, atol=1e-10)
        assert torch.allclose(p, s + d, rtol=0, atol=1e-7)
    norm = torch.sqrt(sum((d ** 2).sum() for d in delta)).item()
    assert norm == pytest.approx(epsilon / 10, rel=1e-4)


def plain_attacks(reference, x, y, eps, steps):
    """FGSM (Goodfellow et al.) and PGD (Madry et al.: `steps` sign steps of 2.5 eps / steps,
    each projected onto the L-inf ball and [0, 1]) written here on the eval-mode reference."""
    fgsm = (x + eps * plain_loss_gradient(reference, x, y)[1].sign()).clamp(0, 1)
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv + 2.5 * eps / steps * plain_loss_gradient(reference, x_adv, y)[1].sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return fgsm, x_adv


def test_ex12_every_attack_column_is_the_accuracy_on_the_attacked_images():
    """robustness_row's columns (the microscope's table) against FGSM and PGD written in plain
    torch, each scored on its attacked images (catches a column scored on the clean images, a
    PGD step of another size, an attack at another eps)."""
    cnn, _ = microscope_cnn()
    with torch.no_grad():  # sharper logits: attacks of 2/255 and 4/255 flip some predictions
        for m in cnn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(3)
        cnn.fc.weight.mul_(20)
    reference = copy.deepcopy(cnn).eval()
    x, _ = microscope_batch(40)
    with torch.no_grad():
        y = reference((x - 0.5) / 0.5).argmax(1)  # clean accuracy 1: every attack shows
    model = collect_kernels.on_pixels(cnn)
    want = {"clean_acc": 1.0}
    for e in (2, 4):
        fgsm, pgd = plain_attacks(reference, x, y, e / 255, steps=3)
        assert torch.allclose(collect_kernels.pgd(model, x, y, e / 255, 3), pgd, atol=1e-6)
        with torch.no_grad():
            want[f"fgsm_{e}/255"] = (reference((fgsm - 0.5) / 0.5).argmax(1) == y).sum() / 40
            want[f"pgd_{e}/255"] = (reference((pgd - 0.5) / 0.5).argmax(1) == y).sum() / 40
    want = {k: float(v) for k, v in want.items()}
    assert len(set(want.values())) >= 4, want  # the columns differ: a mix-up shows
    got = collect_kernels.robustness_row(model, x, y, epsilons=[2, 4], steps=3, batch_size=16)
    assert got == {k: pytest.approx(v) for k, v in want.items()}
    assert list(got) == ["clean_acc", "fgsm_2/255", "fgsm_4/255", "pgd_2/255", "pgd_4/255"]


def plain_precision_recall(real, fake, k):
    """Kynkäänniemi et al.'s k-NN precision and recall, by brute force: a point's radius is the
    distance to its k-th nearest other point of its set."""
    def radii(points):
        return [sorted(torch.dist(a, b).item() for j, b in enumerate(points) if j != i)[k - 1]
                for i, a in enumerate(points)]

    def share_inside(queries, refs, r):
        return sum(any(torch.dist(q, ref).item() <= ri for ref, ri in zip(refs, r))
                   for q in queries) / len(queries)
    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def test_gan_precision_recall_is_the_k_nn_manifolds_by_brute_force():
    """On sets where swapping precision and recall, or taking the 2nd or 4th neighbour instead
    of the 3rd, gives another answer, gan_labs.precision_recall gives the brute force's."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 2, generator=g, dtype=torch.float64)
    fake = 1.6 * torch.randn(30, 2, generator=g, dtype=torch.float64) + 0.7
    want = plain_precision_recall(real, fake, 3)
    assert want[0] != want[1]
    assert plain_precision_recall(real, fake, 2) != want != plain_precision_recall(real, fake, 4)
    assert gan_labs.precision_recall(real, fake) == pytest.approx(want)


def test_gan_eval_reads_a_collapsed_generator_as_precise_but_without_recall(gan_common):
    """evaluate_gan's row for a generator that draws one real test image, whatever z: precision
    1 (its samples lie on the real images), recall near 1/24 (its manifold holds one image),
    a class share of 1 for one class (catches the two columns swapped)."""
    args = gan_labs.parse_args(["dcgan", *map(str, gan_common), "--eval-samples", "24",
                                "--device", "cpu", "--threads", "1"])
    cpu = torch.device("cpu")
    net, _ = gan_labs.metric_net(args, 1, cpu)
    one = gan_labs.to_float(gan_labs.load_data(args.data, args.data_root, "test",
                                               args.image_size, cpu)[0][:1])

    class Collapsed(torch.nn.Module):
        def forward(self, z, y=None):
            return one.expand(len(z), -1, -1, -1)
    generated, floor = gan_labs.evaluate_gan(args, Collapsed(), net, 0, cpu)
    assert generated["precision"] == 1.0 and generated["recall"] <= 2 / 24
    assert generated["class_share_max"] == 1.0 and floor["recall"] > 0.5


def test_gan_cdcgan_nets_read_their_labels():
    """The cDCGAN's G and D compute another output for another label, on the same z and x
    (catches a net built without its label: the lab would train an unconditional GAN); with
    --no-label-in-d, D does not see it."""
    for extra, d_reads in (([], True), (["--no-label-in-d"], False)):
        args = gan_labs.parse_args(["cdcgan", "--ngf", "8", "--ndf", "8", *extra])
        torch.manual_seed(0)
        g, d = gan_labs.build_models(args, 1, 3)
        g.eval(), d.eval()
        z, x = torch.randn(4, args.nz), torch.randn(4, 1, args.image_size, args.image_size)
        y0, y1 = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
        with torch.no_grad():
            assert (g(z, y0) - g(z, y1)).flatten(1).abs().amax(1).min() > 0
            assert (d(x, y0) != d(x, y1)).all() == d_reads


def test_compare_reads_a_transferred_conv1_against_the_bank_without_its_source(tiny_data,
                                                                              tmp_path):
    """A bank of three sources, each a Gaussian of kernels around its own pattern; a run whose
    conv1 is source 1's (--init-from, frozen) gets "Frechet to bank w/o its source": its kernels
    against sources 0 and 2 only (found by the file's hash, kept in the run and the bank), far
    above its in-sample distance to the whole bank; a run from scratch gets none (catches the
    wrong source left out, none left out, the hash not matched)."""
    sources, convs = tmp_path / "sources", []
    sources.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        net = pretrain.PaperCNN(10)
        with torch.no_grad():
            net.conv1.weight.copy_(3 * torch.randn(7, 7, generator=g)
                                   + torch.randn(64, 3, 7, 7, generator=g))
        convs.append(net.conv1.weight.detach().reshape(-1, 7, 7))
        torch.save({"arch": "PaperCNN", "model": net.state_dict()}, sources / f"m_seed{i}.pt")
    collect_kernels.main(["--checkpoints", str(sources), "--layers", "conv1", "--out",
                          str(tmp_path / "bank")])
    common = ["--data", str(tiny_data), "--per-class", "2", "--epochs", "1", "--seeds", "1"]
    train_small.main(common + ["--init-from", str(sources / "m_seed{seed}.pt"), "--transfer",
                               "conv1", "--freeze", "conv1", "--out", str(tmp_path / "t")])
    train_small.main(common + ["--out", str(tmp_path / "b")])
    collect_kernels.main(["--compare", str(tmp_path / "t/seed1/model.pt"),
                          str(tmp_path / "b/seed1/model.pt"), "--bank",
                          str(tmp_path / "bank/conv1_7x7.pt"), "--out", str(tmp_path / "cmp")])
    with open(tmp_path / "cmp" / "compare.csv") as f:
        scratch, transferred = list(csv.DictReader(f))  # the table's order: baseline first
    assert transferred["configuration"] == "transfer conv1, frozen conv1"
    std = collect_kernels.standardize_kernels
    want = collect_kernels.frechet_distance(std(convs[1]), std(torch.cat([convs[0], convs[2]])))
    assert float(transferred["frechet_without_source"]) == pytest.approx(want, rel=1e-6)
    assert want > 1.4 * float(transferred["frechet_to_bank"])  # in-sample: much closer
    assert scratch["frechet_without_source"] == ""
    assert "Frechet to bank w/o its source" in (tmp_path / "cmp" / "compare.md").read_text()
    # a bank of the run's own source alone leaves nothing to compare with: no value, no crash
    collect_kernels.main(["--checkpoints", str(sources / "m_seed1.pt"), "--layers", "conv1",
                          "--out", str(tmp_path / "bank1")])
    collect_kernels.main(["--compare", str(tmp_path / "t/seed1/model.pt"), "--bank",
                          str(tmp_path / "bank1/conv1_7x7.pt"), "--out", str(tmp_path / "cmp1")])
    with open(tmp_path / "cmp1" / "compare.csv") as f:
        assert next(csv.DictReader(f))["frechet_without_source"] == ""


def test_gan_memorization_check_samples_g_at_its_fixed_z_and_labels(gan_data):
    """memorization_check asks G for the 64 samples of the seed's fixed z (labels 0, 1, ..., k-1
    in turn, for the cDCGAN), then for n samples of the seed + 4 stream: read back from a G that
    records what it is given (catches an unseeded z, a lost label)."""
    x = gan_labs.load_data(str(gan_data), "data", "train", 32, torch.device("cpu"))[0]
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, z, y=None):
            calls.append((z.clone(), y))
            return gan_labs.to_float(x[:len(z)].repeat(3, 1, 1, 1)[:len(z)])
    torch.manual_seed(0)
    net = gan_labs.metric_classifier(1, GAN_CLASSES)
    gan_labs.memorization_check(Recorder(), net, x, x[:20], 7, 3, 5, 20)
    (z_shown, y_shown), (z_n, y_n) = calls
    assert torch.equal(z_shown, torch.randn(64, 7, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(z_n, torch.randn(20, 7, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(y_shown, torch.arange(64) % 3) and torch.equal(y_n, torch.arange(20) % 3)


def test_row_labels_name_the_transfer_recipes_and_layer_ranges():
    """The row labels --compare prints, from a run's flags: the fine-tune is not the probe, three
    or more consecutive convs read as a range, two as a sum."""
    def row(**flags):
        args = dict(transfer=None, freeze=[], amp_epsilon=None, init_bank=None, probe_after=None,
                    init_from=None)
        return train_small.row_label(argparse.Namespace(**(args | flags)))

    def label(**flags):
        return row(**flags)["label"]
    convs = ["conv1", "conv2", "conv3", "conv4"]
    common = dict(init_from="m_seed{seed}.pt", transfer=convs)
    assert label(**common) == "fine-tune (transfer conv1-4)"
    assert label(**common, freeze=convs) == "linear probe (transfer conv1-4, frozen conv1-4)"
    assert label(init_from="m.pt", transfer=convs[1:], freeze=convs[1:]) == \
        "transfer conv2-4, frozen conv2-4"
    assert label(init_from="m.pt", transfer=convs[:2]) == "transfer conv1+conv2"
    assert train_small.layers_label(["conv1", "conv3", "conv4"]) == "conv1+conv3+conv4"
    assert label(freeze=convs[:3]) == "baseline (λ = 0), frozen conv1-3"  # nothing transferred
    orders = [row(amp_epsilon=eps) for eps in (None, 0.3, 1.0)]  # baseline, then AMP by radius
    assert [(o["label"], o["row_order"]) for o in orders] == [
        ("baseline (λ = 0)", [0, 0, 0, 0.0]), ("AMP ε = 0.3", [1, 0, 0, 0.3]),
        ("AMP ε = 1", [1, 0, 0, 1.0])]


def test_conv1_from_a_small_bank_draws_with_replacement_by_seed():
    """A bank of fewer than 192 kernels: each of conv1's 64 x 3 kernels is one of the bank's,
    drawn with replacement, the same for the same seed and another for another seed."""
    bank = torch.randn(50, 7, 7)
    weights = []
    for seed in (3, 3, 4):
        model = train_small.PaperCNN(10)
        train_small.init_conv1_from_bank(model, bank, seed)
        weights.append(model.conv1.weight.detach().reshape(-1, 7, 7))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    found = [[i for i in range(50) if torch.equal(k, bank[i])] for k in weights[0]]
    assert all(len(f) == 1 for f in found) and len({f[0] for f in found}) < 50 < 192


def test_gray_images_become_three_equal_channels_at_32_pixels():
    """as_cifar_images: a gray batch (MNIST's 28 x 28) becomes RGB with three equal channels at
    the paper's CNN's 32 x 32; an RGB batch of that size stays as it is."""
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    rgb = pretrain.as_cifar_images(gray)
    assert rgb.shape == (5, 3, 32, 32) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    colour = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(pretrain.as_cifar_images(colour), colour)


def test_gan_accuracy_counts_the_predictions_that_match():
    """gan_labs.accuracy: 1 against the network's own predictions, 0 against any other label,
    3/8 where three of eight match."""
    torch.manual_seed(0)
    net = gan_labs.metric_classifier(1, 10).eval()
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    predicted = gan_labs.features(net, x, logits=True).argmax(1)
    wrong = (predicted + 1) % 10
    assert gan_labs.accuracy(net, x, predicted) == 1.0 and gan_labs.accuracy(net, x, wrong) == 0
    assert gan_labs.accuracy(net, x, torch.cat([predicted[:3], wrong[3:]])) == 3 / 8


def test_checkpoint_row_reads_the_history_and_ds_last_tenth():
    """compare.csv's row of a run: the last and the best test accuracy of its history, and D's
    outputs as the mean over the last tenth of its log (30 iterations: the last 3); a run
    without a log has none."""
    torch.manual_seed(0)
    weight = torch.randn(64, 3, 7, 7)
    bank = torch.randn(300, 7, 7)
    log = torch.rand(30, len(collect_kernels.LOG_COLUMNS))
    ckpt = {"model": {"conv1.weight": weight}, "args": {"per_class": 10, "subset_seed": 2},
            "seed": 1, "history": {"test_acc": [0.1, 0.3, 0.2], "train_acc": [0.5, 0.9]},
            "log": log}
    std = collect_kernels.standardize_kernels(bank)
    row, _ = collect_kernels.checkpoint_row("p", ckpt, "λ = 1", "conv1", bank, std)
    assert (row["final_test_acc"], row["best_test_acc"], row["final_train_acc"]) == (0.2, 0.3, 0.9)
    assert (row["subset"], row["seed"], row["kernels"]) == (2, 1, 192)
    for name in ("d_real", "d_fake"):
        column = log[:, collect_kernels.LOG_COLUMNS.index(name)]
        assert row[name] == pytest.approx(column[-3:].mean().item())
    del ckpt["log"]
    row, _ = collect_kernels.checkpoint_row("p", ckpt, "baseline", "conv1", bank, std)
    assert row["d_real"] is None and row["d_fake"] is None


def test_paired_difference_over_two_draws_and_its_cells():
    """Two draws of two seeds: the interval is a t interval (df = 1) over the two draws' mean
    differences, labelled so; the cells read "shown" only where the interval leaves out 0."""
    rows = [{"configuration": c, "subset": sub, "seed": seed, "final_test_acc": acc}
            for c, offsets in (("a", (0.0, 0.0, 0.0, 0.0)), ("b", (0.01, 0.03, 0.02, 0.06)))
            for (sub, seed), off in zip(((0, 0), (0, 1), (1, 0), (1, 1)), offsets)
            for acc in [0.2 + off]]
    d = collect_kernels.paired_difference(rows, "b", "a")
    means = [0.02, 0.04]  # the two draws' mean differences
    half = math.tan(math.pi * 0.475) * statistics.stdev(means) / math.sqrt(2)  # t(1) = Cauchy
    assert (d["pairs"], d["subsets"], d["interval"]) == (4, 2, "t over subsets")
    assert (d["mean"], d["ci_low"], d["ci_high"]) == pytest.approx((0.03, 0.03 - half, 0.03 + half))
    interval = f"[{0.03 - half:+.3f}, {0.03 + half:+.3f}]"
    assert collect_kernels.paired_cells(d) == ["+0.030", interval, "not shown"]
    shown = dict(d, mean=0.03, ci_low=0.01, ci_high=0.05)
    assert collect_kernels.paired_cells(shown) == ["+0.030", "[+0.010, +0.050]", "shown"]
    assert collect_kernels.paired_cells(dict(d, ci_low=None, ci_high=None)) == ["+0.030", "-", ""]
    ends_at_0 = dict(d, mean=-0.02, ci_low=-0.04, ci_high=0.0)  # it holds 0: not shown
    assert collect_kernels.paired_cells(ends_at_0) == ["-0.020", "[-0.040, +0.000]", "not shown"]


def test_robustness_row_attacks_at_each_eps_in_units_of_1_255(monkeypatch):
    """Each column's attack gets its eps / 255 (and PGD its steps), recorded from the calls."""
    calls = []
    monkeypatch.setattr(collect_kernels, "fgsm", lambda m, x, y, eps: calls.append(
        ("fgsm", eps)) or x)
    monkeypatch.setattr(collect_kernels, "pgd", lambda m, x, y, eps, steps: calls.append(
        ("pgd", eps, steps)) or x)
    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    collect_kernels.robustness_row(lambda x: torch.zeros(len(x), 10), x, y, [1, 8], 5)
    assert calls == [("fgsm", 1 / 255), ("fgsm", 8 / 255), ("pgd", 1 / 255, 5),
                     ("pgd", 8 / 255, 5)]


def test_discriminator_step_reports_the_means_of_d_over_its_layers():
    """The logged D(real) and D(fake) are D's mean outputs on the bank batch and on the fakes,
    averaged over the regularized layers; disc_loss is the sum of the layers' losses."""
    torch.manual_seed(0)
    args = argparse.Namespace(d_batch=8, d_input="standardized", precision="fp32", d_lr=1e-3,
                              d_betas=[0.5, 0.999], d_weight_decay=0.0)
    discs, opts, d_gen = train_advreg.make_discriminators(1.0, 0, ["conv1", "conv2"], args,
                                                          torch.device("cpu"))
    banks = {"conv1": torch.randn(50, 7, 7), "conv2": torch.randn(50, 5, 5)}
    fakes = {"conv1": torch.randn(8, 7, 7), "conv2": torch.randn(8, 5, 5)}
    start = {k: copy.deepcopy(d) for k, d in discs.items()}
    g = torch.Generator().manual_seed(5)
    reals = {k: banks[k][torch.randint(50, (8,), generator=g)] for k in ("conv1", "conv2")}
    d_fakes = train_advreg.judge(discs, fakes, "standardized")
    out = train_advreg.discriminator_step(discs, opts, banks, d_fakes, 1.0, args,
                                          torch.Generator().manual_seed(5))
    with torch.no_grad():
        d_real = [start[k](train_advreg.to_d_input(reals[k], "standardized")) for k in reals]
        d_fake = [d_fakes[k] for k in reals]
    assert out["d_real"].item() == pytest.approx(sum(d.mean().item() for d in d_real) / 2)
    assert out["d_fake"].item() == pytest.approx(sum(d.mean().item() for d in d_fake) / 2)
    losses = [train_advreg.bce(r, 1.0) + train_advreg.bce(f, 0.0) for r, f in zip(d_real, d_fake)]
    assert out["disc_loss"].item() == pytest.approx(sum(x.item() for x in losses))


def test_amp_with_a_vanishing_gradient_steps_by_it_inside_the_ball():
    """A gradient of norm far under 1e-12: delta is still lr * grad, inside the ball (catches a
    projection whose guard against a zero norm turns its sign)."""
    w = torch.nn.Parameter(torch.ones(3))
    delta = train_small.perturb_adversarially([w], lambda: 1e-16 * w.sum(), 0.5, 1.0, 1)[1][0]
    assert torch.allclose(delta, torch.full((3,), 1e-16), rtol=1e-6, atol=0)


def test_pretrained_rows_sort_by_their_label_the_authors_among_ours(authors_models, tmp_path):
    """table_runs puts every pretrained model last, ordered by its label alone: the authors'
    "pretrained (cifar100 ...)" before a pretrain.py model of MNIST, after one of CIFAR-10."""
    paths = []
    for data in ("mnist", "cifar10"):
        paths.append(str(tmp_path / f"{data}.pt"))
        torch.save({"arch": "PaperCNN", "model": pretrain.PaperCNN(10).state_dict(), "format": 2,
                    "label": f"pretrained ({data})", "row_order": [4, 0, 0, 0.0], "epoch": 1,
                    "args": {"epochs": 1}}, paths[-1])
    runs = collect_kernels.table_runs(paths + [str(authors_models / "model1_seed0.pt")], "conv1")
    assert [label for _, _, label, _ in runs] == [
        "pretrained (cifar10)", "pretrained (cifar100 (the authors' models))", "pretrained (mnist)"]


def test_log_clamped_is_minus_100_at_and_below_e_to_the_minus_100():
    """As nn.BCELoss: log p for p > e^-100, exactly -100 at or below it (p = e^-100.5 included),
    with a zero gradient there, p = 0 included (no NaN)."""
    p = torch.tensor([math.exp(-99.5), math.exp(-100.5), 0.0], requires_grad=True)
    out = gan_labs.log_clamped(p)
    assert out[0].item() == pytest.approx(-99.5, abs=0.05) and out[1:].tolist() == [-100, -100]
    out.sum().backward()
    assert p.grad[1:].tolist() == [0, 0]  # the clamped entries, p = 0 among them: no NaN


def test_the_progress_line_reads_the_last_epochs_means():
    """train_advreg.py's progress line after epoch 2 of 3: the means of epoch 2's iterations,
    not of the log's later (empty) rows."""
    log = {c: torch.tensor([1.0, 1.0, 2.0, 4.0, float("nan"), float("nan")])
           for c in train_advreg.LOG_COLUMNS}
    text = train_advreg.recent(log, {"test_acc": [0.25]}, 2, 2, 1.0)
    assert text == "cls 3.000 reg 3.000 disc 3.000 | D(real) 3.00 D(fake) 3.00 | acc test 0.2500"


def test_compare_of_unfinished_runs_only_says_so(tmp_path, capsys):
    """--compare over runs none of which trained all its epochs: one line saying so."""
    path = tmp_path / "run.pt"
    torch.save({"arch": "PaperCNN", "model": pretrain.PaperCNN(10).state_dict(), "format": 2,
                "label": "baseline (λ = 0)", "row_order": [0, 0, 0, 0.0], "epoch": 2,
                "args": {"epochs": 5}}, path)
    bank = tmp_path / "bank.pt"
    torch.save({"kernels": torch.randn(300, 7, 7), "layer": "conv1"}, bank)
    said = user_error(capsys, collect_kernels.main, "--compare", path, "--bank", bank, "--out",
                      tmp_path / "cmp")
    assert "none of the --compare checkpoints is a finished run" in said


def test_train_advreg_prints_a_progress_line_every_log_every_epochs(tiny_data, tmp_path, capsys):
    """--log-every 1 over 2 epochs: a progress line after each epoch, not only the last."""
    train_advreg.main(["--data", str(tiny_data), "--per-class", "2", "--epochs", "2",
                       "--log-every", "1", "--eval-every", "2", "--lam", "0", "--bank",
                       tmp_bank(tmp_path, torch.randn(300, 7, 7)), "--out", str(tmp_path / "r")])
    lines = capsys.readouterr().out.splitlines()
    assert [sum(f"| {e}/2 |" in line for line in lines) for e in (1, 2)] == [1, 1]


def test_gan_wgan_lab_plays_with_its_flags(monkeypatch):
    """play() hands the WGAN critic's step the lab's --constraint, --clip and --gp-lambda."""
    seen = []
    monkeypatch.setattr(gan_labs, "wgan_critic_step", lambda *a: seen.append(a[6:]) or {})
    args = gan_labs.parse_args(["wgan", "--gp-lambda", "3", "--clip", "0.05"])
    gan_labs.play(args, None, None, None, None, torch.zeros(2, 1, 32, 32), None, 0, None, False,
                  torch.device("cpu"))
    assert seen == [("gp", 0.05, 3.0)]
