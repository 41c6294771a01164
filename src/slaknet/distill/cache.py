"""On-disk cache of teacher outputs per image, so a CPU user need not re-run a large teacher every epoch.

When it is valid
    Only when the image the student sees at index ``i`` is the same tensor in every epoch: a fixed,
    deterministic transform (decode, resize, center crop, normalize) and no mixup / cutmix, because the
    teacher must see exactly the student's input. Random crops, flips, RandAugment, random erasing,
    mixup / cutmix, or slaknet's demo FlipRot augmentation all make cached outputs wrong (the teacher would
    describe another image), so the API refuses them: every entry point takes ``random_augmentation`` (and
    ``mixup``) from the caller and raises :class:`TeacherCacheError` when either is true. It is also only
    valid for the same teacher weights and inference settings (reparameterized or not, precision, input
    size) and the same dataset (files, order, transform): both are hashed into the cache's identity, and a
    cache built by another teacher or dataset is refused, not silently reused.

Layout
    ``DIR/meta.json`` plus ``DIR/logits-<build>.npy`` (and ``features-<build>.npy``), numpy arrays opened
    as memory maps (``(num_items, num_classes)``, features ``(num_items, *feature_shape)``), float32 or
    float16. ``meta.json`` is the commit point: it is written atomically last, after every item was
    written and the arrays were fsynced, and records identities, shapes and SHA-256 of each array. A build
    that was killed part way leaves arrays but no (new) ``meta.json``, so it is never read as valid; a
    committed array that is later truncated fails the size check (and ``verify=True`` checks the hashes).
    One writer per directory at a time; many readers (e.g. DDP ranks) may share a committed cache.

Size: ImageNet-1k logits in float32 are 1.28 M x 1000 x 4 B = 5.1 GB (2.6 GB float16); SLaK-T last-stage
features (998 x 7 x 7) add about 125 GB in float16, so caching features suits small datasets.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from slaknet.errors import CheckpointError, ConfigError
from slaknet.io import atomic_path

__all__ = ["TeacherCache", "TeacherCacheWriter", "TeacherCacheError", "WithIndex", "teacher_identity",
           "dataset_identity", "check_cache_allowed", "CACHE_FORMAT"]

CACHE_FORMAT = 1
META = "meta.json"
_DTYPES = ("float32", "float16")
Indices = Union[torch.Tensor, np.ndarray, Sequence[int]]


class TeacherCacheError(CheckpointError):
    """A teacher cache that is unreadable, damaged, or was built by another teacher / dataset."""


def check_cache_allowed(*, random_augmentation: bool, mixup: bool = False) -> None:
    """Raise :class:`TeacherCacheError` unless inputs are fixed per index (see the module docstring)."""
    if random_augmentation:
        raise TeacherCacheError("the teacher cache needs a fixed (deterministic) training transform; with "
                                "random augmentation the teacher must run on every batch (drop --teacher-cache)")
    if mixup:
        raise TeacherCacheError("the teacher cache cannot be used with mixup / cutmix: the teacher must see the "
                                "mixed batch (drop --teacher-cache or set --mixup 0 --cutmix 0)")


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_identity(model: torch.nn.Module, **settings: Any) -> str:
    """SHA-256 of the teacher's class, every state-dict tensor (name, dtype, shape, bytes) and ``settings``.

    Pass what changes the outputs besides the weights, e.g. ``reparameterized=True, precision="bf16",
    input_size=224``.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(_hash_json(settings).encode())
    return h.hexdigest()


def dataset_identity(dataset: Optional[Dataset] = None, **settings: Any) -> str:
    """SHA-256 of a dataset's type, length, transform ``repr``, file list (``samples``) and ``settings``.

    A dataset may define ``cache_identity() -> dict`` to describe itself; pass what else fixes its
    content (data path, split, seed, input size ...) as ``settings``.
    """
    desc: Dict[str, Any] = {"settings": settings}
    if dataset is not None:
        desc["type"] = type(dataset).__qualname__
        desc["len"] = len(dataset)  # type: ignore[arg-type]
        desc["transform"] = repr(getattr(dataset, "transform", None))
        if hasattr(dataset, "cache_identity"):
            desc["own"] = dataset.cache_identity()  # type: ignore[attr-defined]
        samples = getattr(dataset, "samples", None)
        if samples is not None:
            desc["samples"] = _hash_json([list(s) if isinstance(s, tuple) else s for s in samples])
    return _hash_json(desc)


class WithIndex(Dataset):
    """Wrap a dataset so items are ``(*item, index)``: the cache needs each image's index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # samples, known_bad, describe() ... of the wrapped dataset
        # never the wrapped dataset's protocol methods (e.g. its batched __getitems__, which DataLoader would
        # call instead of this wrapper's __getitem__)
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)


def _as_index_array(indices: Indices, n: int) -> np.ndarray:
    idx = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ConfigError(f"teacher cache: index out of range [0, {n})")
    return idx


def _as_array(x: Any, dtype: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class TeacherCacheWriter:
    """Fill a cache directory item by item, then :meth:`commit` (nothing is valid before the commit).

    Usage::

        with TeacherCacheWriter(dir, dataset_id=..., teacher_id=..., num_items=len(ds), num_classes=1000,
                                random_augmentation=False) as w:
            for x, y, idx in loader:               # loader over WithIndex(ds), deterministic transform
                w.write(idx, teacher(x))
            cache = w.commit()
    """

    def __init__(self, path: Union[str, os.PathLike], *, dataset_id: str, teacher_id: str, num_items: int,
                 num_classes: int, random_augmentation: bool, mixup: bool = False,
                 feature_shape: Optional[Sequence[int]] = None, dtype: str = "float32") -> None:
        check_cache_allowed(random_augmentation=random_augmentation, mixup=mixup)
        if dtype not in _DTYPES:
            raise ConfigError(f"teacher cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if num_items <= 0 or num_classes <= 0:
            raise ConfigError("teacher cache needs num_items > 0 and num_classes > 0")
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.meta: Dict[str, Any] = {
            "format": CACHE_FORMAT, "dataset_id": dataset_id, "teacher_id": teacher_id, "dtype": dtype,
            "num_items": int(num_items), "num_classes": int(num_classes),
            "feature_shape": [int(s) for s in feature_shape] if feature_shape else None, "files": {}}
        build = uuid.uuid4().hex[:12]
        shapes = {"logits": (int(num_items), int(num_classes))}
        if feature_shape:
            shapes["features"] = (int(num_items), *self.meta["feature_shape"])
        self._arrays: Dict[str, np.memmap] = {}
        for key, shape in shapes.items():
            name = f"{key}-{build}.npy"
            self.meta["files"][key] = {"name": name}
            self._arrays[key] = np.lib.format.open_memmap(os.path.join(self.path, name), mode="w+",
                                                          dtype=dtype, shape=shape)
        self._written = np.zeros(int(num_items), dtype=bool)
        self._done = False

    def write(self, indices: Indices, logits: Any, features: Any = None) -> None:
        """Store the teacher's outputs of the images ``indices`` (a batch)."""
        idx = _as_index_array(indices, self.meta["num_items"])
        arrays = {"logits": logits, "features": features}
        for key, mm in self._arrays.items():
            if arrays[key] is None:
                raise ConfigError(f"teacher cache was created with {key}; write() needs them")
            value = _as_array(arrays[key], self.meta["dtype"])
            if value.shape != (idx.size, *mm.shape[1:]):
                raise ConfigError(f"teacher cache {key}: got shape {value.shape}, expected "
                                  f"{(idx.size, *mm.shape[1:])}")
            mm[idx] = value
        self._written[idx] = True

    @property
    def missing(self) -> int:
        """Number of items not written yet."""
        return int((~self._written).sum())

    def commit(self, verify_hashes: bool = True) -> "TeacherCache":
        """Flush and fsync the arrays, then write ``meta.json`` atomically; returns the opened cache."""
        if self.missing:
            raise TeacherCacheError(f"teacher cache incomplete: {self.missing} of {self.meta['num_items']} "
                                    "items were not written")
        for key, mm in self._arrays.items():
            mm.flush()
            file = os.path.join(self.path, self.meta["files"][key]["name"])
            _fsync(file)
            self.meta["files"][key]["bytes"] = os.path.getsize(file)
            self.meta["files"][key]["sha256"] = _sha256_file(file) if verify_hashes else None
        self._arrays.clear()
        with atomic_path(os.path.join(self.path, META)) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.meta, f, indent=1, sort_keys=True)
        self._done = True
        keep = {v["name"] for v in self.meta["files"].values()} | {META}
        for name in os.listdir(self.path):  # arrays of earlier or abandoned builds
            if name not in keep and name.endswith(".npy") and name.split("-")[0] in ("logits", "features"):
                os.unlink(os.path.join(self.path, name))
        return TeacherCache(self.path, self.meta)

    def abort(self) -> None:
        """Delete this build's arrays (the directory's committed cache, if any, stays valid)."""
        self._arrays.clear()
        for entry in self.meta["files"].values():
            file = os.path.join(self.path, entry["name"])
            if not self._done and os.path.exists(file):
                os.unlink(file)

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None or not self._done:
            self.abort()


class TeacherCache:
    """A committed cache, read through memory maps. Open it with :meth:`open`."""

    def __init__(self, path: str, meta: Dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self._arrays: Dict[str, np.ndarray] = {}
        for key, entry in meta["files"].items():
            file = os.path.join(path, entry["name"])
            if not os.path.isfile(file) or os.path.getsize(file) != entry.get("bytes"):
                raise TeacherCacheError(f"teacher cache {path}: {entry['name']} is missing or truncated; "
                                        "delete the directory to rebuild it")
            try:
                arr = np.load(file, mmap_mode="r")
            except ValueError as exc:
                raise TeacherCacheError(f"teacher cache {path}: {entry['name']} is damaged ({exc})") from None
            want = (meta["num_items"], meta["num_classes"]) if key == "logits" else \
                (meta["num_items"], *meta["feature_shape"])
            if arr.shape != tuple(want) or str(arr.dtype) != meta["dtype"]:
                raise TeacherCacheError(f"teacher cache {path}: {entry['name']} has shape {arr.shape} "
                                        f"{arr.dtype}, meta.json says {tuple(want)} {meta['dtype']}")
            self._arrays[key] = arr

    @classmethod
    def open(cls, path: Union[str, os.PathLike], *, dataset_id: str, teacher_id: str,
             random_augmentation: bool, mixup: bool = False, verify: bool = False) -> Optional["TeacherCache"]:
        """The committed cache at ``path``, or ``None`` when there is none yet (build it then).

        Raises :class:`TeacherCacheError` when augmentation is random / mixup is on, when the cache was
        built by another teacher or for another dataset, or when it is damaged (``verify=True`` also
        re-hashes the arrays).
        """
        check_cache_allowed(random_augmentation=random_augmentation, mixup=mixup)
        path = os.fspath(path)
        meta_file = os.path.join(path, META)
        if not os.path.isfile(meta_file):
            return None
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise TeacherCacheError(f"teacher cache {path}: unreadable meta.json ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(f"teacher cache {path}: unknown format (expected {CACHE_FORMAT})")
        for key, mine, what in (("teacher_id", teacher_id, "teacher"), ("dataset_id", dataset_id, "dataset")):
            if meta.get(key) != mine:
                raise TeacherCacheError(
                    f"teacher cache {path} was built for another {what} ({str(meta.get(key))[:12]}, this run: "
                    f"{mine[:12]}); delete it or choose another --teacher-cache directory")
        cache = cls(path, meta)
        if verify:
            for entry in meta["files"].values():
                if entry.get("sha256") and _sha256_file(os.path.join(path, entry["name"])) != entry["sha256"]:
                    raise TeacherCacheError(f"teacher cache {path}: {entry['name']} does not match its hash")
        return cache

    @property
    def num_items(self) -> int:
        return int(self.meta["num_items"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def has_features(self) -> bool:
        return "features" in self._arrays

    def get(self, indices: Indices, device: Union[str, torch.device, None] = None
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(logits, features or None)`` of the images ``indices``, float32 tensors (copies)."""
        idx = _as_index_array(indices, self.num_items)
        out = [torch.from_numpy(np.asarray(self._arrays[k][idx], dtype=np.float32)) if k in self._arrays
               else None for k in ("logits", "features")]
        if device is not None:
            out = [t.to(device) if t is not None else None for t in out]
        return out[0], out[1]
