"""The on-disk text-embedding cache: every prompt encoded once, read memory-mapped (docs/gpus.md, "The cache step").

A cache is a folder:

    index.json                    what the cache holds: the text encoders' fingerprint, the tensor keys, the shards
    shard-00000.safetensors ...   per conditioning key (e.g. ``prompt_embeds``) a (n, ...) bf16 tensor; the n prompts
                                  in the file's metadata (JSON), in row order
    negative.safetensors          the empty prompt's conditioning (CFG's unconditional half), batch 1

Prompts are deduplicated and split into shards of ``shard_size``; process r of a run encodes the shards i with
i % world == r, so the encoding is spread over the ranks. Every file is written under a temporary name and renamed
into place, and ``index.json`` is written last by the main process after every rank's shards exist: a folder whose
index does not list a shard does not hold it, so a build killed half-way is picked up by the next one (finished
shards whose prompts and fingerprint match are kept) and never read as complete. A cache is extended, never
rewritten: prompts it lacks are encoded into new shards.

Readers open shards with ``safetensors.safe_open`` and slice the rows they need (memory-mapped: a rank holds the
batch it reads, not the cache). The text encoders are needed only while something is missing. The cache is tied to
the conditioning by a fingerprint the teacher adapter computes (``TeacherAdapter.text_fingerprint``: encoder and
tokenizer classes, configs, tokenizer files, encoder weights, and options such as ``max_sequence_length``); keys
ending in ``?`` are compared only where both sides have them, so a cache built with the encoders' weights on disk
is read from a folder without them. This module is model-agnostic: what encodes a prompt is a callable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable

import torch

from .errors import UsageError
from .plumbing import weights_fingerprint, write_atomic

logger = logging.getLogger("dmdx")

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
NEGATIVE_NAME = "negative.safetensors"
DEFAULT_SHARD_SIZE = 256  # SD3 at 333 x 4096 tokens: 2.7 MB a prompt in bf16, ~0.7 GB a shard
STORE_DTYPE = torch.bfloat16
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def folder_fingerprint(path: str, subfolder: str, weights: bool) -> str:
    """A component folder's fingerprint: ``weights`` False hashes its small files (configs, tokenizer files) whole;
    True its weight files as the checkpoints' provenance does (names, sizes, first and last bytes)."""
    if weights:
        return weights_fingerprint(path, subfolder)
    folder = os.path.join(path, subfolder)
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(WEIGHT_SUFFIXES) or name.startswith("."):
                continue
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, folder).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def fingerprint_differences(found: dict, expected: dict) -> list[str]:
    """Keys whose values differ; keys ending in ``?`` only when both sides have them."""
    differ = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if key.endswith("?") and (a is None or b is None):
            continue
        if a != b:
            differ.append(key)
    return differ


def unique(prompts) -> list[str]:
    return list(dict.fromkeys(prompts))


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata)
    os.replace(tmp, path)


class TextEmbeddingCache:
    """The cache folder ``folder`` for conditioning fingerprinted by ``fingerprint`` (a dict of strings). Opening
    checks an existing index against the fingerprint (:class:`UsageError` naming ``what`` when it differs)."""

    def __init__(self, folder: str, fingerprint: dict, what: str = "--text_embeddings_cache"):
        self.folder, self.fingerprint, self.what = folder, dict(fingerprint), what
        self.index: dict | None = None
        self._rows: dict[str, tuple[int, int]] | None = None
        self._handles: OrderedDict = OrderedDict()
        self._read_index()

    # ---- what the cache holds ---------------------------------------------------------------------------------
    def _read_index(self) -> None:
        path = os.path.join(self.folder, INDEX_NAME)
        self.index, self._rows = None, None
        self._handles.clear()
        if not os.path.isfile(path):
            if os.path.exists(self.folder) and not os.path.isdir(self.folder):
                raise UsageError(f"{self.what} {self.folder!r} is a file, not a folder.")
            return
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{self.what} {self.folder!r}: unreadable {INDEX_NAME} ({e}).") from e
        if index.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"{self.what} {self.folder!r} has format version {index.get('format_version')!r}; this "
                             f"version reads {FORMAT_VERSION}: build a new cache in another folder.")
        differ = fingerprint_differences(index.get("fingerprint", {}), self.fingerprint)
        if differ:
            detail = "; ".join(f"{k}: cache {index['fingerprint'].get(k)!r}, this run {self.fingerprint.get(k)!r}"
                               for k in differ[:4])
            raise UsageError(f"{self.what} {self.folder!r} was built for other text encoders or options ({detail}"
                             f"{'; ...' if len(differ) > 4 else ''}): point the flag at a new folder (it is built "
                             "there) or at the cache of this teacher and these options.")
        self.index = index

    @property
    def exists(self) -> bool:
        return self.index is not None

    @property
    def has_negative(self) -> bool:
        return self.index is not None and bool(self.index.get("negative"))

    @property
    def num_prompts(self) -> int:
        return sum(s["num_prompts"] for s in self.index["shards"]) if self.index else 0

    def rows(self) -> dict[str, tuple[int, int]]:
        """prompt -> (shard number, row), from the shards' metadata (headers only)."""
        if self._rows is None:
            from safetensors import safe_open

            self._rows = {}
            for number, shard in enumerate(self.index["shards"] if self.index else []):
                with safe_open(os.path.join(self.folder, shard["file"]), "pt") as f:
                    prompts = json.loads(f.metadata()["prompts"])
                for row, prompt in enumerate(prompts):
                    self._rows.setdefault(prompt, (number, row))
        return self._rows

    def missing(self, prompts) -> list[str]:
        """The distinct prompts of ``prompts`` (first-seen order) the cache does not hold."""
        rows = self.rows() if self.index else {}
        return [p for p in unique(prompts) if p not in rows]

    def covers(self, prompts) -> bool:
        return self.has_negative and not self.missing(prompts)

    # ---- building --------------------------------------------------------------------------------------------------
    def build(self, prompts, encode: Callable[[list[str]], dict], negative: Callable[[], dict], *, rank: int = 0,
              world: int = 1, barrier: Callable[[], None] = lambda: None, shard_size: int = DEFAULT_SHARD_SIZE,
              batch_size: int = 16, info: dict | None = None) -> int:
        """Encode what the cache lacks of ``prompts`` (and the empty prompt, via ``negative``) on every rank, each
        its own shards, and publish them in the index. ``encode(list of prompts) -> {key: (n, ...) tensor}`` and
        ``negative() -> {key: (1, ...) tensor}`` hold only what depends on the text. Every rank calls this with the
        same arguments; returns the number of prompts this rank encoded."""
        from safetensors import safe_open

        todo = self.missing(prompts)
        first = len(self.index["shards"]) if self.index else 0
        chunks = [todo[i: i + shard_size] for i in range(0, len(todo), shard_size)]
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        if rank == 0:
            os.makedirs(self.folder, exist_ok=True)
        barrier()
        encoded, keys = 0, None
        for i, chunk in enumerate(chunks):
            if i % world != rank:
                continue
            path = os.path.join(self.folder, f"shard-{first + i:05d}.safetensors")
            if os.path.isfile(path):  # left by a build that stopped before its index: keep it if it is this one
                with safe_open(path, "pt") as f:
                    meta = f.metadata() or {}
                if json.loads(meta.get("prompts", "null")) == chunk and meta.get("fingerprint") == digest:
                    continue
            parts = [encode(chunk[b: b + batch_size]) for b in range(0, len(chunk), batch_size)]
            tensors = {k: torch.cat([p[k].detach().to("cpu", STORE_DTYPE) for p in parts]) for k in parts[0]}
            _atomic_save(tensors, path, {"prompts": json.dumps(chunk), "fingerprint": digest})
            encoded += len(chunk)
            keys = sorted(tensors)
        if rank == 0 and not self.has_negative:
            tensors = {k: v.detach().to("cpu", STORE_DTYPE) for k, v in negative().items()}
            _atomic_save(tensors, os.path.join(self.folder, NEGATIVE_NAME), {"fingerprint": digest})
            keys = keys or sorted(tensors)
        barrier()
        if rank == 0:
            absent = [f"shard-{first + i:05d}.safetensors" for i in range(len(chunks))
                      if not os.path.isfile(os.path.join(self.folder, f"shard-{first + i:05d}.safetensors"))]
            if absent:  # e.g. several nodes, each with its own local folder
                raise UsageError(f"{self.what} {self.folder!r}: {len(absent)} shards the other processes wrote are "
                                 f"not visible here ({absent[0]}, ...): the folder must be shared by every node.")
            shards = list(self.index["shards"]) if self.index else []
            shards += [{"file": f"shard-{first + i:05d}.safetensors", "num_prompts": len(c)}
                       for i, c in enumerate(chunks)]
            index = {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                     "dtype": str(STORE_DTYPE).removeprefix("torch."),
                     "keys": self.index["keys"] if self.index else keys, "negative": NEGATIVE_NAME,
                     "shards": shards, "info": {**(self.index or {}).get("info", {}), **(info or {})}}
            write_atomic(os.path.join(self.folder, INDEX_NAME), json.dumps(index, indent=1))  # the main process only
            logger.info("text-embedding cache %s: %d prompts encoded (%d shards added), %d in all", self.folder,
                        len(todo), len(chunks), sum(s["num_prompts"] for s in shards))
        barrier()
        self._read_index()
        return encoded

    # ---- reading ---------------------------------------------------------------------------------------------------
    def _open(self, file: str):
        from safetensors import safe_open

        handle = self._handles.pop(file, None)
        if handle is None:
            handle = safe_open(os.path.join(self.folder, file), "pt")
            if len(self._handles) >= 32:  # bounded open files for caches of many shards
                self._handles.popitem(last=False)
        self._handles[file] = handle
        return handle

    def conditioning(self, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
        """The cached conditioning of ``prompts`` (each must be in the cache), fp32, batch-first, on ``device``.
        Only the requested rows are read from the memory-mapped shards."""
        rows, out = self.rows(), {}
        missing = [p for p in prompts if p not in rows]
        if missing:
            raise UsageError(f"{self.what} {self.folder!r} does not hold {len(missing)} of the prompts asked for, "
                             f"e.g. {missing[0][:80]!r}.")
        for key in self.index["keys"]:
            parts = []
            for prompt in prompts:
                number, row = rows[prompt]
                parts.append(self._open(self.index["shards"][number]["file"]).get_slice(key)[row: row + 1])
            out[key] = torch.cat(parts).float().to(device) if device is not None else torch.cat(parts).float()
        return out

    def negative(self, device=None) -> dict[str, torch.Tensor]:
        handle = self._open(self.index["negative"])
        return {k: handle.get_tensor(k).float().to(device) if device is not None else handle.get_tensor(k).float()
                for k in handle.keys()}
