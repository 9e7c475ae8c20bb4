"""The original Betty's programs, unchanged in their betty calls, run against betty.

Each file under tests/original_programs/ is one of the original's tutorials or examples
written again with exactly its imports, classes, hooks, config fields and Engine use (see
that folder's README.md for what each stands for and what cannot run). The harness here does
not edit them: it runs each as ``__main__`` (``runpy``) in a temporary folder with its own
command line, puts the stand-ins of what the original downloads in ``sys.modules``
(``torchvision``; the programs' own ``data``/``model`` modules sit next to them), shortens
training by capping ``EngineConfig.train_iters`` (and ``valid_step``) at construction, and
reads the program's globals afterwards to check numbers.
"""

from __future__ import annotations

import logging
import os
import re
import runpy
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import betty.configs
from betty.problems import IterativeProblem

HERE = Path(__file__).parent / "original_programs"
sys.path.insert(0, str(HERE))
import standins  # noqa: E402  (tests/original_programs/standins.py)

sys.path.remove(str(HERE))
REAL_POST_INIT = betty.configs.EngineConfig.__post_init__



@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run(monkeypatch, tmp_path):
    """``run(program, *argv, iters=N, valid=M)``: the program's globals after it ran.
    ``fresh_logging=True``: the ``betty`` logger as in a fresh interpreter (no handler, no
    level, pytest's capture cut off), to see what an unchanged program prints. Engines the
    program left in its globals are closed afterwards (their loaders' worker processes)."""
    ran: list[dict[str, Any]] = []

    def go(program: str, *argv: str, iters: int, valid: int | None = None,
           seed: int = 0, fresh_logging: bool = False) -> dict[str, Any]:
        path = HERE / program
        if fresh_logging:
            logger = logging.getLogger("betty")
            monkeypatch.setattr(logger, "propagate", False)
            monkeypatch.setattr(logger, "handlers", [])
            monkeypatch.setattr(logger, "level", logging.NOTSET)
            logger.manager._clear_cache()

        def capped(config: Any) -> None:  # the harness's only hold on the program
            config.train_iters = min(config.train_iters, iters)
            if valid is not None:
                config.valid_step = min(config.valid_step, valid)
            config.progress_bar = False
            REAL_POST_INIT(config)

        monkeypatch.setattr(betty.configs.EngineConfig, "__post_init__", capped)
        for name, module in standins.torchvision_modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        if not torch.cuda.is_available():  # the iMAML program calls .cuda() on its batches
            monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # DARTS sets it: restore it after
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible or "")  # recorded: undone after
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
        monkeypatch.syspath_prepend(str(path.parent))
        monkeypatch.chdir(tmp_path)
        before = set(sys.modules)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            ran.append(runpy.run_path(str(path), run_name="__main__"))
            return ran[-1]
        finally:  # the programs' own modules (model, data, utils) differ per program
            for name in set(sys.modules) - before:
                if str(HERE) in str(getattr(sys.modules[name], "__file__", "") or ""):
                    del sys.modules[name]

    yield go
    for program_globals in ran:
        for value in program_globals.values():
            if isinstance(value, betty.Engine):
                value.close()


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# -- logistic-regression HPO --------------------------------------------------------------
def hpo_reference(g: dict[str, Any], reverse: bool) -> torch.Tensor:
    """d L_val / d lambda at lambda = 1 after 100 SGD steps (lr 0.1) from w = 0, by plain
    autograd through the steps (reverse) or by the implicit function theorem at w_100."""
    lam = torch.ones(g["DATA_DIM"], dtype=torch.float64, requires_grad=True)
    xt, yt = g["x_train"].double(), g["y_train"].double()
    xv, yv = g["x_val"].double(), g["y_val"].double()

    def train_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(xt @ w, yt) + 0.5 * (lam * w * w).sum()

    w = torch.zeros(g["DATA_DIM"], dtype=torch.float64, requires_grad=True)
    for _ in range(100):
        (grad,) = torch.autograd.grad(train_loss(w, lam), w, create_graph=reverse)
        w = w - 0.1 * grad
    val = F.binary_cross_entropy_with_logits(xv @ w, yv)
    if reverse:
        return torch.autograd.grad(val, lam)[0]
    w = w.detach().requires_grad_()
    (v,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(xv @ w, yv), w)
    hessian = torch.autograd.functional.hessian(lambda w: train_loss(w, lam.detach()), w)
    (dw,) = torch.autograd.grad(train_loss(w, lam), w, create_graph=True)
    mixed = torch.stack([torch.autograd.grad(dw[i], lam, retain_graph=True)[0]
                         for i in range(len(dw))])  # d^2 L / dw_i dlam_j
    return -mixed.T @ torch.linalg.solve(hessian, v)


@pytest.mark.slow
def test_logistic_regression_higher_iterative_problem_is_reverse_mode(run, capsys):
    with pytest.warns(DeprecationWarning, match="HigherIterativeProblem .* IterativeProblem"):
        g = run("logistic_regression_hpo/logistic_regression.py", iters=100,
                fresh_logging=True)
    engine = g["engine"]
    assert isinstance(engine.inner, IterativeProblem)
    assert (engine.inner.count, engine.outer.count) == (100, 1)
    assert Path("data.t7").exists()  # the program's own side effect, in the run's folder
    # after one outer step SGD's momentum buffer holds exactly that step's gradient
    hypergradient = engine.outer.optimizer.state[engine.outer.module.w]["momentum_buffer"].cpu()
    want = hpo_reference(g, reverse=True)
    assert torch.allclose(hypergradient.double(), want, rtol=1e-3, atol=1e-6)
    assert torch.equal(engine.outer.module.w.detach().cpu(),
                       (1 - hypergradient).clamp(min=1e-8))  # lr 1, then param_callback
    # Config(log_step=1) on the outer: one console line by default, the original's format
    lines = [line for line in capsys.readouterr().out.splitlines() if "| outer" in line]
    assert len(lines) == 1, lines
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[INFO\] "
    loss = float(re.match(stamp + r"step +100 \| outer +\| loss=(\S+)", lines[0]).group(1))
    want = F.binary_cross_entropy_with_logits(g["x_val"] @ engine.inner.module.w.detach().cpu(),
                                              g["y_val"])  # at the w it differentiated
    assert loss == pytest.approx(want.item(), rel=1e-5)


def test_logistic_regression_implicit_cg(run):
    g = run("logistic_regression_hpo/logistic_regression_implicit.py", iters=100)
    engine = g["engine"]
    assert (engine.inner.count, engine.outer.count) == (100, 1)
    hypergradient = engine.outer.optimizer.state[engine.outer.module.w]["momentum_buffer"].cpu()
    want = hpo_reference(g, reverse=False)
    cosine = F.cosine_similarity(hypergradient.double(), want, dim=0).item()
    assert cosine > 0.99, cosine  # 3 CG iterations on a well-conditioned 20x20 system
    assert engine.outer.module.w.min().item() >= 1e-8


# -- learning to reweight (Meta-Weight-Net) ------------------------------------------------
LTR_ARGS = ("--device", "cuda" if torch.cuda.is_available() else "cpu", "--batch_size", "8",
            "--imbalanced_factor", "10", "--meta_net_hidden_size", "8")


def test_learning_to_reweight(run):
    start = run("learning_to_reweight/main.py", *LTR_ARGS, iters=0)["engine"]
    shutil.rmtree("betty_tensorboard")  # the initial-state run's (empty) event file
    g = run("learning_to_reweight/main.py", *LTR_ARGS, iters=4, valid=4)
    engine = g["engine"]
    assert (engine.inner.count, engine.outer.count) == (4, 4)
    assert 0 <= g["best_acc"] <= 100  # validation ran (it starts at -1)
    # Adam's steps move each weight by at most its learning rate (1e-5) per step
    moved = (flat(engine.outer.module) - flat(start.outer.module)).abs()
    assert 0.99e-5 <= moved.max().item() <= 4 * 1e-5 * 1.01
    # logger_type="tensorboard" without a folder: the original's betty_tensorboard/
    (folder,) = Path("betty_tensorboard").iterdir()
    assert re.fullmatch(r"[A-Z][a-z]{2}\d\d_\d\d-\d\d-\d\d_" + re.escape(socket.gethostname()),
                        folder.name), folder.name
    assert any(f.name.startswith("events.out.tfevents") for f in folder.iterdir())


def test_learning_to_reweight_meta_iterative_problem(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = run("learning_to_reweight/main_iterative.py", *LTR_ARGS, iters=3, valid=3)
    assert any(w.category is DeprecationWarning and "MetaIterativeProblem" in str(w.message)
               for w in caught)
    engine = g["engine"]
    assert isinstance(engine.inner, IterativeProblem)
    assert (engine.inner.count, engine.outer.count) == (3, 3)
    assert 0 <= g["best_acc"] <= 100


# -- iMAML: a betty.envs.Env draws the tasks ------------------------------------------------
@pytest.mark.slow
def test_implicit_maml_with_env(run):
    argv = ("--n_way", "3", "--k_spt", "1", "--k_qry", "2", "--inner_steps", "2",
            "--task_num", "2")
    start = run("implicit_maml/main.py", *argv, iters=0)["engine"]
    g = run("implicit_maml/main.py", *argv, iters=4, valid=4)
    engine = g["engine"]
    assert [engine.inner_0.count, engine.inner_1.count, engine.outer.count] == [4, 4, 2]
    assert g["db"].draws == 2  # env.step() at global steps 1 and 3: one draw per window
    assert engine.inner_0.env is g["env"] and engine.outer.env is g["env"]
    assert 0 <= engine.best_acc <= 100
    # Adam (lr 1e-3) moved every meta-parameter by at most 2 steps' worth
    moved = (flat(engine.outer.module) - flat(start.outer.module)).abs()
    assert 0.99e-3 <= moved.max().item() <= 2e-3 * 1.01


# -- tutorials -----------------------------------------------------------------------------
def test_tutorial_quick_start(run, capsys):
    g = run("tutorial/1_quick_start.py", iters=5)
    engine = g["engine"]
    assert (engine.classifier.count, engine.reweight.count) == (5, 5)
    out = capsys.readouterr().out
    assert out.count("Reweight Loss:") == 5  # the upper's own print, once per step
    assert f"Imbalanced Classification Accuracy: {g['acc']}" in out
    assert g["total"] == len(g["valid_dataset"]) and 0 <= g["acc"] <= 100


@pytest.mark.slow
def test_tutorial_logging_prints_by_default(run, capsys):
    g = run("tutorial/3_logging.py", iters=100, valid=100, fresh_logging=True)
    engine = g["engine"]
    assert (engine.classifier.count, engine.reweight.count) == (100, 100)
    with torch.no_grad():  # the one validation, recomputed
        right = sum((engine.classifier(x).argmax(1) == y).sum().item()
                    for x, y in g["valid_dataloader"])
    assert engine.best_acc == pytest.approx(100 * right / len(g["valid_dataset"]))
    out = capsys.readouterr().out
    stamp = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[INFO\] "
    (reweight,) = re.findall(stamp + r"step +100 \| reweight +\| loss=\S+ +acc=\S+", out, re.M)
    (valid,) = re.findall(stamp + r"step +100 \| validation \| acc=(\S+) +best_acc=\S+", out,
                          re.M)
    assert float(valid) == pytest.approx(engine.best_acc, rel=1e-5)


# -- ImageNet pruning: self._global_step, self.inner.device, two shuffled loaders ---------
def test_imagenet_pruning(run, tmp_path):
    classes = HERE / "imagenet_pruning" / "metadata" / "imagenet_classes.json"
    g = run("imagenet_pruning/main.py", "--layers", "18", "--batch_size", "4", "--epochs", "2",
            "--num_workers", "0", "--unroll_step", "2", "--log_step", "2",
            "--imagenet-classes", str(classes), "--checkpoint_directory", str(tmp_path / "ck"),
            iters=8)
    engine = g["engine"]
    assert (g["epoch_iter"], g["total_iter"]) == (4, 8)
    assert (engine.inner.count, engine.outer.count) == (8, 4)
    # the inner's training_step passes self._global_step to the meta net: the global step of
    # each inner step (1..8), then of the darts probes (two evaluations at each outer step)
    steps = g["meta_model"].global_steps
    assert steps[:2] == [1, 2] and sorted(set(steps)) == list(range(1, 9))
    want = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    assert engine.inner.device == want  # what the program's validation moves batches to
    saved = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert saved == ["cls_4.pt", "cls_8.pt", "mwn_4.pt", "mwn_8.pt"]  # validation each epoch
    assert 0 <= engine.best_acc <= 100


# -- DARTS architecture search (roll_back=True) --------------------------------------------
@pytest.mark.slow
def test_darts_architecture_search(run):
    argv = ("--batchsz", "8", "--epochs", "1", "--init_ch", "4", "--layers", "1",
            "--arch_steps", "2")
    start = run("neural_architecture_search/train_search.py", *argv, iters=0)["engine"]
    g = run("neural_architecture_search/train_search.py", *argv, iters=10)
    engine = g["engine"]
    assert g["train_iters"] == 1 * (64 * 0.5 // 8 + 1) == 5  # the program's own schedule
    assert (engine.classifier.count, engine.arch.count) == (5, 5)
    # Adam at lr 3e-4 with betas (0.5, 0.999): at most ~lr per step on each weight
    moved = (flat(engine.arch.module) - flat(start.arch.module)).abs()
    assert 0.9 * 3e-4 <= moved.max().item() <= 5 * 3e-4 * 1.1
    # roll back: the window's real step replays the batch, so the network trained 5 steps
    # with its scheduler stepped 5 times (cosine over 5)
    assert engine.classifier.scheduler.last_epoch == 5


# -- learning by ignoring: three levels, DataLoader workers --------------------------------
@pytest.mark.slow
def test_learning_by_ignoring(run, capsys):
    argv = ("--batch_size", "4", "--data_dir", "data")
    start = run("learning_by_ignoring/main.py", *argv, iters=0)["engine"]
    g = run("learning_by_ignoring/main.py", *argv, iters=3, valid=3)
    engine = g["engine"]
    assert [engine.pretrain.count, engine.finetune.count, engine.reweight.count] == [3, 3, 3]
    assert 0 <= g["best_acc"] <= 1 and "Cl --> Ar || best_acc" in capsys.readouterr().out
    for name in ("pretrain", "finetune", "reweight"):  # every level trained
        moved = flat(getattr(engine, name).module) - flat(getattr(start, name).module)
        assert moved.abs().max().item() > 1e-6, name

