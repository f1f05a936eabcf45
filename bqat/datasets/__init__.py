"""Datasets on disk: CIFAR-10/100 and image folders (ImageNet and the like).

Importing this package registers `cifar10`, `cifar100`, `imagenet` and `imagefolder` in
`bqat.data.DATASETS`. `files` reads image-folder trees and decodes them into uint8
tensors; `loaders` turns images into batches, either in memory with tensor ops or
streamed through a torch DataLoader with workers.
"""

from bqat.datasets import cifar, imagenet  # noqa: F401  (register the datasets)
