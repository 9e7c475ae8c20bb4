"""Stand-in for the original example's support/omniglot_loader.py: `OmniglotNShot` with the
same constructor and iteration (``next(db)`` gives one meta-batch ``x_spt, y_spt, x_qry,
y_qry`` of shapes ``[task_num, n_way * k, 1, imgsz, imgsz]`` and ``[task_num, n_way * k]``),
drawing seeded synthetic characters (a class is a fixed random 28x28 pattern plus noise)."""

import numpy as np
import torch


class OmniglotNShot:
    def __init__(self, root, batchsz, n_way, k_shot, k_query, imgsz, mode="train"):
        self.batchsz, self.n_way, self.k_shot, self.k_query = batchsz, n_way, k_shot, k_query
        self.rng = np.random.default_rng(0 if mode == "train" else 1)
        self.patterns = self.rng.normal(size=(20, 1, imgsz, imgsz)).astype(np.float32)
        self.datasets_cache = {mode: [None] * batchsz}  # one cached meta-batch (validation)
        self.draws = 0

    def _set(self, classes, shots):
        x = self.patterns[classes].repeat(shots, axis=0)
        x = x + 0.5 * self.rng.normal(size=x.shape).astype(np.float32)
        y = np.arange(len(classes)).repeat(shots)
        return x, y

    def __iter__(self):
        return self

    def __next__(self):
        self.draws += 1
        batch = [[], [], [], []]
        for _ in range(self.batchsz):
            classes = self.rng.choice(len(self.patterns), self.n_way, replace=False)
            for i, part in enumerate(self._set(classes, self.k_shot)
                                     + self._set(classes, self.k_query)):
                batch[i].append(part)
        x_spt, y_spt, x_qry, y_qry = (torch.from_numpy(np.stack(b)) for b in batch)
        return x_spt, y_spt.long(), x_qry, y_qry.long()
