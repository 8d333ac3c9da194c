"""Datasets in their published formats, and batched tensor augmentation."""
# Importing the loader modules fills the DATASETS registry.
from kdflow.data import cifar, fashion_mnist, folder, mnist1d, synthetic  # noqa: F401
from kdflow.data.augment import augment_batch, normalize
from kdflow.data.base import (
    DATASETS,
    ArrayDataset,
    DatasetError,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetError",
    "augment_batch",
    "load_dataset",
    "normalize",
    "register_dataset",
]
