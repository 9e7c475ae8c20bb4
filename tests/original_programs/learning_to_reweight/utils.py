"""The original example's utils.py functions the program calls."""

import random

import numpy as np
import torch


def set_seed(seed=1):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
