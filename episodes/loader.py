"""Sources -> episodes, deterministically: episode i depends only on (seed, i), never on workers.

``EpisodeSet`` is a map-style dataset: every episode draws from its own generator seeded by
the base seed and the episode's index (and, per source, the source's name), so the same
episodes come out whatever the number of workers, the order they are asked for, or which
other sources share the set. Images stay uint8 until the backbone: they are cheap to send
between processes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from episodes.episode import Episode, Split, episode_id
from episodes.readers.base import Source
from episodes.sampler import EpisodeDescription, SamplerConfig, check_split, sample_episode_description
from episodes.spec import parse_split

__all__ = ["EpisodePlan", "EpisodeSet", "make_loader", "resize_uint8"]

log = logging.getLogger(__name__)

_SPLIT_CODE = {Split.TRAIN: 0, Split.VALID: 1, Split.TEST: 2}


@dataclass(frozen=True)
class EpisodePlan:
    """Episode ``i`` without its pixels: which images, in which role and with which label.

    ``class_ids[label]`` is the global class of a label; support and query are lists of
    (class id, image index) pairs, grouped by label in label order.
    """

    index: int
    source: str
    split: Split
    description: EpisodeDescription
    class_ids: tuple[int, ...]  # label order (a random permutation of description.class_ids)
    support: tuple[tuple[int, int], ...]
    query: tuple[tuple[int, int], ...]

    @property
    def episode_id(self) -> str:
        return episode_id(self.source, self.split, list(self.support), list(self.query))

    @property
    def way(self) -> int:
        return len(self.class_ids)


def _name_code(name: str) -> int:
    """A stable integer for a source name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[n, 3, H, W]`` to ``size`` x ``size`` (bilinear, antialiased), back to uint8."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.shape[0] == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    # torch resizes uint8 directly on the CPU: ~6x faster than a float round trip, and no float copy.
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.contiguous()


class EpisodeSet(Dataset[Episode]):
    """A fixed-length, indexable collection of episodes drawn from one or more sources.

    Args:
        sources: the sources to draw from.
        split: the class split every episode uses.
        config: episode shape (Meta-Dataset variable-way variable-shot by default).
        n_episodes: episodes per source when ``per_source``, else in total.
        seed: base seed; with the index (and source name) it fixes each episode.
        image_size: output side length; ``None`` keeps each source's native size.
        per_source: evaluation layout, ``n_episodes`` of each source in turn (source 0 first);
            otherwise (training) the source of each episode is drawn uniformly.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        split: Split | str,
        config: SamplerConfig | None = None,
        n_episodes: int = 600,
        seed: int = 0,
        image_size: int | None = None,
        per_source: bool = True,
        augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("An EpisodeSet needs at least one source.")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"Sources must have distinct names; got {', '.join(names)}.")
        if n_episodes < 1 or seed < 0:
            raise ValueError(f"n_episodes must be at least 1 and seed non-negative; got {n_episodes} and {seed}.")
        self.sources = list(sources)
        self.split = parse_split(split)
        self.config = config or SamplerConfig()
        self.n_episodes = n_episodes
        self.seed = seed
        self.image_size = image_size
        self.per_source = per_source
        self.augment = augment  # e.g. episodes.train_augment.TrainAugment(); called as augment(images, seed)
        for source in self.sources:  # fail now, with the class named, not at episode 317
            check_split(source.spec, self.split, self.config)
        log.debug("EpisodeSet: %d episodes of %s (%s, seed %d)", len(self), ", ".join(names), self.split.value, seed)

    def __len__(self) -> int:
        return self.n_episodes * len(self.sources) if self.per_source else self.n_episodes

    def _rng_and_source(self, index: int) -> tuple[np.random.Generator, Source]:
        split = _SPLIT_CODE[self.split]
        if self.per_source:
            source = self.sources[index // self.n_episodes]
            local = index % self.n_episodes
            # Keyed by the source's name, so its episodes do not change when sources are added.
            return np.random.default_rng([self.seed, split, _name_code(source.name), local]), source
        rng = np.random.default_rng([self.seed, split, index])
        return rng, self.sources[int(rng.integers(len(self.sources)))]

    def describe(self, index: int) -> EpisodePlan:
        """Plan episode ``index`` (classes, shots, image indices) without reading any image."""
        if not 0 <= index < len(self):
            raise IndexError(f"Episode {index} is out of range for a set of {len(self)} episodes.")
        rng, source = self._rng_and_source(index)
        spec = source.spec
        desc = sample_episode_description(spec, self.split, rng, self.config, check=False)
        order = rng.permutation(desc.way)
        class_ids = tuple(desc.class_ids[k] for k in order)
        shots = [desc.shots[k] for k in order]
        support: list[tuple[int, int]] = []
        query: list[tuple[int, int]] = []
        for class_id, k in zip(class_ids, shots):
            picked = rng.choice(spec.images_per_class[class_id], size=k + desc.n_query, replace=False)
            support += [(class_id, int(i)) for i in picked[:k]]
            query += [(class_id, int(i)) for i in picked[k:]]
        return EpisodePlan(index, source.name, self.split, desc, class_ids, tuple(support), tuple(query))

    def source_of(self, plan: EpisodePlan) -> Source:
        return next(s for s in self.sources if s.name == plan.source)

    def load(self, plan: EpisodePlan) -> Episode:
        """Read the images of a plan and assemble the Episode (uint8 ``[n, 3, H, W]``)."""
        source = self.source_of(plan)
        label = {c: i for i, c in enumerate(plan.class_ids)}
        n_support = len(plan.support)
        wanted: dict[int, tuple[list[int], list[int]]] = {c: ([], []) for c in plan.class_ids}
        for c, i in plan.support:
            wanted[c][0].append(i)
        for c, i in plan.query:
            wanted[c][1].append(i)
        parts_s, parts_q = [], []
        for class_id, (s_idx, q_idx) in wanted.items():  # one read per class, support then query
            images = source.read(class_id, s_idx + q_idx)
            parts_s.append(images[: len(s_idx)])
            parts_q.append(images[len(s_idx) :])
        # numpy's transposing copy is ~3x faster than torch's permute().contiguous() on uint8 here.
        pixels = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts_s + parts_q).transpose(0, 3, 1, 2)))
        if self.image_size is not None:
            pixels = resize_uint8(pixels, self.image_size).contiguous()
        if self.augment is not None:  # seeded by the episode, so identical for any number of workers
            pixels = self.augment(pixels, int(plan.episode_id[:8], 16) ^ self.seed)
        return Episode(
            support_x=pixels[:n_support],
            support_y=torch.tensor([label[c] for c, _ in plan.support], dtype=torch.int64),
            query_x=pixels[n_support:],
            query_y=torch.tensor([label[c] for c, _ in plan.query], dtype=torch.int64),
            source=plan.source,
            split=plan.split,
            episode_id=plan.episode_id,
            class_ids=plan.class_ids,
        )

    def __getitem__(self, index: int) -> Episode:
        return self.load(self.describe(index))


def _single(item: Episode) -> Episode:
    return item


def make_loader(episode_set: EpisodeSet, num_workers: int = 0, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader yielding one Episode per step, in index order, identical for any ``num_workers``."""
    return DataLoader(
        episode_set,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_single,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
    )
