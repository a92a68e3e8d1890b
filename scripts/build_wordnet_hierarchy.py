#!/usr/bin/env python
"""Build ``src/silverlabel/teachers/data/wordnet_hierarchy.json.gz`` (developer-time tool).

Reads the WordNet 3.0 noun database (Debian's ``wordnet-base``: /usr/share/wordnet/data.noun)
and timm's ImageNet synset lists, and writes the part of the WordNet noun hierarchy that
silverlabel's label spaces need: every synset of in21k (the 21,841 fall11 synsets), in12k
and in1k, plus all of their ancestors (closure over hypernyms ``@`` and instance
hypernyms ``@i``). The ImageNet wnid of a noun synset is ``"n" + <8-digit offset>``.

Output: gzip-compressed compact JSON (never pickle), columnar::

    {
      "format": "silverlabel-wordnet-hierarchy-v1",
      "source": {...},                # WordNet 3.0 via Debian wordnet-base <version>, sha256s
      "root": "n00001740",            # entity.n.01
      "depth": "shortest ...",        # what the depth column means (see below)
      "member_bits": {"in1k": 1, "in12k": 2, "in21k": 4},
      "not_in_wordnet": [...],        # wnids of the label spaces absent from WordNet 3.0
      "columns": {
        "wnid":    ["n00001740", ...],       # sorted; a row's position is its row id
        "lemmas":  [["entity"], ...],        # WordNet words, "_" -> " ", WordNet's order
        "parents": [[], [17, 42], ...],      # row ids of direct hypernyms + instance hypernyms
        "depth":   [0, ...],                 # shortest hypernym path length to the root
        "member":  [0, 4, ...],              # bit set of member_bits
        "gloss":   ["that which is ...", ...]  # definition only (example sentences dropped)
      }
    }

Depth is the length of the SHORTEST hypernym/instance-hypernym path from the synset to
``n00001740`` (entity, depth 0) - the conventional choice for roll-up: a synset with two
parents gets the depth of its shallowest route, and ``Hierarchy.ancestor_at_depth`` follows
that route. A synset of a label space that WordNet 3.0 lacks (none, as of timm 1.0 and
WordNet 3.0) is kept with its lemmas from timm's ``imagenet_synset_to_lemma.txt``, no
parents, depth -1, and listed in ``not_in_wordnet``.

The file is reproducible: same inputs, byte-identical output (gzip mtime 0, sorted rows).

Usage::

    python scripts/build_wordnet_hierarchy.py            # defaults below
    python scripts/build_wordnet_hierarchy.py --data-noun /usr/share/wordnet/data.noun \
        --timm-info .venv/lib/python3.11/site-packages/timm/data/_info -o out.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = "n00001740"  # entity.n.01
FORMAT = "silverlabel-wordnet-hierarchy-v1"
SPACES = {"in1k": "imagenet_synsets.txt", "in12k": "imagenet12k_synsets.txt", "in21k": "imagenet22k_synsets.txt"}
MEMBER_BITS = {"in1k": 1, "in12k": 2, "in21k": 4}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/silverlabel/teachers/data/wordnet_hierarchy.json.gz"


def parse_data_noun(path: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """wnid -> (lemmas, parent wnids (hypernyms + instance hypernyms, file order), gloss)."""
    out: dict[str, tuple[list[str], list[str], str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  "):  # license header
                continue
            data, _, gloss = line.partition(" | ")
            tok = data.split()
            try:
                offset, ss_type = tok[0], tok[2]
                w_cnt = int(tok[3], 16)
                words = [tok[4 + 2 * i] for i in range(w_cnt)]
                i = 4 + 2 * w_cnt
                p_cnt = int(tok[i])
                i += 1
                parents = []
                for _ in range(p_cnt):
                    sym, target, pos = tok[i], tok[i + 1], tok[i + 2]
                    i += 4
                    if sym in ("@", "@i") and pos == "n":
                        parents.append("n" + target)
            except (IndexError, ValueError) as e:
                raise SystemExit(f"{path}:{lineno}: cannot parse ({e})") from None
            if ss_type != "n" or len(offset) != 8:
                raise SystemExit(f"{path}:{lineno}: not a noun synset line")
            lemmas = [w.replace("_", " ") for w in words]
            out["n" + offset] = (lemmas, parents, _definition(gloss))
    return out


def _definition(gloss: str) -> str:
    """The definition part of a WordNet gloss: example sentences ('; "..."') dropped."""
    gloss = gloss.strip()
    gloss = re.split(r';\s*"', gloss, maxsplit=1)[0]
    return gloss.strip().rstrip(";").strip()


def read_list(path: Path) -> list[str]:
    return [s for s in (line.strip() for line in open(path, encoding="utf-8")) if s]


def timm_info_dir() -> Path:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("timm is not installed (pip install timm), or pass --timm-info DIR")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dpkg_version(pkg: str) -> str | None:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True)
        return r.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-noun", type=Path, default=Path("/usr/share/wordnet/data.noun"))
    ap.add_argument("--timm-info", type=Path, default=None, help="timm's data/_info folder (default: installed timm)")
    ap.add_argument("--no-gloss", action="store_true", help="leave glosses out (smaller file)")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    info = args.timm_info or timm_info_dir()
    wn = parse_data_noun(args.data_noun)
    spaces = {name: read_list(info / fn) for name, fn in SPACES.items()}
    timm_lemmas = {}
    for line in open(info / "imagenet_synset_to_lemma.txt", encoding="utf-8"):
        if "\t" in line:
            w, lem = line.rstrip("\n").split("\t", 1)
            timm_lemmas[w] = [s.strip() for s in lem.split(",") if s.strip()]

    member: dict[str, int] = {}
    for name, wnids in spaces.items():
        for w in wnids:
            member[w] = member.get(w, 0) | MEMBER_BITS[name]

    missing = sorted(w for w in member if w not in wn)
    for name, wnids in spaces.items():
        miss = [w for w in wnids if w not in wn]
        print(f"{name}: {len(wnids)} synsets, {len(miss)} not in WordNet 3.0 {miss[:10]}")

    # closure over hypernyms + instance hypernyms
    keep: set[str] = set()
    stack = list(member)
    while stack:
        w = stack.pop()
        if w in keep:
            continue
        keep.add(w)
        if w in wn:
            stack.extend(p for p in wn[w][1] if p not in keep)

    # shortest depth to the root (memoised; WordNet's noun graph is a DAG)
    depth: dict[str, int] = {}

    def get_depth(w: str) -> int:
        if w in depth:
            return depth[w]
        if w == ROOT:
            d = 0
        elif w not in wn or not wn[w][1]:
            d = -1  # not connected to the root
        else:
            ds = [get_depth(p) for p in wn[w][1]]
            ds = [x for x in ds if x >= 0]
            d = 1 + min(ds) if ds else -1
        depth[w] = d
        return d

    sys.setrecursionlimit(10000)
    rows = sorted(keep)
    row = {w: i for i, w in enumerate(rows)}
    cols: dict[str, list] = {"wnid": rows, "lemmas": [], "parents": [], "depth": [], "member": [], "gloss": []}
    for w in rows:
        if w in wn:
            lemmas, parents, gloss = wn[w]
        else:
            lemmas, parents, gloss = timm_lemmas.get(w, [w]), [], ""
        cols["lemmas"].append(lemmas)
        cols["parents"].append([row[p] for p in parents])
        cols["depth"].append(get_depth(w))
        cols["member"].append(member.get(w, 0))
        cols["gloss"].append("" if args.no_gloss else gloss)
    if args.no_gloss:
        del cols["gloss"]

    unrooted = [w for w in rows if depth[w] < 0 and w not in missing]
    if unrooted:
        print(f"warning: {len(unrooted)} WordNet synsets not connected to {ROOT}: {unrooted[:10]}")

    doc = {
        "format": FORMAT,
        "source": {
            "wordnet": "WordNet 3.0 (Princeton), noun database data.noun, via Debian package wordnet-base",
            "wordnet_base_version": dpkg_version("wordnet-base"),
            "data_noun_sha256": sha256(args.data_noun),
            "synset_lists": {name: {"file": fn, "sha256": sha256(info / fn), "count": len(spaces[name])}
                             for name, fn in SPACES.items()},
            "generator": "scripts/build_wordnet_hierarchy.py",
        },
        "root": ROOT,
        "depth": "shortest hypernym/instance-hypernym path length to the root (root = 0; -1 = not connected)",
        "parents": "row ids (positions in columns.wnid) of direct hypernyms then instance hypernyms, WordNet order",
        "member_bits": MEMBER_BITS,
        "not_in_wordnet": missing,
        "columns": cols,
    }
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(args.output)
    print(f"{len(rows)} synsets ({len(member)} in label spaces, {len(rows) - len(member)} ancestors only), "
          f"max depth {max(depth[w] for w in rows)}, {len(raw):,} bytes JSON, "
          f"{len(buf.getvalue()):,} bytes gzip -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
