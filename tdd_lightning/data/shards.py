"""Webdataset-format tar shards: expand shard specs, check they exist, read samples, write shards.

A shard is a plain tar file; files that share a key (the name up to the first dot of its basename) form
one sample, e.g. ``000017.png`` + ``000017.txt``. Reading is done here rather than with the webdataset
pipeline so that every broken input is reported to one place (the caller's ``on_error``) and counted.
Only the standard library (and ``tdd_lightning.errors``) is imported at module level, so the shapes
generator stays fast to start.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence

from tdd_lightning.errors import UserError

URL_SCHEMES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")

# on_error(reason, url, message): called once per skipped sample (or unreadable shard)
ErrorCallback = Callable[[str, str, str], None]


class ShardNotFoundError(UserError, FileNotFoundError):
    """A local shard that does not exist, or a pattern that matches none: reported in one line."""


def is_url(spec: str) -> bool:
    """True for remote or piped shards (not checked for existence at start-up)."""
    return spec.startswith(URL_SCHEMES)


def _absolute(path: str) -> str:
    # Hydra may change the working folder to the run's output folder: relative paths mean the launch folder
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(path)
    except Exception:  # hydra absent or not initialised
        return os.path.abspath(path)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand (``shard-{000000..000007}.tar``) and glob (``train/*.tar``) a shard spec.

    ``spec`` is one string or a list of strings; local paths become absolute, URLs are left as they are.
    A glob that matches nothing raises ``ShardNotFoundError`` (a ``FileNotFoundError``) naming the pattern.
    """
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    out: list[str] = []
    for item in items:
        for s in braceexpand(os.path.expanduser(item)):
            if is_url(s):
                out.append(s)
                continue
            s = _absolute(s[7:] if s.startswith("file://") else s[5:] if s.startswith("file:") else s)
            if glob.has_magic(s):
                matches = sorted(glob.glob(s))
                if not matches:
                    raise ShardNotFoundError(f"no shard matches the pattern {s}")
                out.extend(matches)
            else:
                out.append(s)
    if not out:
        raise ShardNotFoundError(f"the shard spec {spec!r} expands to no shard")
    return out


def check_shards_exist(shards: Sequence[str]) -> None:
    """Raise ``ShardNotFoundError`` naming the first missing local shard (URLs are not checked)."""
    missing = [s for s in shards if not is_url(s) and not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(shards)})" if len(missing) > 1 else ""
        raise ShardNotFoundError(f"shard not found: {missing[0]}{more}")


def open_shard(url: str):
    """A binary stream over a local path or a URL (http(s) via curl, ``pipe:cmd``: webdataset's gopen)."""
    if not is_url(url):
        return open(url, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def split_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """``dir/000017.latents.safetensors`` -> (``dir/000017``, ``latents.safetensors``)."""
    base = os.path.basename(name)
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


def _plain_headers(f) -> Iterator[tuple[int, str, bool]]:
    """(offset, name, is a regular file) of each member of a plain ustar/gnu tar, reading 512-byte headers
    and seeking over the data; ``ValueError`` on anything else (long names, pax), left to tarfile."""
    while True:
        offset = f.tell()
        block = f.read(512)
        if len(block) < 512 or block == bytes(512):
            return
        kind = block[156:157]
        if kind not in (b"0", b"\0", b"5", b"2", b"1"):
            raise ValueError(f"tar member type {kind!r}")
        name = block[:100].split(b"\0", 1)[0].decode()
        posix = block[257:265] == b"ustar\x0000"  # POSIX ustar has a name prefix; GNU uses those bytes else
        prefix = block[345:500].split(b"\0", 1)[0].decode() if posix else ""
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        yield offset, f"{prefix}/{name}" if prefix else name, kind in (b"0", b"\0")
        f.seek(offset + 512 + -(-size // 512) * 512)


def _sample_start(url: str, skip: int):
    """A local shard opened at the header of its ``skip``-th sample (0-based), found by reading headers
    only (seeking over the data); None when it has fewer samples. Raises on an unreadable shard."""
    f = open(url, "rb")
    try:
        seen, last = -1, None
        for offset, name, regular in _plain_headers(f):
            key, _ = split_key(name)
            if not regular or key is None or os.path.basename(name).startswith("__"):
                continue
            if key != last:
                seen, last = seen + 1, key
                if seen == skip:
                    f.seek(offset)
                    return f
        f.close()
        return None
    except ValueError:
        f.seek(0)  # an unusual tar: let tarfile walk it
    except BaseException:
        f.close()
        raise
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            seen, last = -1, None
            while (info := tar.next()) is not None:
                tar.members = []
                key, _ = split_key(info.name)
                if not info.isreg() or key is None or os.path.basename(info.name).startswith("__"):
                    continue
                if key != last:
                    seen, last = seen + 1, key
                    if seen == skip:
                        f.seek(info.offset)
                        return f
    except BaseException:
        f.close()
        raise
    f.close()
    return None


def iter_tar_samples(url: str, on_error: ErrorCallback, skip: int = 0) -> Iterator[dict]:
    """Yield the samples of one shard as dicts ``{"__key__", "__url__", ext: bytes, ...}``.

    ``skip``: start at that sample; a local plain tar gets there by reading headers only (no data), a
    URL or compressed shard by reading through. An unreadable shard is reported once (reason ``shard``).
    A read error part-way (a truncated or corrupt tar) drops the sample being assembled, reports it
    (reason ``truncated``) and ends the shard: samples already yielded stay valid.
    """
    try:
        stream = None
        if skip and not is_url(url):
            try:
                stream = _sample_start(url, skip)
            except Exception:  # compressed or damaged: read through below, which reports the damage
                stream = None
            else:
                if stream is None:
                    return
                skip = 0
        stream = stream or open_shard(url)
    except Exception as exn:
        on_error("shard", url, f"cannot open shard: {exn!r}")
        return
    current: dict | None = None
    seen, last = 0, None  # samples begun (the skipped ones included), the key of the latest
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_key(info.name)
                if key is None or os.path.basename(info.name).startswith("__"):
                    continue
                tar.members = []  # streaming: do not keep every header in memory
                if key != last:
                    if current is not None:
                        yield current
                        current = None
                    seen, last = seen + 1, key
                    if seen > skip:
                        current = {"__key__": key, "__url__": url}
                if current is not None:
                    current[ext] = tar.extractfile(info).read()
    except Exception as exn:  # tarfile.ReadError, EOFError, OSError from a truncated/corrupt file
        where = f" in sample {current['__key__']}" if current else ""
        on_error("truncated", url, f"shard unreadable from here on{where}: {exn!r}")
        return
    finally:
        stream.close()
    if current is not None:
        yield current


class ShardWriter:
    """Write samples to one tar shard, deterministically (fixed mtime/owner: same input, same bytes)."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = str(path)
        self.count = 0
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: ``files`` maps an extension (``png``, ``txt``, ...) to its bytes."""
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
