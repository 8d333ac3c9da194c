"""SLKD in your own loop: a frozen teacher, two self-learning teachers (fresh copies of the
teacher's architecture, created by kdflow) trained alongside the student, one backward pass."""
import os

import torch
import torch.nn as nn

import kdflow
from kdflow.data import load_dataset

torch.manual_seed(0)
quick = os.environ.get("KDFLOW_EXAMPLE_QUICK") == "1"
train = load_dataset("mnist1d", "train")
x_all, y_all = (train.x - train.mean[0]) / train.std[0], train.y
teacher = nn.Sequential(nn.Flatten(), nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 10))  # stands in for a trained one
student = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))

distiller = kdflow.Distiller(kdflow.methods.slkd(teacher=teacher, student=student))
print("trainable nodes:", distiller.trainable_nodes())  # student, slt1, slt2
optimizers = [torch.optim.SGD(distiller.parameters_of(node), lr=0.05, momentum=0.9) for node in distiller.trainable_nodes()]
for step in range(5 if quick else 300):
    idx = torch.randint(0, len(y_all), (64,))
    out = distiller(x_all[idx], y_all[idx])
    for opt in optimizers:
        opt.zero_grad()
    out.total.backward()  # the fused SL-T term is not detached: the student also pulls the SL-Ts (official code)
    for opt in optimizers:
        opt.step()
print(f"total {out.total.item():.3f}; terms: {sorted(out.terms)}")
