"""Offline CPU tests: every script (stages 1-4 and gan_labs.py) runs end to end as a user runs it,
on tiny generated data.

    pytest -q

The dataset is a 10-class ImageFolder of generated 32x32 PNGs (each class a different stripe
pattern plus noise), written once per session to a temporary folder. The scripts run as
subprocesses with tiny budgets; the unit tests check the mathematics that can silently go wrong.

The throughput comparison behind the README's ratio is a test too, skipped unless asked for:
    THROUGHPUT_DATA=~/data/cifar10 pytest -q -s -k throughput
"""
import ast
import collections
import csv
import inspect
import json
import math
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
    """Two seeds of pretrain.py (2 epochs each) and the banks collected from them."""
    out = tmp_path_factory.mktemp("pretrain")
    ckpts, banks = out / "checkpoints", out / "kernels"
    run("pretrain.py", "--data", tiny_data, "--seeds", 0, 1, "--epochs", 2, "--batch-size", 32,
        "--out", ckpts)
    run("collect_kernels.py", "--checkpoints", ckpts, "--layers", "conv1", "conv2", "--out", banks)
    return ckpts, banks


@pytest.fixture(scope="session")
def authors_models(tmp_path_factory):
    """Two fake checkpoints in the layout of the authors' published models: a plain state_dict of
    an nn.Sequential (features.0 = conv1, ..., classifier.2 = fc), named model1_seed<N>.pt."""
    folder = tmp_path_factory.mktemp("authors")
    names = {v: k for k, v in pretrain.AUTHORS_LAYERS.items()}
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = pretrain.PaperCNN(10).state_dict()
        authors = collections.OrderedDict(
            (f"{names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}", v) for k, v in state.items())
        torch.save(authors, folder / f"model1_seed{seed}.pt")
    return folder


# ----------------------------------------------------------------------------- stages 1-2
def test_pretrain_writes_checkpoints_summary_and_curves(pretrained):
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
        assert ckpt["args"]["epochs"] == 2
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


def test_authors_models_give_a_bank_and_an_accuracy(authors_models, tiny_data, tmp_path):
    run("collect_kernels.py", "--checkpoints", authors_models, "--layers", "conv1",
        "--out", tmp_path / "bank")
    bank = load(tmp_path / "bank" / "conv1_7x7.pt")
    seed1 = load(authors_models / "model1_seed1.pt")["features.0.weight"]
    assert torch.equal(bank["kernels"][192:], seed1.reshape(-1, 7, 7))
    assert bank["format"] == "authors" and bank["seeds"] == [0, 1]
    # --evaluate reads the same files; its accuracy is the model's, computed here independently
    proc = run("pretrain.py", "--evaluate", *sorted(authors_models.glob("*.pt")), "--data",
               tiny_data, "--out", tmp_path / "eval")
    assert "mean ± std over 2 checkpoints" in proc.stdout
    accs = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["test_acc"]
    test_x, test_y, _ = pretrain.load_split(str(tiny_data), "data", train=False)
    model = pretrain.PaperCNN(10)
    state = pretrain.read_checkpoint(str(authors_models / "model1_seed0.pt"))["model"]
    model.load_state_dict(state)
    expected = pretrain.evaluate(model, test_x, test_y)
    assert accs[str(authors_models / "model1_seed0.pt")] == pytest.approx(expected)


def test_paper_cnn_has_the_papers_parameter_count():
    assert sum(p.numel() for p in pretrain.PaperCNN(100).parameters()) == 945_572


def shared_names():
    """Every top-level function, class or constant defined in more than one stage script."""
    defined = collections.defaultdict(list)
    for module in STAGES:
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined[node.name].append(module)
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                defined[node.targets[0].id].append(module)
    return {name: modules for name, modules in defined.items() if len(modules) > 1}


def test_copies_across_scripts_agree():
    """The scripts share no module: every helper written in more than one script is the same
    copy, except the few that are each script's own by design."""
    own = {"parse_args", "main", "setup_run", "train_one_seed", "write_run_outputs"}
    shared = shared_names()
    for expected in ("PaperCNN", "load_split", "augment", "evaluate", "write_atomic", "pick_device",
                     "save_checkpoint", "resume_checkpoint", "stop_if_diverged", "save_figure",
                     "kernel_grid", "save_kernel_grid", "load_bank", "read_checkpoint",
                     "AUTHORS_LAYERS", "LOG_COLUMNS", "frechet_distance", "kernels_of"):
        assert expected in shared, expected
    for name, modules in shared.items():
        if name in own:
            continue
        objects = [getattr(m, name) for m in modules]
        if callable(objects[0]):
            sources = {inspect.getsource(obj) for obj in objects}
            assert len(sources) == 1, f"the copies of {name} differ in {modules}"
        else:
            assert all(obj == objects[0] for obj in objects), f"the copies of {name} differ"
    for name in ("pick_device", "write_atomic"):  # gan_labs.py shares these two
        assert inspect.getsource(getattr(gan_labs, name)) == \
            inspect.getsource(getattr(train_small, name)), name
    # the same CNN computes the same function in every copy
    models = [m.PaperCNN(10) for m in (pretrain, train_small, train_advreg)]
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    for m in models:
        m.load_state_dict(models[0].state_dict())
        outputs.append(m.eval()(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


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
    common = ["--data", tiny_data, "--seeds", 0, "--batch-size", 32]
    run("pretrain.py", *common, "--epochs", 2, "--out", tmp_path / "straight")
    run("pretrain.py", *common, "--epochs", 1, "--out", tmp_path / "resumed")
    proc = run("pretrain.py", *common, "--epochs", 2, "--out", tmp_path / "resumed")
    assert "resuming" in proc.stdout and "after epoch 1" in proc.stdout
    straight = load(tmp_path / "straight" / "seed0.pt")
    resumed = load(tmp_path / "resumed" / "seed0.pt")
    assert resumed["epoch"] == 2 and len(resumed["history"]["train_loss"]) == 2
    # optimizer and random state travel with the checkpoint: the interrupted run ends where the
    # straight one does
    for key, value in straight["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float(), atol=1e-5), key


def test_bad_input_gives_one_clear_error(tiny_data, pretrained, tmp_path):
    ckpts, banks = pretrained
    assert_user_error(run("pretrain.py", "--data", "imagenet", ok=False), "neither a known dataset")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_user_error(run("pretrain.py", "--data", tmp_path / "empty", "--out", tmp_path / "o",
                          ok=False), "no images")
    assert not (tmp_path / "o").exists()
    assert_user_error(run("pretrain.py", "--device", "tpu", ok=False), "invalid choice")
    assert_user_error(run("collect_kernels.py", "--checkpoints", tmp_path / "none*.pt", ok=False),
                      "no checkpoints match", "pretrain.py")
    assert_user_error(run("collect_kernels.py", "--checkpoints", ckpts, "--layers", "conv9",
                          ok=False), "unknown layer")
    # a checkpoint of another architecture is refused, and the existing bank is not overwritten
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"arch": "PaperCNN", "model": {"conv1.weight": torch.zeros(32, 3, 5, 5)}},
               other / "seed0.pt")
    before = (banks / "conv1_7x7.pt").read_bytes()
    assert_user_error(run("collect_kernels.py", "--checkpoints", other, "--out", banks, ok=False),
                      "another architecture")
    assert (banks / "conv1_7x7.pt").read_bytes() == before
    # files that are not torch files at all, or torch files of another kind: one line each
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "seed0.pt").write_bytes(os.urandom(2000))
    assert_user_error(run("collect_kernels.py", "--checkpoints", junk, ok=False),
                      "not a checkpoint", "pretrain.py")
    assert_user_error(run("pretrain.py", "--evaluate", junk / "seed0.pt", "--data", tiny_data,
                          ok=False), "not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, other / "foreign.pt")
    assert_user_error(run("collect_kernels.py", "--checkpoints", other / "foreign.pt", ok=False),
                      "not a checkpoint")
    assert_user_error(run("train_small.py", "--data", tiny_data, "--init-bank", junk / "seed0.pt",
                          "--out", tmp_path / "s", ok=False), "not a kernel bank",
                      "collect_kernels.py")
    (tmp_path / "s" / "seed0").mkdir(parents=True)  # a run folder whose checkpoint is corrupt
    (tmp_path / "s" / "seed0" / "model.pt").write_bytes(os.urandom(2000))
    assert_user_error(run("train_small.py", "--data", tiny_data, "--per-class", 2, "--epochs", 1,
                          "--out", tmp_path / "s", ok=False), "not a checkpoint of this run")


# ----------------------------------------------------------------------------- stage 3 and AMP
def test_train_small_end_to_end_and_bank_init(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    out = tmp_path / "small"
    run("train_small.py", "--data", tiny_data, "--per-class", 4, "--seeds", 0, 1, "--epochs", 3,
        "--eval-every", 2, "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test_acc"]) == {"0", "1"}
    for seed in (0, 1):
        rows = (out / f"seed{seed}" / "metrics.csv").read_text().strip().splitlines()
        assert rows[0] == "epoch,train_loss,test_acc" and len(rows) == 1 + 3
        assert rows[2].split(",")[2] != "" and rows[1].split(",")[2] == ""  # evaluated at 2 and 3
        for fig in ("test_acc.png", "kernels.png"):
            assert (out / f"seed{seed}" / fig).stat().st_size > 1000
        ckpt = load(out / f"seed{seed}" / "model.pt")
        assert ckpt["arch"] == "PaperCNN" and ckpt["epoch"] == 3
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


def test_amp_perturbation_stays_in_the_ball_and_ascends():
    model, loss_fn, _, _ = amp_setup()
    params = list(model.parameters())
    loss_at_theta = loss_fn().item()
    for epsilon, inner_steps in ((0.05, 1), (0.05, 3), (1e-4, 2)):
        theta, delta = train_small.perturb_adversarially(params, loss_fn, epsilon, 1.0, inner_steps)
        norm = torch.sqrt(sum((d ** 2).sum() for d in delta)).item()
        assert norm <= epsilon * (1 + 1e-5)
        moved = torch.sqrt(sum(((p - t) ** 2).sum() for p, t in zip(params, theta))).item()
        assert moved == pytest.approx(norm, rel=1e-3)  # the parameters sit at theta + delta
        if inner_steps == 1:  # on a fixed batch, one ascent step does not lower the loss
            assert loss_fn().item() >= loss_at_theta
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)


def test_amp_with_epsilon_zero_is_the_plain_update():
    args = train_small.parse_args(["--amp-epsilon", "0"])
    plain_args = train_small.parse_args([])
    updated = []
    for a in (args, plain_args):
        model, _, images, labels = amp_setup()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_small.train_step(model, optimizer, images, labels, a)
        updated.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*updated):
        assert torch.equal(p, q)


def test_amp_run_with_bank_init_and_the_compare_table(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    common = ["--data", tiny_data, "--per-class", 2, "--epochs", 2, "--eval-every", 1]
    run("train_small.py", *common, "--out", tmp_path / "plain")
    run("train_small.py", *common, "--amp-epsilon", 0.1, "--amp-inner-steps", 2, "--init-bank",
        banks / "conv1_7x7.pt", "--seeds", 0, 1, "--out", tmp_path / "amp")
    ckpt = load(tmp_path / "amp" / "seed0" / "model.pt")
    assert ckpt["args"]["amp_epsilon"] == 0.1 and ckpt["args"]["init_bank"]
    run("collect_kernels.py", "--compare", tmp_path / "plain" / "seed0" / "model.pt",
        *sorted((tmp_path / "amp").glob("seed*/model.pt")), "--bank", banks / "conv1_7x7.pt",
        "--out", tmp_path / "cmp")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| baseline (λ = 0) | 1 |" in table
    assert "| AMP ε = 0.1, conv1 from bank | 2 |" in table
    assert len((tmp_path / "cmp" / "compare.csv").read_text().strip().splitlines()) == 1 + 3
    for fig in ("compare.png", "compare_pca.png"):
        assert (tmp_path / "cmp" / fig).stat().st_size > 1000
    assert_user_error(run("train_small.py", *common, "--amp-epsilon", -1, ok=False),
                      "--amp-epsilon must be >= 0")


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tiny_data, tmp_path):
    common = ["--data", tiny_data, "--per-class", 2, "--eval-every", 1, "--log-every", 1]
    proc = run("train_small.py", *common, "--epochs", 2, "--lr", 1e38, "--out", tmp_path / "a",
               ok=False)
    assert_user_error(proc, "diverged", "epoch 1", "--lr")
    assert not (tmp_path / "a" / "seed0" / "model.pt").exists()
    # one good epoch, then a learning rate that blows up (a resumed run takes the checkpoint's)
    run("train_small.py", *common, "--epochs", 1, "--out", tmp_path / "b")
    ckpt_path = tmp_path / "b" / "seed0" / "model.pt"
    ckpt = load(ckpt_path)
    ckpt["optimizer"]["param_groups"][0]["lr"] = 1e38
    torch.save(ckpt, ckpt_path)
    before = ckpt_path.read_bytes()
    proc = run("train_small.py", *common, "--epochs", 2, "--amp-epsilon", 0.1,
               "--out", tmp_path / "b", ok=False)
    assert_user_error(proc, "diverged", "epoch 2", "--lr or --amp-epsilon")
    assert ckpt_path.read_bytes() == before


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
    rows = (out / "lam0.5_seed0" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[2:7] == list(train_advreg.LOG_COLUMNS) and len(rows) == 1 + iters
    d_real, d_fake = float(rows[-1].split(",")[5]), float(rows[-1].split(",")[6])
    assert 0 < d_real < 1 and 0 < d_fake < 1
    assert rows[-1].split(",")[-1] != ""  # test accuracy at the last evaluation
    for fig in ("losses.png", "d_outputs.png", "test_acc.png", "kernels_conv1.png"):
        assert (out / "lam0.5_seed0" / fig).stat().st_size > 1000
    summary = json.loads((out / "lam0.5_seed0" / "summary.json").read_text())
    assert summary["conv1_frechet"] >= 0 and 0 < summary["conv1_low_freq"] < 1
    # lam = 0 has no discriminator: its D columns are empty (NaN in the CSV, null in the JSON)
    assert "nan" in (out / "lam0_seed0" / "metrics.csv").read_text().splitlines()[1]
    assert json.loads((out / "lam0_seed0" / "summary.json").read_text())["d_real_last10pct"] is None
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
    common = ["--data", tiny_data, "--bank", banks / "conv1_7x7.pt", "--per-class", 3,
              "--d-batch", 32, "--eval-every", 1, "--lam", 0.5]
    run("train_advreg.py", *common, "--epochs", 2, "--out", tmp_path / "straight")
    run("train_advreg.py", *common, "--epochs", 1, "--out", tmp_path / "resumed")
    run("train_advreg.py", *common, "--epochs", 2, "--out", tmp_path / "resumed")
    straight = load(tmp_path / "straight" / "lam0.5_seed0" / "model.pt")
    resumed = load(tmp_path / "resumed" / "lam0.5_seed0" / "model.pt")
    for a, b in ((straight["model"], resumed["model"]),
                 (straight["discs"]["conv1"], resumed["discs"]["conv1"])):
        for key, value in a.items():
            assert torch.equal(value, b[key]), key
    assert torch.equal(straight["log"].nan_to_num(), resumed["log"].nan_to_num())
    assert straight["history"]["test_acc"] == resumed["history"]["test_acc"]
    metrics = [(tmp_path / d / "lam0.5_seed0" / "metrics.csv").read_text()
               for d in ("straight", "resumed")]
    assert metrics[0] == metrics[1]


def test_train_advreg_two_layers_and_compare(tiny_data, pretrained, tmp_path):
    _, banks = pretrained
    out = tmp_path / "two"
    run("train_advreg.py", "--data", tiny_data, "--bank", banks / "conv1_7x7.pt",
        banks / "conv2_5x5.pt", "--layers", "conv1", "conv2", "--per-class", 2, "--epochs", 1,
        "--d-batch", 16, "--out", out)
    ckpt = load(out / "lam1_seed0" / "model.pt")
    assert sorted(ckpt["discs"]) == ["conv1", "conv2"]
    assert (out / "lam1_seed0" / "kernels_conv2.png").exists()
    assert json.loads((out / "lam1_seed0" / "summary.json").read_text())["conv2_frechet"] >= 0
    run("collect_kernels.py", "--compare", out / "lam1_seed0" / "model.pt", "--bank",
        banks / "conv1_7x7.pt", "--out", tmp_path / "cmp")
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| λ = 1 | 1 |" in table and "| bank (2 sources) |" in table


def test_advreg_bad_input(pretrained, tiny_data, tmp_path):
    _, banks = pretrained
    out = tmp_path / "bad"
    base = ["--data", tiny_data, "--out", out]
    assert_user_error(run("train_advreg.py", *base, "--bank", tmp_path / "missing.pt", ok=False),
                      "collect_kernels.py", "missing.pt")
    assert_user_error(run("train_advreg.py", *base, "--bank", banks / "conv2_5x5.pt", ok=False),
                      "5x5")
    assert_user_error(run("train_advreg.py", *base, "--bank", banks / "conv1_7x7.pt", "--lam", -1,
                          ok=False), "--lam must be >= 0")
    assert_user_error(run("train_advreg.py", *base, "--layers", "fc", ok=False), "unknown layer")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_user_error(run("train_advreg.py", "--data", tmp_path / "empty", "--bank",
                          banks / "conv1_7x7.pt", "--out", out, ok=False), "no images")
    assert not out.exists()


def algorithm1_batch():
    torch.manual_seed(0)
    model, disc = train_advreg.PaperCNN(10), train_advreg.KernelDiscriminator()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    return model, disc, images, torch.randint(0, 10, (8,)), torch.Generator().manual_seed(0)


def test_generator_loss_reaches_conv1_and_d_outputs_are_probabilities():
    model, disc, _, _, g = algorithm1_batch()
    fakes = train_advreg.sample_fakes(model, {"conv1": disc}, 64, g)
    reg_loss = train_advreg.generator_loss({"conv1": disc}, fakes, "standardized")
    reg_loss.backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.conv2.weight.grad is None  # only the regularized layer is touched
    assert all(p.grad is None for p in disc.parameters())  # the generator step does not train D
    d_out = disc(train_advreg.to_d_input(torch.randn(64, 7, 7) * 10, "raw"))
    assert d_out.shape == (64,) and ((d_out > 0) & (d_out < 1)).all()
    args = train_advreg.parse_args(["--d-batch", "64"])
    d_optimizers = {"conv1": torch.optim.Adam(disc.parameters())}
    d = train_advreg.discriminator_step({"conv1": disc}, d_optimizers,
                                        {"conv1": torch.randn(100, 7, 7)}, fakes, 1.0, args, g)
    assert 0 < d["d_real"] < 1 and 0 < d["d_fake"] < 1 and d["disc_loss"] > 0


def test_lambda_zero_gradients_equal_the_baselines():
    model, disc, images, labels, g = algorithm1_batch()
    baseline = train_small.PaperCNN(10)
    baseline.load_state_dict(model.state_dict())
    F.cross_entropy(baseline(train_small.normalize(images)), labels).backward()  # train_small.py
    cls_loss = F.cross_entropy(model(train_advreg.normalize(images)), labels)  # Algorithm 1
    reg_loss = train_advreg.generator_loss(
        {"conv1": disc}, train_advreg.sample_fakes(model, {"conv1": disc}, 64, g), "standardized")
    (cls_loss + 0.0 * reg_loss).backward()
    assert reg_loss.item() > 0  # the discriminator term was computed, and lam = 0 switched it off
    for (name, p), q in zip(baseline.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7), name


def test_standardized_d_input_ignores_scale():
    kernels = torch.randn(10, 7, 7)
    a = train_advreg.to_d_input(kernels, "standardized")
    b = train_advreg.to_d_input(kernels * 5 + 2, "standardized")
    assert torch.allclose(a, b, atol=1e-5) and a.shape == (10, 1, 7, 7)


def test_frechet_distance_and_low_frequency_share():
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


# ----------------------------------------------------------------------------- throughput
@pytest.mark.skipif(not os.environ.get("THROUGHPUT_DATA"),
                    reason="a measurement: THROUGHPUT_DATA=PATH pytest -s -k throughput")
def test_throughput_tensor_pipeline_vs_dataloader():
    """Images/s of pretrain.py's loop (uint8 data on the device, batched crop + flip) against a
    plain ImageFolder + transforms + DataLoader loop, same model and batch, in one run."""
    data, steps, batch = os.environ["THROUGHPUT_DATA"], 60, 128
    train_x, train_y, _ = pretrain.load_split(data, "data", train=True)

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


# ============================================================================= gan_labs.py
# Runs every gan_labs.py subcommand as the README tells a user to, on a tiny generated ImageFolder
# (3 classes of 28x28 grayscale PNGs) and on the CIFAR-shaped RGB one above, and checks the
# mathematics that can silently go wrong.
GAN_CLASSES = 3
GAN_TINY = ["--batch-size", "16", "--ngf", "8", "--ndf", "8", "--epochs", "1",
            "--eval-samples", "24", "--log-every", "1", "--threads", "1", "--device", "cpu"]


def gan_run(*args, ok=True):
    return run("gan_labs.py", *args, ok=ok, timeout=120)


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
    """Flags every run shares; the metric classifier is trained once here, by its subcommand."""
    cache = tmp_path_factory.mktemp("gan_cache")
    flags = ["--data", gan_data, "--cache-dir", cache]
    proc = gan_run("classifier", *flags, "--epochs", "3", "--threads", "1", "--device", "cpu")
    assert "test accuracy" in proc.stdout
    assert [p for p in cache.iterdir() if p.name.startswith("classifier_")]
    return flags


def gan_check_run(out, bce=True, size=32, channels=1, n_classes=GAN_CLASSES):
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
        if bce:
            assert 0 < float(r["d_real"]) < 1 and 0 < float(r["d_fake"]) < 1
    assert any(math.isfinite(float(r["loss_g"])) for r in rows), "G never trained"
    gen, floor = gan_read_csv(out / "eval.csv")
    assert gen["comparison"].startswith("generated") and floor["comparison"].startswith("train")
    for r in (gen, floor):
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) >= -1e-6
        assert 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1
        assert 0 <= float(r["class_share_min"]) <= 1 / n_classes <= float(r["class_share_max"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == int(rows[-1]["iter"]) > 0
    assert summary["args"]["channels"] == channels and summary["args"]["image_size"] == size
    return rows, gen, floor


@pytest.fixture(scope="session")
def gan_dcgan_run(gan_common, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan_runs") / "dcgan"
    gan_run("dcgan", *gan_common, *GAN_TINY, "--out", out)
    return out


def test_gan_dcgan_trains_resumes_and_has_bn_after_the_first_conv(gan_dcgan_run, gan_common):
    rows, gen, floor = gan_check_run(gan_dcgan_run)
    assert int(rows[-1]["iter"]) == 48 // 16
    # the real-vs-real floor in a feature space that separates the classes beats one epoch of a GAN
    assert float(floor["fid"]) < float(gen["fid"])
    d = gan_ckpt(gan_dcgan_run)["d"]
    assert "1.running_mean" in d and d["1.weight"].shape == (8,)  # seed 003: BN after D's conv1
    proc = gan_run("dcgan", *gan_common, *GAN_TINY, "--epochs", "2", "--out", gan_dcgan_run)
    assert "resuming dcgan" in proc.stdout and "[evaluate]" in proc.stdout
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


def test_gan_folder_names_and_help(capsys):
    def out(*flags):
        return gan_labs.parse_args(list(flags)).out
    assert out("dcgan") == os.path.join("runs", "gan", "mnist", "dcgan")
    wgan_mlp = out("wgan", "--critic", "mlp", "--generator", "mlp")
    assert wgan_mlp.endswith("wgan_discriminator-mlp_generator-mlp")
    dcgan_64 = out("dcgan", "--no-first-bn", "--image-size", "64")
    assert dcgan_64.endswith("dcgan_image-size-64_first-bn-False")
    # seed 004's 784 inputs
    assert gan_labs.parse_args(["wgan", "--generator", "mlp"]).image_size == 28
    with pytest.raises(SystemExit):
        gan_labs.parse_args(["vanilla", "--help"])
    assert "counts D steps" in " ".join(capsys.readouterr().out.split())


def test_gan_source_conventions():
    """Every file goes through write_atomic, every torch.load is weights_only, lines fit in 100."""
    source = inspect.getsource(gan_labs)
    assert source.count("os.replace(") == 1 and "open(" not in source.replace("Image.open(", "")
    assert source.count("torch.load(") == source.count("weights_only=True") > 0
    assert max(map(len, source.splitlines())) <= 100


@pytest.mark.parametrize("lab", ["dcgan", "cdcgan", "vanilla", "wgan"])
def test_gan_resume_gives_the_same_weights_as_an_uninterrupted_run(lab, gan_data, tmp_path):
    """Stopped after epoch 1 and resumed to 2 = a straight 2-epoch run, bit for bit (in-process)."""
    flags = {"dcgan": ["--no-first-bn"], "cdcgan": [],
             "vanilla": ["--g-every", "2", "--diffaug", "translation,cutout"],
             "wgan": ["--critic", "conv", "--generator", "mlp", "--n-critic", "2"]}[lab]
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


def test_gan_cdcgan_class_grid_and_conditional_accuracy(gan_common, tmp_path):
    out = tmp_path / "cdcgan"
    gan_run("cdcgan", *gan_common, *GAN_TINY, "--out", out)
    _, gen, _ = gan_check_run(out)
    assert 0 <= float(gen["cond_acc"]) <= 1
    # classes x z
    assert gan_png_shape(out / "class_grid.png") == (3, GAN_CLASSES * 34 + 2, 8 * 34 + 2)
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
    d = gan_ckpt(out)["d"]
    assert max(v.abs().max().item() for v in d.values()) <= 0.01 + 1e-9
    assert all(0 < float(r["lip_product"]) <= float(r["lip_bound"]) for r in rows)


def test_gan_wgan_gp_conv_critic_with_the_mlp_generator(gan_common, tmp_path):
    """Seed 004: its MLP generator fixed, the critic convolutional, at 28 x 28."""
    out = tmp_path / "wgan_gp"
    gan_run("wgan", *gan_common, *GAN_TINY, "--critic", "conv", "--generator", "mlp",
            "--n-critic", "2", "--out", out)
    rows, _, _ = gan_check_run(out, bce=False, size=28)
    assert all(float(r["gp"]) >= 0 for r in rows)
    assert all(float(r["lip_product"]) < float(r["lip_bound"]) for r in rows)
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
    gan_check_run(out, size=size, channels=3, n_classes=10)
    # G's first block: ngf*8 at 64
    assert gan_ckpt(out)["g"]["1.weight"].shape[1] == 8 * (8 if size == 64 else 4)


def test_gan_non_finite_loss_stops_with_one_line(gan_common, tmp_path):
    proc = gan_run("vanilla", *gan_common, *GAN_TINY, "--lr-d", "1e30", "--lr-g", "1e30",
                   "--epochs", "2", "--eval-samples", "0", "--out", tmp_path / "nan", ok=False)
    assert_user_error(proc, "became nan in epoch 1", "--lr-d", "no checkpoint was written")
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.parametrize("case", ["unknown_lab", "other_run", "corrupt_classifier"])
def test_gan_bad_input_is_one_clear_line(case, gan_dcgan_run, gan_common, tmp_path):
    if case == "unknown_lab":
        proc, want = gan_run("stylegan", ok=False), "invalid choice"
    elif case == "other_run":  # another lab's (or another setting's) folder is not resumed
        proc = gan_run("wgan", *gan_common, *GAN_TINY, "--out", gan_dcgan_run, ok=False)
        want = "is a run with lab = 'dcgan'"
    else:
        cache = tmp_path / "cache"
        cache.mkdir()
        classifier = next(p for p in gan_common[3].iterdir() if p.name.startswith("classifier_"))
        (cache / classifier.name).write_bytes(b"truncated")
        proc = gan_run("dcgan", "--data", gan_common[1], "--cache-dir", cache, *GAN_TINY,
                       "--out", tmp_path / "run", ok=False)
        want = "is not a metric classifier"
    assert_user_error(proc, want)
    assert want in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "case", ["image_size", "empty_folder", "corrupt_checkpoint", "foreign_checkpoint"])
def test_gan_bad_files_end_in_one_line_in_process(case, gan_common, tmp_path, capsys):
    """The same SystemExit as above, called in-process (a subprocess costs 5 s of imports here)."""
    flags = [*map(str, gan_common), *GAN_TINY, "--out", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    if case == "image_size":
        flags, want = flags + ["--image-size", "48"], "--image-size must be 32 or 64"
    elif case == "empty_folder":
        (tmp_path / "empty" / "train" / "0").mkdir(parents=True)
        (tmp_path / "empty" / "test").mkdir()
        flags, want = flags + ["--data", str(tmp_path / "empty")], "no images in"
    elif case == "corrupt_checkpoint":
        (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
        want = "cannot read"
    else:
        torch.save({"state_dict": {}}, tmp_path / "run" / "checkpoint.pt")
        want = "not a checkpoint of this version"
    with pytest.raises(SystemExit) as exc:
        gan_labs.main(["dcgan", *flags])
    message = (str(exc.value) if exc.value.code != 2
               else capsys.readouterr().err.strip().splitlines()[-1])
    assert exc.value.code != 0 and want in message and "\n" not in message.strip()


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


def test_gan_gradient_penalty_zero_for_unit_norm_linear_critic():
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


def test_gan_gradient_penalty_reaches_the_critic():
    critic = gan_labs.conv_critic(1, 32)
    real, fake = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    gp = gan_labs.gradient_penalty(critic, real, fake, 10.0)
    gp.backward()
    assert gp.item() > 0 and critic[0].weight.grad.abs().sum() > 0


def test_gan_clip_weights():
    critic = gan_labs.conv_critic(1, 32)
    gan_labs.clip_weights(critic, 0.01)
    assert all(p.abs().max() <= 0.01 for p in critic.parameters())
    # default init exceeds c: clipping acted
    assert any((p.abs() == 0.01).any() for p in critic.parameters())


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_gan_lipschitz_bound_dominates_measured_ratios(kind):
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
    assert product.item() <= bound.item() and (kind == "conv") == (bound.item() > product.item())


def test_gan_frechet_distance():
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
    g = gan_labs.dcgan_generator(100 + 10, 8, 3, size)  # the cDCGAN's: z and a one-hot label
    d = gan_labs.dcgan_discriminator(8, 3 + 10, size)
    y = torch.arange(4) % 10
    x = g(gan_labs.with_label(torch.randn(4, 100), y, 10))
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    out = d(gan_labs.with_label(x, y, 10))
    assert out.shape == (4,) and ((out > 0) & (out < 1)).all()
    critics = (gan_labs.conv_critic(3, size), gan_labs.mlp_discriminator(3, size, sigmoid=False))
    for critic in critics:
        assert critic(x).shape == (4,)
    x = gan_labs.mlp_generator(100, 1, 28)(torch.randn(4, 100))
    assert x.shape == (4, 1, 28, 28) and gan_labs.conv_critic(1, 28)(x).shape == (4,)
    out = gan_labs.mlp_discriminator(1, 28, dropout=0.3)(x)
    assert out.shape == (4,) and ((out > 0) & (out < 1)).all()


def test_gan_diffaug_keeps_shape_and_gradient():
    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    out = gan_labs.diff_augment(x, ["translation", "cutout", "color"])
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    cut = gan_labs.diff_augment(torch.ones(8, 1, 32, 32), ["cutout"])
    assert (cut == 0).flatten(1).any(1).all()


def test_gan_reshaped_norm_is_not_a_conv_bound_but_the_overlap_factor_is():
    """A 4x4 stride-2 convolution reuses each input pixel in up to 4 patches: its operator norm
    (power iteration) can exceed the reshaped matrix's norm, never twice that norm."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 16, 4, 2, 1, bias=False)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        for _ in range(100):
            x = torch.nn.functional.conv_transpose2d(conv(x), conv.weight, stride=2, padding=1)
            x = x / x.norm()
        op_norm = conv(x).norm().item()
    reshaped = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item()
    assert reshaped < op_norm <= 2 * reshaped
