"""BSS's attack, whole batch every step against the shrinking batch kdflow runs (issue 14, item 3).

    python bench/bss_attack.py TEACHER.pt [--data fashion_mnist] [--batches 6] [--threads 1]

Needs a trained teacher (a random-weight teacher's flat margins make samples cross at other steps than
a trained one's): a kdflow model file, e.g. a study's `teachers/HASH/nodes/teacher.pt`. On batches of
128 test images (augmented as in training, fixed seeds) it selects base samples and target classes as
the criterion does, then runs the attack both ways, interleaved, and prints the teacher samples each
runs and the time ratio. The whole-batch version is the algorithm as published (every attacked sample
through the teacher at each of the 10 steps, then a teacher forward on the result)."""
from __future__ import annotations

import argparse
import time

import torch

from kdflow.checkpoint import read_model_file
from kdflow.data import load_dataset
from kdflow.data.augment import augment_batch
from kdflow.losses.stateful.adversarial import MARGIN_EPS, attack_and_teacher_logits, draw_target_classes, select_base_samples
from kdflow.models import build_model


def whole_batch_attack(teacher, x, base, k, steps: int = 10, eta: float = 0.3) -> tuple[torch.Tensor, int]:
    adv, seen = x.clone(), 0
    for _ in range(steps):
        a = adv.clone().requires_grad_(True)
        z = teacher(a)
        seen += len(a)
        margin = z.gather(1, base[:, None])[:, 0] - z.gather(1, k[:, None])[:, 0]
        (g,) = torch.autograd.grad(margin.sum(), a)
        moving = z.argmax(1) == base
        if not moving.any():
            break
        scale = eta * (margin.detach() + MARGIN_EPS) / g.flatten(1).norm(dim=1) * moving.float()
        adv = (adv - scale.view((-1,) + (1,) * (x.dim() - 1)) * g).detach()
    with torch.no_grad():
        logits = teacher(adv)
    return logits, seen + len(adv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = read_model_file(args.teacher)
    teacher = build_model(ck["arch"], ck["num_classes"], tuple(ck["input_shape"]), **ck["args"])
    teacher.load_state_dict(ck["state_dict"])
    teacher.eval()
    ds = load_dataset(args.data, "test")
    g = torch.Generator().manual_seed(0)
    seen = {"whole batch": 0, "shrinking": 0}
    spent = {"whole batch": 0.0, "shrinking": 0.0}
    for b in range(args.batches):
        idx = torch.randperm(len(ds), generator=g)[:128]
        x, y = augment_batch(ds.x[idx], ds.mean, ds.std), ds.y[idx]
        with torch.no_grad():
            z = teacher(x)
        sel = select_base_samples(z, z, y, 64)
        torch.manual_seed(b)
        k = draw_target_classes(z[sel])
        order = ["whole batch", "shrinking"] if b % 2 == 0 else ["shrinking", "whole batch"]
        for name in order:
            counted: list[int] = []
            hook = teacher.register_forward_hook(lambda m, i, o: counted.append(i[0].shape[0]))
            t = time.perf_counter()
            if name == "whole batch":
                want, _ = whole_batch_attack(teacher, x[sel], y[sel], k)
            else:
                _, got = attack_and_teacher_logits(teacher, x[sel], y[sel], k)
            spent[name] += time.perf_counter() - t
            hook.remove()
            seen[name] += sum(counted)
        assert torch.allclose(got, want, atol=1e-3), "the two attacks disagree"
    n = args.batches
    print(f"teacher samples per batch (up to 64 attacked): whole batch {seen['whole batch'] / n:.0f}, "
          f"shrinking {seen['shrinking'] / n:.0f} ({seen['shrinking'] / seen['whole batch']:.2f}×); "
          f"attack time shrinking / whole batch {spent['shrinking'] / spent['whole batch']:.2f}× "
          f"({n} batches, interleaved, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
