# The original's examples/logistic_regression_hpo/logistic_regression_implicit.py, rewritten
# with the same betty calls: the same HPO with an implicit hypergradient (conjugate gradient).
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

device = "cuda" if torch.cuda.is_available() else "cpu"

DATA_NUM = 1000
DATA_DIM = 20

w_gt = np.random.randn(DATA_DIM)
x = np.random.randn(DATA_NUM, DATA_DIM)
y = (x @ w_gt + 0.1 * np.random.randn(DATA_NUM) > 0).astype(float)
x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.5)
x_train = torch.from_numpy(x_train).to(device).float()
y_train = torch.from_numpy(y_train).to(device).float()
x_val = torch.from_numpy(x_val).to(device).float()
y_val = torch.from_numpy(y_val).to(device).float()


def make_data_loader(xs, ys):
    return [(xs, ys)]


class ChildNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DATA_DIM))

    def forward(self, inputs):
        return inputs @ self.w, self.w


class ParentNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(DATA_DIM))

    def forward(self):
        return self.w


class Parent(ImplicitProblem):
    def training_step(self, batch):
        inputs, targets = batch
        return F.binary_cross_entropy_with_logits(self.inner(inputs)[0], targets)

    def configure_train_data_loader(self):
        return make_data_loader(x_val, y_val)

    def configure_module(self):
        return ParentNet().to(device)

    def configure_optimizer(self):
        return torch.optim.SGD(self.module.parameters(), lr=1, momentum=0.9)

    def param_callback(self, params):  # the original's one-argument form
        for p in params:
            p.data.clamp_(min=1e-8)


class Child(ImplicitProblem):
    def training_step(self, batch):
        inputs, targets = batch
        outs, params = self.module(inputs)
        penalty = params.unsqueeze(0) @ torch.diag(self.outer()) @ params.unsqueeze(1)
        return F.binary_cross_entropy_with_logits(outs, targets) + 0.5 * penalty.sum()

    def configure_train_data_loader(self):
        return make_data_loader(x_train, y_train)

    def configure_module(self):
        return ChildNet().to(device)

    def configure_optimizer(self):
        return torch.optim.SGD(self.module.parameters(), lr=0.1)

    def on_inner_loop_start(self):
        self.module.w.data.zero_()


engine_config = EngineConfig(train_iters=10000, logger_type="none")
parent_config = Config(log_step=1, first_order=True, retain_graph=True)
child_config = Config(type="cg", cg_iterations=3, cg_alpha=1, unroll_steps=100)

parent = Parent(name="outer", config=parent_config, device=device)
child = Child(name="inner", config=child_config, device=device)

problems = [parent, child]
u2l = {parent: [child]}
l2u = {child: [parent]}
dependencies = {"l2u": l2u, "u2l": u2l}

engine = Engine(config=engine_config, problems=problems, dependencies=dependencies)
engine.run()
