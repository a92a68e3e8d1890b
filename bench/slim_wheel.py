#!/usr/bin/env python3
"""Make a wheel small enough to carry: drop folders, strip ELF binaries, recompress.

    python bench/slim_wheel.py .whl-ray/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl \\
        --drop ray/jars/ ray/dashboard/client/build/ ray/rllib/ --strip

Rewrites the wheel in place (same file name) with the listed path prefixes removed, ELF
files run through ``strip --strip-unneeded`` (``--strip``; their symbols only serve
debuggers), deflate level 9, and a RECORD that lists what is left with fresh hashes, so
``pip install --no-index --find-links DIR ray`` installs it like the original. For the
benchmark machine, whose carried files are limited to 64 MiB (see bench/README.md); the
Ray wheel is 79 MB as published, of which Java jars (cross-language workers), the
dashboard's web UI and RLlib are not used by silverlabel.
"""

from __future__ import annotations

import os
import sys

# bench/select_bench.py would shadow the standard library's select module (imported by subprocess)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != _HERE]

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim(wheel: Path, drop: list[str], strip: bool) -> tuple[int, int]:
    before = wheel.stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if not any(n.startswith(d) for d in drop)]
            record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
            for n in names:
                if n != record_name and not n.endswith("/"):
                    zf.extract(n, tmp)
                    info = zf.getinfo(n)
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        os.chmod(tmp / n, mode)
        if strip:
            for p in tmp.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    with open(p, "rb") as f:
                        if f.read(4) != b"\x7fELF":
                            continue
                    subprocess.run(["strip", "--strip-unneeded", str(p)], check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = wheel.with_suffix(".tmp")
        lines = []
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for n in names:
                if n == record_name or n.endswith("/"):
                    continue
                data = (tmp / n).read_bytes()
                zi = zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0))
                zi.external_attr = ((tmp / n).stat().st_mode & 0o777 | 0o100000) << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(zi, data, compresslevel=9)
                lines.append(f"{n},{_record_hash(data)},{len(data)}")
            lines.append(f"{record_name},,")
            zf.writestr(record_name, "\n".join(lines) + "\n")
        shutil.move(out, wheel)
    return before, wheel.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--drop", nargs="*", default=[], metavar="PREFIX", help="path prefixes inside the wheel to remove")
    ap.add_argument("--strip", action="store_true", help="strip ELF binaries (strip --strip-unneeded)")
    args = ap.parse_args()
    before, after = slim(args.wheel, args.drop, args.strip)
    print(f"{args.wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
