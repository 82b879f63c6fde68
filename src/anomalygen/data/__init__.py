"""Datasets: readers (MVTec AD, MVTec LOCO, VisA, generic folder), the paper split, a category's
training split (``load_training``), image and mask I/O with validation, dataset summaries, and a
procedural demo dataset (``data.demo``)."""

from anomalygen.data.images import (
    IMAGE_SUFFIXES,
    check_record,
    image_size,
    load_defect,
    load_defects,
    load_goods,
    load_image,
    load_mask,
)
from anomalygen.data.info import dataset_info
from anomalygen.data.readers import CategoryData, list_categories, load_category, load_folder
from anomalygen.data.split import paper_split
from anomalygen.data.training import Training, load_training

__all__ = [
    "IMAGE_SUFFIXES",
    "CategoryData",
    "Training",
    "check_record",
    "dataset_info",
    "image_size",
    "list_categories",
    "load_category",
    "load_defect",
    "load_defects",
    "load_folder",
    "load_goods",
    "load_image",
    "load_mask",
    "load_training",
    "paper_split",
]
