"""Images for diffusion: scikit-learn's 8x8 digits (shipped with scikit-learn, no download), a folder
of image files, or a `datasets` dataset saved on disk. Batches are float tensors (B, C, H, W) scaled
to [-1, 1]; the split is a fixed function of `split_seed` so that every run (and the FD feature
classifier, scripts/train_digits_classifier.py) holds out the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genlight.datamodules.tensors import TensorSplitsDataModule

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
METRICS = ("fd", "energy_distance", "loss")


def digits_split(split_seed: int = 0, n_heldout: int = 500) -> dict[str, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits (pixel values 0..16) as (N, 1, 8, 8) in [-1, 1]: 1297 train, 500
    held out. The held-out digits are the FD reference for both val and test: a Frechet distance in 64-d
    needs hundreds of real images, and 1797 do not make three useful splits (test draws fresh samples)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    parts = {"val": order[:n_heldout], "test": order[:n_heldout], "train": order[n_heldout:]}
    return {k: x[v] for k, v in parts.items()} | {f"{k}_labels": y[v] for k, v in parts.items()}


def _to_array(img, where: str, channels: int, size: int) -> np.ndarray:
    """One PIL image -> (C, size, size) float32 in [-1, 1]; wrong channel counts are an error, not a conversion."""
    from PIL import Image

    have = len(img.getbands())
    if have != channels:
        raise ValueError(
            f"{where}: image has {have} channel(s) (mode {img.mode}), data.channels={channels}; "
            f"convert the images or set data.channels={have}"
        )
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.float32).reshape(size, size, channels).transpose(2, 0, 1)
    return a / 127.5 - 1.0


def folder_labels(root: str, files: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """Class labels from the first sub-folder under `root` (sorted names -> 0, 1, ...), as torchvision's
    ImageFolder does; an image directly under `root` has no class, which is an error."""
    base = Path(root)
    loose = [f for f in files if f.parent == base]
    if loose:
        raise ValueError(f"data.labels=true (algo.class_conditional): {loose[0]} is not in a class sub-folder of "
                         f"data.path={root}; put each class's images in their own sub-folder")
    names = sorted({f.relative_to(base).parts[0] for f in files})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[f.relative_to(base).parts[0]] for f in files]), names


def image_files(root: str) -> list[Path]:
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"data.path={root}: no such directory")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data.path={root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_image_folder(root: str, channels: int, size: int, files: list[Path] | None = None) -> torch.Tensor:
    """Every image under `root` (recursively, sorted: `image_files`, or those given), checked and resized; a
    corrupt file is named."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(root) if files is None else files
    out = []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                out.append(_to_array(img, str(f), channels, size))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from e
    return torch.from_numpy(np.stack(out))


def load_image_dataset(path: str, column: str, channels: int, size: int) -> torch.Tensor:
    """A `datasets` dataset saved with `save_to_disk` (a Dataset, or a DatasetDict's 'train' split)."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise ValueError(f"data.path={path}: a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    if column not in ds.column_names:
        raise ValueError(f"data.path={path}: no column data.image_column={column!r} (columns: {ds.column_names})")
    return torch.from_numpy(np.stack([_to_array(img, f"{path} row {i}", channels, size) for i, img in enumerate(ds[column])]))


class ImageDataModule(TensorSplitsDataModule):
    """`source`: digits | folder | disk. Folder and disk data are split by `val_fraction` / `test_fraction`."""

    def __init__(
        self,
        source: str = "digits",
        path: str | None = None,
        image_column: str = "image",
        image_size: int = 8,
        channels: int = 1,
        metric: str = "fd",
        labels: bool = False,
        num_classes: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if source not in ("digits", "folder", "disk"):
            raise ValueError(f"data.source={source!r}: must be 'digits', 'folder' or 'disk'")
        if source == "digits" and (image_size, channels) != (8, 1):
            raise ValueError(f"data.source=digits: images are 1x8x8 (got data.channels={channels}, data.image_size={image_size})")
        if source != "digits" and not path:
            raise ValueError(f"data.source={source}: set data.path to the directory")
        if metric not in METRICS:
            raise ValueError(f"data.metric={metric!r}: must be one of {list(METRICS)}")
        if labels and source == "disk":
            raise ValueError("data.labels=true (algo.class_conditional): labels come from digits or from an image "
                             "folder's sub-folders; data.source=disk has none")
        self.save_hyperparameters(logger=False)
        self.metric = metric

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        if hp.source == "digits":
            parts = digits_split(hp.split_seed)
            self.splits = {k: (parts[k], parts[f"{k}_labels"]) if hp.labels else parts[k] for k in ("train", "val", "test")}
            return
        y = None
        if hp.source == "folder":
            files = image_files(hp.path)  # one walk of the folder for the images and their labels
            x = load_image_folder(hp.path, hp.channels, hp.image_size, files)
            if hp.labels:
                y, names = folder_labels(hp.path, files)
                if len(names) != hp.num_classes:
                    raise ValueError(f"data.num_classes={hp.num_classes}, but data.path={hp.path} has {len(names)} "
                                     f"class sub-folders ({', '.join(names[:10])}); set data.num_classes={len(names)}")
                self.class_names = names
        else:
            x = load_image_dataset(hp.path, hp.image_column, hp.channels, hp.image_size)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(hp.split_seed))
        n_val, n_test = int(len(x) * hp.val_fraction), int(len(x) * hp.test_fraction)
        if len(x) - n_val - n_test < 1 or n_val < 1:
            raise ValueError(f"data.path={hp.path}: {len(x)} images are too few to split (val_fraction={hp.val_fraction})")
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        # no test images (test_fraction 0): no test split, rather than test metrics from the val images
        self.splits = {k: (x[v], y[v]) if y is not None else x[v] for k, v in parts.items() if len(v)}
