"""Datasets in their published formats, and batched tensor augmentation."""
from kdflow.data.base import DATASETS, ArrayDataset, DatasetError, load_dataset, register_dataset

__all__ = ["DATASETS", "ArrayDataset", "DatasetError", "load_dataset", "register_dataset"]
