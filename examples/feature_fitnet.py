"""A feature method (FitNet's hint, plus AT) on models defined here, in a plain loop.

Taps are module names of your own models; kdflow builds the hint's regressor from the taps'
shapes (hence `example_inputs`) and hands it to the student's optimizer."""
import os

import torch
import torch.nn as nn

import kdflow
from kdflow.data import load_dataset


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv1d(width, 2 * width, 3, padding=1), nn.BatchNorm1d(2 * width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.body(x)))


torch.manual_seed(0)
quick = os.environ.get("KDFLOW_EXAMPLE_QUICK") == "1"
train = load_dataset("mnist1d", "train")
x_all, y_all = (train.x - train.mean[0]) / train.std[0], train.y
teacher, student = Net(32), Net(8)  # in practice the teacher is trained first; see plain_kd_mnist1d.py

flow = kdflow.methods.fitnet(teacher=teacher, student=student, teacher_tap="middle", student_tap="middle")
distiller = kdflow.Distiller(flow, example_inputs=x_all[:2])
print(f"student optimiser: {len(distiller.parameters_of('student'))} tensors (its own and the regressor's)")
opt = torch.optim.SGD(distiller.parameters_of("student"), lr=0.05, momentum=0.9)
steps = 5 if quick else 200
for step in range(steps):
    idx = torch.randint(0, len(y_all), (64,))
    out = distiller(x_all[idx], y_all[idx])
    opt.zero_grad()
    out.total.backward()
    opt.step()
print({name: round(value.item(), 4) for name, value in out.terms.items()})
