"""Recreate ``fastlocal/data/bundled/cifar10-subset.tar.gz`` from the shared JPEG CIFAR-10 archive.

The subset is the first 1000 training images and the first 200 test images of every class (by sorted
file name, the order the image-folder reader uses), 12,000 JPEG files copied byte for byte (no
re-encode), laid out as ``train/<class>/<name>.jpg`` and ``test/<class>/<name>.jpg``.

Output is deterministic: members are written in sorted order with fixed metadata (mtime 0, owner 0/0,
mode 0644), the gzip header carries no file name and mtime 0. The file is gzip-compressed even though
JPEG data does not compress: a 32x32 JPEG is ~900 bytes of which ~600 are headers and Huffman/quantisation
tables identical across files, and an uncompressed tar adds a 512-byte header and pads every member to
512 bytes, so the plain tar would be ~18 MB while the .tar.gz is ~4 MB.

Usage: python scripts/make_bundled_subset.py [--source PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUTPUT = REPO_ROOT / "fastlocal" / "data" / "bundled" / "cifar10-subset.tar.gz"
PER_CLASS = {"train": 1000, "test": 200}


def collect(source: Path) -> dict[tuple[str, str], dict[str, bytes]]:
    """Read every JPEG of the source archive: {(split, class): {file name: bytes}}."""
    files: dict[tuple[str, str], dict[str, bytes]] = {}
    with tarfile.open(source, "r:*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            parts = member.name.strip("/").split("/")
            # <top>/<split>/<class>/<name>.jpg
            if len(parts) != 4 or parts[1] not in PER_CLASS:
                continue
            _, split, class_name, file_name = parts
            data = archive.extractfile(member).read()
            files.setdefault((split, class_name), {})[file_name] = data
    return files


def write_subset(files: dict[tuple[str, str], dict[str, bytes]], output: Path) -> tuple[int, int]:
    """Write the deterministic .tar.gz; returns (train count, test count)."""
    counts = {"train": 0, "test": 0}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for split in ("train", "test"):
            class_names = sorted(c for s, c in files if s == split)
            for class_name in class_names:
                names = sorted(files[(split, class_name)])
                if len(names) < PER_CLASS[split]:
                    raise SystemExit(f"{split}/{class_name} has {len(names)} images, fewer than {PER_CLASS[split]}")
                for file_name in names[: PER_CLASS[split]]:
                    data = files[(split, class_name)][file_name]
                    info = tarfile.TarInfo(f"{split}/{class_name}/{file_name}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    archive.addfile(info, io.BytesIO(data))
                    counts[split] += 1
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(buffer.getvalue())
    os.replace(tmp, output)
    return counts["train"], counts["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the JPEG CIFAR-10 .tar.gz")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"source archive {args.source} not found; pass --source PATH/cifar10-jpeg.tar.gz")
    num_train, num_test = write_subset(collect(args.source), args.output)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {num_train} train + {num_test} test images, {size:,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
