"""Distillation losses: plain functions of tensors, one file per knowledge family.

Importing this package imports every module under it (`stateful/` included): each registers its
criteria where they are defined, and the names in each module's ``__all__`` are re-exported here
(``kdflow.losses.kd``, ``kdflow.losses.CRDLoss``...). A new loss needs no line in this file.
"""
import importlib
import pkgutil

from kdflow.losses.registry import CRITERIA, BuildInfo, criterion, register_criterion


def _import_all(package_name: str, path: list[str]) -> list[str]:
    exported: list[str] = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        module = importlib.import_module(f"{package_name}.{info.name}")
        if info.ispkg:
            exported += _import_all(module.__name__, list(module.__path__))
        for name in getattr(module, "__all__", ()):
            if name in globals() and globals()[name] is not getattr(module, name):
                raise ImportError(f"kdflow.losses: {module.__name__}.{name} clashes with another loss of that name")
            globals()[name] = getattr(module, name)
            exported.append(name)
    return exported


__all__ = ["CRITERIA", "BuildInfo", "criterion", "register_criterion", *_import_all(__name__, list(__path__))]
