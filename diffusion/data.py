"""Training data: the dataset the config names, batches, and the order they come in.

Every dataset item is `{"image": (C, H, W) float32 in [-1, 1], "text": str}`; `collate` turns a
list of items into the trainer's batch `{"images": (B, C, H, W), "prompts": list[str]}`.
The datasets themselves: shapes.py (the embedded shapes task) and folder.py (image folders).
`GlobalBatchSampler` makes the epoch orders (deterministic, resumable, one slice per rank) and
`resume_position` says where a resumed run goes on.
"""

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import DATASETS
from .folder import ImageFolderDataset
from .shapes import SHAPES_CHANNELS, ShapesDataset, all_captions

SAMPLE_CAPTION_STRIDE = 3  # shapes sample grids: every third caption, a mix of colours and shapes
SAMPLE_PROMPTS = 8  # a folder dataset's sample grid: its first 8 distinct captions
# Which rule shuffles an epoch; saved with a run's data position, so a checkpoint written under
# another rule resumes from its next epoch. 1: seed + epoch (runs with adjacent seeds saw the
# same orders one epoch apart); 2: derived_seed(seed, epoch).
DATA_ORDER = 2


def derived_seed(*parts: int) -> int:
    """A 64-bit torch seed hashed from integers: unrelated for different tuples (unlike sums,
    where seed 1's epoch 0 would be seed 0's epoch 1), the same in every process and run."""
    text = "/".join(str(int(part)) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# Batches and construction from the config
# ---------------------------------------------------------------------------------------------

def collate(batch: Sequence[dict]) -> dict:
    """Items -> the trainer's batch {"images": (B, C, H, W), "prompts": list of B str}."""
    if len(batch) == 0:
        raise ValueError("batch is empty; collate needs at least one item")
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"batch images differ in shape: {sorted(shapes)}; every item must be "
                         "(C, H, W) with the same C, H, W")
    return {"images": torch.stack([item["image"] for item in batch]),
            "prompts": [item["text"] for item in batch]}


def build_dataset(config, image_size: int | None = None,
                  image_channels: int | None = None) -> ShapesDataset | ImageFolderDataset:
    """The dataset `config.dataset` names: "shapes" or "folder" (reading `config.data_dir`).

    Uses `sample_size`, `seed`, `in_channels` and, for folders, `random_flip` (shapes are all
    left-right symmetric at uniform positions, so a flip would add nothing there).
    image_size and image_channels replace sample_size and in_channels where the images are
    not what the network sees (latent diffusion: the trainer's image_size, image_channels).
    """
    size = config.sample_size if image_size is None else image_size
    channels = config.in_channels if image_channels is None else image_channels
    if config.dataset == "shapes":
        if channels != SHAPES_CHANNELS:
            raise ValueError(f"dataset='shapes' draws RGB images; in_channels="
                             f"{channels} must be {SHAPES_CHANNELS}")
        return ShapesDataset(sample_size=size, seed=config.seed)
    if config.dataset == "folder":
        if not config.data_dir or not Path(config.data_dir).is_dir():
            raise ValueError(f"dataset='folder' needs data_dir (the image folder); "
                             f"got data_dir={config.data_dir!r}, which is not a folder")
        return ImageFolderDataset(config.data_dir, size, random_flip=config.random_flip,
                                  seed=config.seed, in_channels=channels)
    raise ValueError(f"dataset={config.dataset!r} is not one of {list(DATASETS)}")


def training_captions(config) -> list[str]:
    """The training captions, what tokenizer='word' learns its vocabulary from: the 24 shapes
    captions, or a folder's, one per image in dataset order, read without decoding an image."""
    return build_dataset(config, image_channels=SHAPES_CHANNELS).captions  # any valid channels


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Deterministic, resumable batches for one rank.

    Epoch e shuffles the dataset with `derived_seed(seed, e)`; global batch b is
    perm[b*G:(b+1)*G] with G = batch_size * world_size, and rank r takes its interleaved slice
    [r::world_size] (the trainer slices its noise the same way). The last incomplete global
    batch is dropped.
    `set_position(epoch, batch)` resumes mid-epoch without replaying earlier batches.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        self.global_batch = batch_size * world_size
        if dataset_len < self.global_batch:
            raise ValueError(f"the dataset has {dataset_len} items, fewer than one global batch "
                             f"of {self.global_batch} (batch_size {batch_size} x {world_size} "
                             "processes)")
        self.dataset_len, self.world_size, self.rank = dataset_len, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = dataset_len // self.global_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        if self.shuffle:
            seed = derived_seed(self.seed, self.epoch)
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.dataset_len)
        G = self.global_batch
        for b in range(self.start_batch, self.batches_per_epoch):
            yield order[b * G:(b + 1) * G][self.rank::self.world_size].tolist()


def resume_position(epoch: int, batch: int, saved: dict, now: dict, batches_per_epoch: int):
    """Where to resume in the data: (epoch, batch, message or ""). The saved position (epoch,
    batch) counts global batches of the saving run. The epoch's order depends on the seed, the
    dataset size and the shuffling rule (`data_order`) only, so with a new global batch the run
    goes on after the items already seen (skipping fewer than one batch); with a new seed,
    dataset size or rule the order is another one, and the run goes on from the start of the
    next epoch. A checkpoint without `data_order` was shuffled by rule 1; one without the other
    keys resumes as if they were unchanged."""
    saved = {"data_order": 1, **saved}
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    if not changed or batch == 0:
        return epoch, batch, ""
    what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    if changed.keys() == {"global_batch"}:
        seen = batch * saved["global_batch"]
        batch = -(-seen // now["global_batch"])
        if batch < batches_per_epoch:
            return epoch, batch, (f"{what} since the checkpoint: epoch {epoch} goes on after its "
                                  f"first {seen} items, at batch {batch}")
    return epoch + 1, 0, (f"{what} since the checkpoint: the rest of epoch {epoch}'s order is "
                          f"another one; training goes on from the start of epoch {epoch + 1}")


def default_sample_prompts(dataset) -> list[str]:
    """The sample grids' prompts when config.sample_prompts is empty: every third shapes
    caption, or the first distinct captions of a folder dataset (its own prompts, not shapes')."""
    if not isinstance(dataset, ImageFolderDataset):
        return all_captions()[::SAMPLE_CAPTION_STRIDE]
    distinct = list(dict.fromkeys(c for c in dataset.captions if c))[:SAMPLE_PROMPTS]
    return distinct or [""] * SAMPLE_PROMPTS
