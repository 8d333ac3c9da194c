"""Hinton KD in a plain PyTorch loop on MNIST-1D: your models, your loop, kdflow's loss graph."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdflow
from kdflow.data import load_dataset

torch.manual_seed(0)
quick = os.environ.get("KDFLOW_EXAMPLE_QUICK") == "1"
train, test = load_dataset("mnist1d", "train"), load_dataset("mnist1d", "test")
x_train, y_train = (train.x - train.mean[0]) / train.std[0], train.y
x_test, y_test = (test.x - train.mean[0]) / train.std[0], test.y
epochs = 2 if quick else 20

teacher = nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(),
                        nn.AdaptiveAvgPool1d(8), nn.Flatten(), nn.Linear(256, 10))
student = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


def batches():
    order = torch.randperm(len(y_train))
    for i in range(0, len(order), 64):
        yield x_train[order[i : i + 64]], y_train[order[i : i + 64]]


# 1. an ordinary teacher, trained on labels
opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
for _ in range(epochs):
    teacher.train()
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()

# 2. the student distilled from it: three lines change in the loop
distiller = kdflow.Distiller(kdflow.methods.kd(teacher=teacher, student=student, temperature=4))
opt = torch.optim.Adam(distiller.parameters_of("student"), lr=3e-3)
for epoch in range(epochs):
    distiller.train()  # the teacher stays in eval mode, frozen
    for x, y in batches():
        out = distiller(x, y, epoch=epoch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
print(f"teacher {accuracy(teacher):.1f}%  student with KD {accuracy(student):.1f}%")
