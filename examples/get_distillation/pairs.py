"""Offline noise/image pairs: seeded, sharded, resumable generation and a streaming reader.

Layout of a pair folder::

    manifest.json                     written last, by rank 0, atomically
    shard_00000.noise.npy             (S, C, H, W) float32: unit-variance noise e (x_0 = sigma_max e)
    shard_00000.target.npy            (S, C, H, W) float32: the teacher's unclipped Heun output
    shard_00000.labels.npy            (S,) int64: class labels (-1 when unconditional)
    shard_00000.json                  the shard's record (seed range, sha256 of each file);
                                      written after its three arrays, so it marks completion

Pair i uses seed ``seed_offset + i`` alone (its own torch.Generator draws e, then the label).
What that guarantees:

- the noise e and the label of pair i are bitwise the same whoever makes them;
- the target is bitwise the same whenever pair i is computed in a batch of the same pairs
  (the same ``batch`` and ``shard_size``, any number of ranks: ranks take whole shards), so a
  resumed, a grown or a torchrun-made folder equals a fresh single-process one byte for byte;
- with another batch size the target agrees to float rounding only (about 4e-7 here; CPU and
  GPU kernels may block a batch differently): tests allow 1e-5.

Every file is written to a temporary name and renamed. A rerun verifies finished shards
(checksums and seed range) and skips them, and redoes a shard without a valid record or
with other pairs than this run needs (the short last shard of a smaller run that is being
grown), so a kill loses and duplicates nothing and growing a folder gives what a fresh run
with the larger ``--num-pairs`` gives. An operating-system lock on ``.lock``
(``locks.folder_lock``) keeps two runs from writing one folder at once.

The manifest records the teacher's identity (``teacher.id``: a hash of its weights and of
the sampler settings) and the seed range, so that training and evaluation can tell pairs of
different teachers apart and keep held-out seeds disjoint from training seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import checkpoints, cli, fileio, locks, runtime, sampling
from . import config as cfg
from .config import MAX_BATCH, MAX_STEPS, option

MAX_SEED_OFFSET = 2**48  # pair i's seed, offset + i, stays far inside torch's 64-bit seeds

FORMAT = "deqkit-get-pairs/1"
ARRAYS = ("noise", "target", "labels")


def pair_inputs(seeds: range | list[int], shape: tuple[int, ...], num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise e (B, *shape) float32 and labels (B,) int64 of the given seeds, one generator each."""
    noise = torch.empty((len(seeds), *shape), dtype=torch.float32)
    labels = torch.full((len(seeds),), -1, dtype=torch.int64)
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        noise[k] = torch.randn(shape, generator=g)
        if num_classes:
            labels[k] = torch.randint(num_classes, (), generator=g)
    return noise, labels


@torch.no_grad()
def teacher_outputs(denoiser: Callable, noise: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The teacher's Heun ODE solution from x_0 = sigma_0 e, unclipped, float32, on the CPU."""
    x0 = noise.to(device) * sigmas[0].to(torch.float32)  # (B, C, H, W)
    y = labels.to(device) if labels is not None else None
    return sampling.sample_heun(denoiser, x0, sigmas, labels=y).float().cpu()


def _shard_name(index: int, kind: str) -> str:
    return f"shard_{index:05d}.{kind}.npy" if kind in ARRAYS else f"shard_{index:05d}.json"


def _file_name(record: dict, kind: str) -> str:
    """A shard file's name from its record, confined to the folder (no paths, no dot files)."""
    name = record["files"][kind]["name"]
    if name != _shard_name(int(record["index"]), kind):
        raise ValueError(f"shard {record['index']} names its {kind} file {name!r}; expected "
                         f"{_shard_name(int(record['index']), kind)!r} (a record must not point outside its folder)")
    return name


def _verify_record(out_dir: Path, record: dict) -> str | None:
    """None if the shard's files exist and match their checksums, else a reason."""
    for kind in ARRAYS:
        entry = record["files"][kind]
        path = out_dir / _file_name(record, kind)
        if not path.is_file():
            return f"{path.name} is missing"
        if fileio.sha256_file(path) != entry["sha256"]:
            return f"{path.name} does not match its sha256 checksum (corrupted or modified)"
    return None


def _load_record(out_dir: Path, index: int, settings: dict, seeds: list[int]) -> dict | None:
    """A finished shard's record if valid for these settings and holding exactly the pairs of
    ``seeds`` [first, stop); None if it must be (re)made."""
    path = out_dir / _shard_name(index, "json")
    if not path.is_file():
        return None
    try:
        record = fileio.read_json(path, "shard record")
    except ValueError as exc:
        print(f"redoing shard {index}: {exc}", file=sys.stderr)
        return None
    if record.get("settings") != settings:
        raise ValueError(f"{path} was made with different settings than this run "
                         f"({record.get('settings')} vs {settings}); use another output folder")
    if record.get("seeds") != seeds:
        print(f"redoing shard {index}: it holds the pairs of seeds {record.get('seeds')}, this run needs {seeds}",
              file=sys.stderr)
        return None
    reason = _verify_record(out_dir, record)
    if reason is not None:
        print(f"redoing shard {index}: {reason}", file=sys.stderr)
        return None
    return record


def teacher_identity(weights_sha256: str, sampler: dict) -> str:
    """The identity of a teacher as a pair source: its weights and how it was sampled."""
    return fileio.json_sha256({"weights_sha256": weights_sha256, "sampler": sampler})


def generate_pairs(denoiser: Callable, out_dir: str | os.PathLike, num_pairs: int, shard_size: int, batch_size: int,
                   *, image_shape: tuple[int, ...], seed_offset: int = 0, num_classes: int | None = None,
                   num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   teacher_hash: str = "", device: torch.device | str = "cpu",
                   rank: int = 0, world_size: int = 1, progress: bool = True,
                   on_batch: Callable[[int, int], None] | None = None) -> dict | None:
    """Generate ``num_pairs`` pairs into ``out_dir``; returns the manifest (on rank 0, else None).

    Shard s holds pairs [s * shard_size, min((s + 1) * shard_size, num_pairs)); rank r makes
    the shards with s % world_size == r, in batches of ``batch_size``. After a barrier, rank 0
    checks every shard and writes ``manifest.json``. ``on_batch(shard, batch)`` is called after
    each batch (a progress hook; tests use it to simulate a kill). ``teacher_hash`` is the
    sha256 of the teacher's file; the manifest also records that of its weights
    (:func:`checkpoints.state_sha256`, when ``denoiser`` is a module) and ``teacher.id``, which
    hashes the weights with the sampler settings. Raises ``locks.FolderLocked`` if another run is
    writing ``out_dir``.
    """
    for name, value in (("num_pairs", num_pairs), ("shard_size", shard_size), ("batch_size", batch_size),
                        ("num_steps", num_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    image_shape = tuple(int(s) for s in image_shape)
    out_dir = Path(out_dir)
    sigmas = sampling.karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    teacher_weights = checkpoints.state_sha256(denoiser) if isinstance(denoiser, torch.nn.Module) else teacher_hash
    with locks.folder_lock(out_dir, rank, world_size):
        return _generate(denoiser, out_dir, num_pairs, shard_size, batch_size, image_shape, seed_offset, num_classes,
                         num_steps, sigma_min, sigma_max, rho, sigmas, teacher_hash, teacher_weights,
                         device, rank, world_size, progress, on_batch)


def _generate(denoiser, out_dir, num_pairs, shard_size, batch_size, image_shape, seed_offset, num_classes, num_steps,
              sigma_min, sigma_max, rho, sigmas, teacher_hash, teacher_weights, device, rank, world_size, progress,
              on_batch) -> dict | None:
    settings = {
        "teacher_sha256": teacher_hash, "seed_offset": seed_offset, "shard_size": shard_size,
        "image_shape": list(image_shape), "num_classes": num_classes,
        "sampler": {"name": "heun", "num_steps": num_steps, "nfe": sampling.heun_nfe(num_steps),
                    "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "churn": 0, "clipped": False},
    }
    num_shards = -(-num_pairs // shard_size)

    def seeds_of(s: int) -> list[int]:
        return [seed_offset + s * shard_size, seed_offset + min((s + 1) * shard_size, num_pairs)]

    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo = [s for s in mine if _load_record(out_dir, s, settings, seeds_of(s)) is None]
    todo_pairs = sum(min(shard_size, num_pairs - s * shard_size) for s in todo)
    from tqdm.auto import tqdm

    bar = tqdm(total=todo_pairs, unit="pair", desc=f"pairs[rank {rank}]", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for s in todo:
        start, stop = s * shard_size, min((s + 1) * shard_size, num_pairs)
        noise_parts, target_parts, label_parts = [], [], []
        for b, b_start in enumerate(range(start, stop, batch_size)):
            seeds = range(seed_offset + b_start, seed_offset + min(b_start + batch_size, stop))
            noise, labels = pair_inputs(seeds, image_shape, num_classes)  # (B, C, H, W), (B,)
            target = teacher_outputs(denoiser, noise, labels if num_classes else None, sigmas, device)
            noise_parts.append(noise)
            target_parts.append(target)
            label_parts.append(labels)
            bar.update(len(seeds))
            bar.set_postfix(pairs_per_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.1f}")
            if on_batch is not None:
                on_batch(s, b)
        arrays = {"noise": torch.cat(noise_parts).numpy(), "target": torch.cat(target_parts).numpy(),
                  "labels": torch.cat(label_parts).numpy()}
        files = {}
        for kind in ARRAYS:
            name = _shard_name(s, kind)
            files[kind] = {"name": name, "sha256": fileio.atomic_save_npy(out_dir / name, arrays[kind]),
                           "shape": list(arrays[kind].shape), "dtype": str(arrays[kind].dtype)}
        record = {"index": s, "seeds": [seed_offset + start, seed_offset + stop], "count": stop - start,
                  "files": files, "settings": settings}
        fileio.atomic_write_json(out_dir / _shard_name(s, "json"), record)
    bar.close()
    elapsed = time.perf_counter() - t0
    if progress and todo_pairs:
        print(f"rank {rank}: {todo_pairs} pairs in {elapsed:.1f} s = {todo_pairs / elapsed:.1f} pairs/s "
              f"({sampling.heun_nfe(num_steps)} NFE each)", file=sys.stderr)
    runtime.barrier(world_size)
    if rank != 0:
        return None
    return _write_manifest(out_dir, num_pairs, num_shards, settings, teacher_weights, seeds_of)


def _write_manifest(out_dir: Path, num_pairs: int, num_shards: int, settings: dict, teacher_weights: str,
                    seeds_of: Callable[[int], list[int]]) -> dict:
    shards = []
    for s in range(num_shards):
        path = out_dir / _shard_name(s, "json")
        if not path.is_file():
            raise RuntimeError(f"shard {s} is missing ({path}); did another rank fail? rerun to finish it")
        record = fileio.read_json(path, "shard record")
        if record.get("seeds") != seeds_of(s) or record.get("settings") != settings:
            raise RuntimeError(f"shard {s} ({path}) does not hold the pairs this run needs; rerun to redo it")
        shards.append({k: record[k] for k in ("index", "seeds", "count", "files")})
    image_shape = settings["image_shape"]
    manifest = {
        "format": FORMAT,
        "teacher": {"sha256": settings["teacher_sha256"], "weights_sha256": teacher_weights,
                    "id": teacher_identity(teacher_weights, settings["sampler"])},
        "sampler": settings["sampler"],
        "num_pairs": num_pairs, "shard_size": settings["shard_size"], "num_shards": num_shards,
        "num_classes": settings["num_classes"],
        "seeds": [settings["seed_offset"], settings["seed_offset"] + num_pairs],
        "arrays": {"noise": {"shape": image_shape, "dtype": "float32"},
                   "target": {"shape": image_shape, "dtype": "float32"},
                   "labels": {"shape": [], "dtype": "int64"}},
        "shards": shards,
    }
    fileio.atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------- reader


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over a pair folder: item i -> (noise e, target x, label), float32/int64.

    Shards are memory-mapped (``np.load(mmap_mode="r")``), so nothing is loaded into RAM up
    front; each process (or DataLoader worker) opens its own maps lazily. Works with
    ``DistributedSampler`` (each rank sees a disjoint slice of one permutation per epoch).

    ``verify="open"`` checks every shard's sha256 now; ``"none"`` skips it (call
    :meth:`verify` later). ``expect_teacher`` (a sha256 hex string) and ``expect_shape``
    ((C, H, W)) reject a folder made by another teacher or for other images.
    """

    def __init__(self, root: str | os.PathLike, *, expect_teacher: str | None = None,
                 expect_shape: tuple[int, ...] | None = None, verify: str = "open"):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"no pair manifest at {str(path)!r} (generate pairs first, or the run is unfinished)")
        self.manifest = fileio.read_json(path, "pair manifest")
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            raise ValueError(f"{path}: unknown format {found!r}, expected {FORMAT!r}")
        if verify not in ("open", "none"):
            raise ValueError(f"verify must be 'open' or 'none', got {verify!r}")
        teacher = self.manifest["teacher"]["sha256"]
        if expect_teacher is not None and teacher != expect_teacher:
            raise ValueError(f"{path}: pairs come from teacher {teacher[:16]}..., expected {expect_teacher[:16]}...")
        self.image_shape = tuple(self.manifest["arrays"]["noise"]["shape"])
        if expect_shape is not None and tuple(expect_shape) != self.image_shape:
            raise ValueError(f"{path}: pairs have image shape {self.image_shape}, expected {tuple(expect_shape)}")
        self.shard_size = int(self.manifest["shard_size"])
        self.num_classes = self.manifest["num_classes"]
        self._shards = self.manifest["shards"]
        self._check_layout(path)
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        if verify == "open":
            self.verify()

    @property
    def teacher(self) -> dict:
        """The teacher's record: ``sha256`` (file), ``weights_sha256`` and ``id`` (weights and
        sampler; folders written before identities were recorded have neither)."""
        return self.manifest["teacher"]

    @property
    def seeds(self) -> tuple[int, int]:
        """The seed range [first, stop) of the pairs in this folder."""
        first, stop = self.manifest["seeds"]
        return int(first), int(stop)

    @property
    def teacher_id(self) -> str:
        """The teacher's identity (weights and sampler); for an older folder, its file hash
        and sampler."""
        teacher = self.teacher
        return teacher.get("id") or teacher_identity(teacher["sha256"], self.manifest["sampler"])

    def provenance(self, num_items: int | None = None) -> dict:
        """What a student trained on the first ``num_items`` pairs (default: all) depends on:
        the teacher's identity, the sampler, the seed range, the image shape and classes, and
        a hash of the shard checksums that hold those pairs."""
        n = len(self) if num_items is None else int(num_items)
        first = self.seeds[0]
        used = self._shards[: -(-n // self.shard_size)]
        return {
            "teacher_id": self.teacher_id, "teacher_sha256": self.teacher["sha256"],
            "sampler": self.manifest["sampler"], "seeds": [first, first + n],
            "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            "data_sha256": fileio.json_sha256([[s["files"][k]["sha256"] for k in ARRAYS] for s in used] + [n]),
        }

    def _check_layout(self, path: Path) -> None:
        """Shard s must hold pairs [s * shard_size, ...) and the counts must add up: a folder
        grown by an older version could keep a short shard in the middle (a gap)."""
        n, size = int(self.manifest["num_pairs"]), self.shard_size
        first = int(self.manifest["seeds"][0])
        if len(self._shards) != -(-n // size):
            raise ValueError(f"{path}: {len(self._shards)} shards cannot hold {n} pairs of shard size {size}")
        for s, shard in enumerate(self._shards):
            want = [first + s * size, first + min((s + 1) * size, n)]
            if int(shard["index"]) != s or shard["seeds"] != want or int(shard["count"]) != want[1] - want[0]:
                raise ValueError(f"{path}: shard {s} holds the seeds {shard['seeds']} ({shard['count']} pairs), "
                                 f"expected {want}: the folder has a gap (grown by an older version?); rerun "
                                 "`pairs` with the same settings to repair it")
            for kind in ARRAYS:
                _file_name(shard, kind)

    def verify(self) -> None:
        """Check every shard file against its sha256; raises ValueError naming a bad file."""
        for shard in self._shards:
            reason = _verify_record(self.root, shard)
            if reason is not None:
                raise ValueError(f"pair shard {shard['index']} in {self.root}: {reason}")

    def __len__(self) -> int:
        return int(self.manifest["num_pairs"])

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._maps:
            self._maps[s] = {k: np.load(self.root / _file_name(self._shards[s], k), mmap_mode="r", allow_pickle=False)
                             for k in ARRAYS}
        return self._maps[s]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair index {i} out of range for {n} pairs")
        i %= n
        arrays = self._shard(i // self.shard_size)
        k = i % self.shard_size
        return (torch.from_numpy(np.array(arrays["noise"][k])), torch.from_numpy(np.array(arrays["target"][k])),
                torch.tensor(int(arrays["labels"][k])))

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


# ----------------------------------------------------------------------------- command line


@cfg.settings
class PairsConfig:
    """A pair generation run; each field is one command-line option (``cli.add_config_arguments``)."""

    teacher: str = option(help="teacher checkpoint (.pt from the teacher command, or an EDM .pkl with --trust-pickle)")
    out: str = option("runs/pairs", help="pair folder (reruns resume; a larger --num-pairs grows it)")
    num: int = option(10000, help="number of pairs (under torchrun write --num-pairs: torchrun mistakes --num "
                      "for its --numa-binding)", flag="--num-pairs", aliases=("--num",), ge=1, le=MAX_STEPS)
    shard_size: int = option(1000, help="pairs per shard file (ranks take whole shards)", ge=1, le=MAX_BATCH)
    batch: int = option(250, help="pairs per teacher batch (the target is bitwise reproducible for one batch size)",
                        ge=1, le=MAX_BATCH)
    seed_offset: int = option(0, help="pair i uses seed offset + i (held-out pairs need a range of their own)",
                              ge=0, le=MAX_SEED_OFFSET)
    steps: int = option(18, help="Heun steps (NFE = 2 steps - 1)", ge=1, le=1000)
    sigma_min: float = option(0.002, help="smallest noise level of the Karras schedule", gt=0, le=sampling.SIGMA_LIMIT)
    sigma_max: float = option(80.0, help="largest noise level of the Karras schedule", gt=0, le=sampling.SIGMA_LIMIT)
    rho: float = option(7.0, help="Karras schedule exponent", gt=0, le=100)
    device: Optional[str] = option(None, help="torch device", default_text="cuda:LOCAL_RANK if available, else cpu")
    trust_pickle: bool = option(False, help="allow a pickled teacher (EDM .pkl): loading a pickle EXECUTES code "
                                "stored in the file; use only for files from a source you trust")

    def __post_init__(self) -> None:
        sampling.check_schedule(self.sigma_min, self.sigma_max, self.rho)


def load_any_teacher(path: str, device: torch.device, *, trust_pickle: bool = False
                     ) -> tuple[Callable, tuple[int, ...], int | None, str]:
    """A teacher from a checkpoint of ``teacher`` (.pt) or an EDM pickle -> (D, shape, classes,
    sha256 of its weights).

    The file's first bytes say what it is: a zip archive (``torch.save``; verified and loaded
    with ``weights_only=True``: a truncated or corrupt one is refused as such), or a pickle
    stream, which runs code from the file when it loads: refused unless ``trust_pickle`` is set.
    """
    from . import adapters
    from . import teacher as teacher_module

    kind = checkpoints.file_kind(path) if Path(path).is_file() else "zip"
    if kind == "other" and not path.endswith(".pkl"):
        raise ValueError(f"--teacher {path!r} is neither a torch checkpoint (a zip archive) nor a pickle")
    if kind == "pickle" or path.endswith(".pkl"):
        if not trust_pickle:
            raise ValueError(f"--teacher {path!r} is a Python pickle (an EDM network?): loading it runs code "
                             "stored in the file. Pass --trust-pickle if you trust where it came from")
        net = adapters.load_edm_pickle(path, trust=True).to(device)
        res = int(getattr(net.net, "img_resolution", 32))
        return net, (int(getattr(net.net, "img_channels", 3)), res, res), net.num_classes, checkpoints.state_sha256(net)
    denoiser, info = teacher_module.load_teacher(path, device)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    return denoiser, shape, info["num_classes"], checkpoints.state_sha256(denoiser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_config_arguments(parser, PairsConfig)


def preflight(config: PairsConfig) -> None:
    """What a run checks before its work: the device, and that the teacher is a file that
    loads (a checkpoint that verifies; a pickle only with --trust-pickle)."""
    runtime.check_device(config.device)
    if not Path(config.teacher).is_file():
        raise ValueError(f"--teacher: no file at {config.teacher!r}")
    kind = checkpoints.file_kind(config.teacher)
    if kind == "zip":
        checkpoints.verify(config.teacher)
    elif (kind == "pickle" or config.teacher.endswith(".pkl")) and not config.trust_pickle:
        load_any_teacher(config.teacher, torch.device("cpu"))  # raises, naming --trust-pickle
    elif kind == "other" and not config.teacher.endswith(".pkl"):
        load_any_teacher(config.teacher, torch.device("cpu"))  # raises: neither kind


def main(args: argparse.Namespace) -> int:
    return cli.run(PairsConfig, args, run, check=preflight)


def run(config: PairsConfig) -> int:
    """Generate the pairs of ``config`` (under torchrun: this rank's shards)."""
    if not Path(config.teacher).is_file():
        raise ValueError(f"--teacher: no file at {config.teacher!r}")
    runtime.check_device(config.device)
    dist = runtime.init_distributed(config.device)
    try:
        denoiser, shape, num_classes, _ = load_any_teacher(config.teacher, dist.device, trust_pickle=config.trust_pickle)
        with locks.folder_lock(config.out, dist.rank, dist.world_size):
            if dist.is_main:
                cfg.save(Path(config.out) / "pairs_config.json", config)
            manifest = generate_pairs(
                denoiser, config.out, config.num, config.shard_size, config.batch, image_shape=shape,
                seed_offset=config.seed_offset, num_classes=num_classes, num_steps=config.steps,
                sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho,
                teacher_hash=fileio.sha256_file(config.teacher), device=dist.device,
                rank=dist.rank, world_size=dist.world_size)
        if manifest is not None:
            print(f"wrote {manifest['num_pairs']} pairs in {manifest['num_shards']} shards to {config.out}", file=sys.stderr)
    finally:
        runtime.cleanup_distributed(dist)
    return 0
