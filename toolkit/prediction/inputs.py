"""What `predict` reads: files, folders and shard directories, listed as one job per image with
the name its output gets, and each job's image read with how to write an output like it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.core.errors import UserError
from toolkit.core.schema import StorageConfig
from toolkit.data.degrade import degrade
from toolkit.data.format import (
    MANIFEST,
    in_unit_range,
    open_shard,
    read_manifest,
    split_member,
    tar_members,
)
from toolkit.data.sources import EXTS, walk_files
from toolkit.data.storage import RangeReader, Remote, is_url, locate
from toolkit.prediction.files import Like, output_ext, read


@dataclass(frozen=True)
class Job:
    """One image to super-resolve: where its bytes are, and the output's path under --out."""

    name: str  # the output's posix path relative to the output folder
    path: Path | Remote  # the file, or the shard holding the sample (a local one, or at a URL)
    size: int  # bytes to read (the split across processes balances them)
    ext: str  # of the stored image, with its dot
    span: tuple[int, int] | None = None  # a shard member's (offset, size) in its tar
    degrade: bool = False  # an HR-only shard sample: its input is made as training made it
    clamp: bool = False  # ... clamped to [0, 1] where its shards' values lie there
    hdu: str | None = None  # the FITS HDU to read

    @property
    def where(self) -> str:
        """The input, for a message: the file, or the shard and the sample's output name."""
        return str(self.path) if self.span is None else f"{self.path} sample {self.name}"


def _file_job(name: str, path: Path, hdu: str | None) -> Job:
    stem, ext = os.path.splitext(name)
    return Job(stem + output_ext(ext), path, path.stat().st_size, ext, hdu=hdu)


def _shard_jobs(root: Path | Remote, split: str | None) -> list[Job]:
    manifest = read_manifest(root)
    splits = [split] if split else list(manifest.splits)
    if split is not None and split not in manifest.splits:
        raise UserError(f"{root / MANIFEST}: no split {split!r} (it has {', '.join(splits)})")
    clamp = in_unit_range(manifest.value_range)
    jobs = []
    for name in splits:
        for shard in manifest.splits[name]:
            members: dict[str, dict[str, tuple[int, int, str]]] = {}
            with open_shard(shard) as stream:
                for entry in tar_members(stream):  # type: ignore[arg-type]
                    split = split_member(entry.name)
                    if split is None:
                        continue
                    side, _, ext = split[1].partition(".")
                    members.setdefault(split[0], {})[side] = (stream.tell(), entry.size, ext)
            for key, sides in members.items():
                side = "lr" if "lr" in sides else "hr"
                offset, size, ext = sides[side]
                name = f"{key}{output_ext('.' + ext)}"
                jobs.append(Job(name, shard.path, size, f".{ext}", (offset, size),
                                side == "hr", clamp, manifest.fits_hdu))  # fmt: skip
    return jobs


def list_jobs(
    inputs: list[str],
    hdu: str | None = None,
    split: str | None = None,
    out: Path | None = None,
    storage: StorageConfig | None = None,
) -> list[Job]:
    """One job per image of `inputs` (image files, folders of them, searched recursively, or
    shard directories), sorted by output name; two inputs with one output name are an error.
    Files under `out` are left out: outputs written inside an input folder are not inputs."""
    jobs: list[Job] = []
    outside = (lambda f: not f.resolve().is_relative_to(out.resolve())) if out else (lambda f: True)
    for text in inputs:
        if is_url(text):  # only shards are read from a store
            jobs += _shard_jobs(locate(text, storage), split)
            continue
        path = Path(text)
        if (path / MANIFEST).is_file():
            jobs += _shard_jobs(path, split)
        elif path.is_dir():
            files = list(walk_files(path))
            found = [_file_job(rel, f, hdu) for rel, f in files if outside(f)]
            if not found:
                raise UserError(
                    f"{path}: every file in it lies under --out {out}: give another --out"
                    if files
                    else f"{path}: no usable files ({', '.join(EXTS)}) found"
                )
            jobs += found
        elif path.is_file():
            if path.suffix.lower() not in EXTS:
                raise UserError(f"{path}: unknown extension: expected one of {', '.join(EXTS)}")
            jobs.append(_file_job(path.name, path, hdu))
        else:
            raise UserError(f"{path}: no such file, folder or shard directory")
    by_name: dict[str, Job] = {}
    for job in jobs:
        if (
            out is not None
            and isinstance(job.path, Path)
            and (out / job.name).resolve() == job.path.resolve()
        ):
            raise UserError(f"{job.path}: its output would be written over it: give another --out")
        if job.name in by_name:
            raise UserError(
                f"{by_name[job.name].path} and {job.path} would both be written to {job.name}: "
                "give them in separate runs or rename one"
            )
        by_name[job.name] = job
    return [by_name[n] for n in sorted(by_name)]


def read_job(job: Job, scale: int) -> tuple[torch.Tensor, Like]:
    """The model's input for a job, [C, h, w] float32 in the data's units, and how to write its
    output; ValueError with the reason if it cannot be read."""
    try:
        if isinstance(job.path, Remote):
            assert job.span is not None
            with RangeReader([(job.path, job.span[0], sum(job.span))]) as stream:
                data = stream.read(job.span[1])
        else:
            with open(job.path, "rb") as f:
                if job.span is not None:
                    f.seek(job.span[0])
                data = f.read(job.span[1] if job.span is not None else -1)
    except OSError as err:
        raise ValueError(f"cannot read: {err.strerror or err}") from err
    values, like = read(data, job.ext, job.hdu)
    x = torch.from_numpy(np.ascontiguousarray(values))
    if job.degrade:  # the LR image of an HR-only sample, as the loader makes it
        h, w = x.shape[-2:]
        x = degrade(x[:, : h // scale * scale, : w // scale * scale], scale, clamp=job.clamp)
    return x, like
