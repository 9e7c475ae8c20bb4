"""Fault injection: a training process killed (SIGKILL) at random moments while it saves a
checkpoint every step. After each kill the newest checkpoint loads, a run resumed from it ends
bitwise equal to an uninterrupted run, and the resumed run's first save removes the temporary
files the killed process left.

Run as a script, this file is the training process: ``python test_kill_during_save.py DIR``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from betty import Engine
from betty.checkpoint import list_checkpoints, safe_load
from betty.configs import EngineConfig
from betty.problems import ImplicitProblem

ITERS, WIDTH = 40, 512  # a 1 MB weight: saving is most of each step


class Wide(ImplicitProblem):
    def training_step(self, batch):
        return (self.module(batch) ** 2).mean()


def program(**engine: object) -> Engine:
    torch.manual_seed(0)
    net = torch.nn.Linear(WIDTH, WIDTH)
    data = [torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    problem = Wide("wide", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01,
                                                                 momentum=0.9),
                   train_data_loader=data)
    return Engine([problem], EngineConfig(train_iters=ITERS, progress_bar=False, **engine))


def _child(directory: str) -> None:
    engine = program(checkpoint_dir=directory, checkpoint_step=1, keep_checkpoints=2,
                     resume_from="latest")
    open(directory + ".ready", "w").close()  # noqa: SIM115 - a marker for the parent
    engine.run()


@pytest.mark.slow
def test_kill_during_saves_then_resume_is_bitwise_and_leaves_no_litter(tmp_path):
    reference = program()
    reference.run()
    want = {k: v.clone() for k, v in reference.wide.module.state_dict().items()}
    rng = random.Random(0)
    directory = str(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_mid_save = 0
    for _ in range(4):
        marker = directory + ".ready"
        if os.path.exists(marker):
            os.remove(marker)
        child = subprocess.Popen([sys.executable, __file__, directory],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and child.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            child.wait(timeout=rng.uniform(0.05, 0.6))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        killed_mid_save += any(n.endswith(".tmp") for n in os.listdir(directory))
        found = list_checkpoints(directory)
        if found:  # the newest complete file always loads
            assert safe_load(found[-1][1])["engine"]["global_step"] == found[-1][0]
    resumed = program(checkpoint_dir=directory, checkpoint_step=1, keep_checkpoints=2,
                      resume_from="latest")
    resumed.run()
    for key, value in resumed.wide.module.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
    assert [s for s, _ in list_checkpoints(directory)] == [ITERS - 1, ITERS]
    print(f"kills that left a temporary file: {killed_mid_save} of 4")


if __name__ == "__main__":
    _child(sys.argv[1])
