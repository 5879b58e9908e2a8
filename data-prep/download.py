#!/usr/bin/env python3
"""Resumable, verified downloads for the data-prep scripts.

    python data-prep/download.py --url URL --dest DIR [--sha256 HEX]     # prints the local path

Why this exists instead of ``wget``: the corpora are large (up to a few GB) and live on servers that drop
connections, so a download must resume where it stopped; a half-written file must never sit under the final
name (a later run would take it for complete); and a file must be verified before anything is built from it.

* The file goes to ``DIR/NAME.part`` first (``NAME`` = basename of the URL) and is renamed to ``DIR/NAME``
  only once complete and verified. An interrupted download resumes from the ``.part`` file (HTTP ``Range``;
  for ``file://`` and plain paths the copy resumes from the same offset).
* A file already at ``DIR/NAME`` that verifies is not fetched again.
* Verification: the sum passed with ``--sha256`` / ``sha256=``, otherwise the entry for ``NAME`` in the sums
  table: ``data-prep/checksums.sha256`` (only sums that upstream or a reputable public source publishes; see
  data-prep/README.md), or the file named by ``$T2R_DATA_CHECKSUMS``, which replaces it. Table lines are
  ``<hex>  <name>`` as written by ``sha256sum``; a 32-digit hex is an MD5 (some sources publish only MD5).
  Files without a known sum are reported as unverified; the dataset scripts then check them structurally.
* ``$T2R_DATA_MIRROR``: fetch every file from ``$T2R_DATA_MIRROR/NAME`` instead of upstream (a ``file://`` or
  ``http(s)://`` URL, or a plain directory), e.g. a local copy made on a machine with internet access.
* Offline or unreachable: one error naming the URL, the reason and the fix; the ``.part`` file is kept so
  that the next attempt resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIPPED_SUMS = HERE / "checksums.sha256"
CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message says why and what to do."""


def basename_of(url: str) -> str:
    """The file name a URL is stored under (and looked up by in the sums table and the mirror)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name:
        raise DownloadError(f"cannot tell a file name from URL {url!r}: it must end in a file name")
    return name


def load_sums(path: Path | None = None) -> dict[str, str]:
    """name -> hex digest from a ``sha256sum``-style table (``$T2R_DATA_CHECKSUMS`` replaces the shipped one)."""
    if path is None:
        env = os.environ.get("T2R_DATA_CHECKSUMS")
        path = Path(env) if env else SHIPPED_SUMS
    if not path.is_file():
        if os.environ.get("T2R_DATA_CHECKSUMS"):
            raise DownloadError(f"T2R_DATA_CHECKSUMS={path} does not exist: point it at a sums file "
                                "('<sha256>  <name>' lines) or unset it to use the shipped table")
        return {}
    sums: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) not in (32, 64) or any(c not in "0123456789abcdef" for c in digest):
            raise DownloadError(f"{path}:{n}: expected '<sha256 or md5 hex>  <file name>', got {line!r}")
        sums[parts[1].strip().lstrip("*")] = digest
    return sums


def known_sum(name: str) -> str | None:
    """The published digest for a file name, or None when no public sum exists."""
    return load_sums().get(name)


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _algo(digest: str) -> str:
    return "md5" if len(digest) == 32 else "sha256"


def verify(path: Path, digest: str | None) -> bool:
    """True if ``path`` matches ``digest`` (sha256, or md5 for a 32-digit digest); True when no digest is known."""
    return digest is None or file_digest(path, _algo(digest)) == digest.lower()


def source_url(url: str) -> str:
    """Where to fetch ``url`` from: upstream, or ``$T2R_DATA_MIRROR/<basename>``."""
    mirror = os.environ.get("T2R_DATA_MIRROR")
    if not mirror:
        return url
    name = urllib.parse.quote(basename_of(url))
    if "://" not in mirror:  # a plain directory
        return Path(mirror).resolve().joinpath(basename_of(url)).as_uri()
    return mirror.rstrip("/") + "/" + name


def _progress(name: str, done: int, total: int | None, last: list[float]) -> None:
    now = time.monotonic()
    if now - last[0] < 30 and (total is None or done < total or total < 50e6):
        return
    last[0] = now
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    print(f"[download] {name}: {done / 1e6:.1f} MB{pct}", file=sys.stderr, flush=True)


def _copy_stream(src, part: Path, mode: str, name: str, total: int | None, start: int) -> None:
    done, last = start, [time.monotonic()]
    with open(part, mode) as out:
        while block := src.read(CHUNK):
            out.write(block)
            done += len(block)
            _progress(name, done, total, last)


def _fetch_to_part(src: str, part: Path, name: str) -> None:
    """Append the rest of ``src`` to ``part`` (resuming from its size)."""
    have = part.stat().st_size if part.exists() else 0
    scheme = urllib.parse.urlparse(src).scheme
    if scheme == "file":
        local = Path(urllib.request.url2pathname(urllib.parse.urlparse(src).path))
        size = local.stat().st_size  # raises FileNotFoundError -> reported by the caller
        if have > size:  # a stale .part from a different file
            have = 0
        with open(local, "rb") as f:
            f.seek(have)
            _copy_stream(f, part, "ab" if have else "wb", name, size, have)
        return
    req = urllib.request.Request(src, headers={"User-Agent": "t2r-fairseq-data-prep/1"})
    if have and scheme in ("http", "https"):
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is already complete
            return
        raise
    with resp:
        status = getattr(resp, "status", None)
        length = resp.headers.get("Content-Length")
        if have and status == 206:
            total = have + int(length) if length else None
            _copy_stream(resp, part, "ab", name, total, have)
        else:  # the server ignored Range (or nothing to resume): start over
            _copy_stream(resp, part, "wb", name, int(length) if length else None, 0)


def fetch(url: str, dest_dir: Path, sha256: str | None = None) -> Path:
    """Download ``url`` into ``dest_dir`` (resumable, verified) and return the local path.

    ``sha256`` (or an MD5 hex) overrides the table entry; without either the file is accepted unverified
    (a note is printed) and the caller is expected to check it structurally.
    """
    dest_dir = Path(dest_dir)
    name = basename_of(url)
    final, part = dest_dir / name, dest_dir / (name + ".part")
    digest = (sha256 or known_sum(name) or "").lower() or None
    if final.exists():
        if verify(final, digest):
            return final
        raise DownloadError(f"{final} exists but does not match its published {_algo(digest)} {digest}: "
                            f"it is corrupt or a different file; delete it and run again")
    dest_dir.mkdir(parents=True, exist_ok=True)
    src = source_url(url)
    where = src if src == url else f"{src} (mirror of {url})"
    print(f"[download] {name} <- {where}", file=sys.stderr, flush=True)
    try:
        _fetch_to_part(src, part, name)
    except (urllib.error.URLError, OSError, socket.timeout, ValueError) as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else (getattr(e, "reason", None) or e)
        mirror_hint = ("check T2R_DATA_MIRROR, which must hold " + name) if src != url else \
            (f"set T2R_DATA_MIRROR to a directory or URL that holds {name}")
        raise DownloadError(
            f"cannot download {src}: {reason}. This machine may be offline or the file may have moved: "
            f"download it elsewhere and place it at {final}, or {mirror_hint}"
            + (f". Run again to resume ({part} is kept)" if part.exists() and part.stat().st_size else "")) from None
    if not verify(part, digest):
        got = file_digest(part, _algo(digest))
        part.unlink()
        raise DownloadError(f"checksum mismatch for {name} from {src}: expected {_algo(digest)} {digest}, "
                            f"got {got}. The download was corrupt or the file changed upstream; the bad copy "
                            f"was deleted, run again to re-download (or place a good copy at {final})")
    os.replace(part, final)
    if digest is None:
        print(f"[download] {name}: no published checksum, accepted unverified (checked structurally)",
              file=sys.stderr, flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="upstream URL (its basename names the file)")
    ap.add_argument("--dest", required=True, type=Path, help="directory to download into")
    ap.add_argument("--sha256", default=None, help="expected sha256 (or md5) hex; default: the sums table")
    args = ap.parse_args(argv)
    try:
        print(fetch(args.url, args.dest, args.sha256))
    except DownloadError as e:
        print(f"download.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
