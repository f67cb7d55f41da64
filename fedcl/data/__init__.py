"""Data sets held in memory as uint8 tensors, and partitioners that split them across sites."""

from fedcl.data.clutter import Clutter, load_fashion_mnist_cluttered, make_cluttered
from fedcl.data.folder import load_image_folder
from fedcl.data.idx import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from fedcl.data.load import DATASET_NAMES, load_dataset
from fedcl.data.medmnist import load_medmnist_npz
from fedcl.data.partition import partition, site_class_counts
from fedcl.data.synthetic import make_synthetic
from fedcl.data.types import DataError, ImageSet

__all__ = [
    "Clutter",
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "DataError",
    "ImageSet",
    "load_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_cluttered",
    "load_image_folder",
    "load_medmnist_npz",
    "make_cluttered",
    "make_synthetic",
    "partition",
    "read_idx",
    "site_class_counts",
]
