"""Datasets: the generated sample set, transforms, and (in `diffray.data.imagefolder`) Ray Data readers.

Importing this package does not import ray.
"""

from diffray.data.sample import resolve_data_path, write_sample_dataset
from diffray.data.transforms import decode_image, preprocess_images, tokenize_captions

__all__ = ["decode_image", "preprocess_images", "resolve_data_path", "tokenize_captions", "write_sample_dataset"]
