"""The real Megatron-DeepSpeed on this machine: sources, ezpz, dataset — all outside the repo.

Why a module of its own: the cross-check's ground truth is the framework the benchmark pins
(argonne-lcf/Megatron-DeepSpeed 39784a0f, with ezpz c45fb19), not a look-alike. Those
sources come either from the user's own checkout (``--source DIR`` or ``MEGATRON_DEEPSPEED``)
or from the pristine archives in ``../shared/vendor`` (checksums verified, see its README);
they are unpacked into a cache directory, never into the repository, and never edited: every
CPU workaround is applied at launch (:mod:`full_model.megatron.rank`).

The dataset is synthetic and made by the checkout's own ``tools/preprocess_data.py`` with
Megatron's ``NullTokenizer`` (text = space-separated integer ids; no tokenizer files), so the
data path exercised is the framework's real indexed-dataset path. It is cached by its shape.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# The pins: ../shared/vendor/README.md (the commit the ALCF-4 benchmark's submodule names).
MEGATRON_COMMIT = "39784a0f2bf6f7df8be3a6367b897945780de3c7"
EZPZ_COMMIT = "c45fb19353c9f06575e0ecb12ba7377321bb2f71"
ARCHIVES = {  # file in the vendor directory → (sha256, what)
    "megatron-deepspeed-39784a0f.tar.gz":
        ("69342040ce9bb2be675b554aecac0c1e7a487082ca3f49fe571c63e92d46e575", "Megatron-DeepSpeed"),
    "ezpz-c45fb19.tar.gz":
        ("ce0f6476776aacb7b654a3b1be70f93997d8f56b72323ee6f76b4c3d741de19b", "ezpz"),
}
SOURCE_ENV = "MEGATRON_DEEPSPEED"
DATA_TOKENS_SLACK = 4  # documents beyond the run's need: Megatron's sample index wants a spare epoch edge


class SetupError(ValueError):
    """Something the user must fix (missing archive, bad checksum, no checkout): one line, exit 2."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/llm-microbench`` (default ``~/.cache/llm-microbench``): outside the repo."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(base)) / "llm-microbench"


def default_vendor_dir() -> Path:
    """``../shared/vendor`` beside the repository root."""
    return Path(__file__).resolve().parents[3] / "shared" / "vendor"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_archives(vendor: Path) -> dict[str, Path]:
    """Every archive present and matching its pinned checksum, else SetupError naming the file."""
    out = {}
    for name, (want, what) in ARCHIVES.items():
        path = vendor / name
        if not path.is_file():
            raise SetupError(f"{path}: no such archive ({what}); see ../shared/vendor/README.md")
        got = sha256(path)
        if got != want:
            raise SetupError(f"{path}: sha256 {got} ≠ pinned {want}: not the vendored {what}")
        out[what] = path
    return out


def extracted_source(vendor: Path) -> Path:
    """Unpack the verified Megatron-DeepSpeed archive once into the cache; returns its root."""
    archives = verify_archives(vendor)
    dest = cache_dir() / f"megatron-deepspeed-{MEGATRON_COMMIT[:8]}"
    root = dest / "Megatron-DeepSpeed"
    if (root / "pretrain_gpt.py").is_file():
        return root
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    archive = archives["Megatron-DeepSpeed"]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / ARCHIVE_RECORD).write_text(json.dumps({
        "archive": archive.name, "sha256": sha256(archive),
        "commit": archive_commit(archive) or MEGATRON_COMMIT}, indent=1) + "\n", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(tmp)  # another process got there first; its copy is the same archive
    else:
        tmp.rename(dest)
    return root


def install_ezpz(vendor: Path) -> None:
    """pip install ezpz c45fb19 --no-deps (its declared dependencies include a git-only package;
    the ones ``import ezpz`` needs are in the ``megatron`` extra)."""
    archives = verify_archives(vendor)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(archives["ezpz"])],
                   check=True)


def build_helpers(source: Path) -> None:
    """``make -C megatron/data``: the C++ sample-index helpers (pybind11, g++). Megatron would
    build them on rank 0 at first use too; doing it here keeps the first timed run clean."""
    data = source / "megatron" / "data"
    if any(data.glob("helpers*.so")):
        return
    res = subprocess.run(["make", "-C", str(data)], capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SetupError(f"make -C {data} failed: {tail}")


def resolve_source(source: str | None, *, vendor: Path | None = None) -> Path:
    """The checkout to run: ``--source``, else ``$MEGATRON_DEEPSPEED``, else the vendored archive
    unpacked in the cache. SetupError names what is missing."""
    text = source or os.environ.get(SOURCE_ENV)
    if text:
        root = Path(text).expanduser().resolve()
        if not (root / "pretrain_gpt.py").is_file():
            raise SetupError(f"{root}: not a Megatron-DeepSpeed checkout (no pretrain_gpt.py)")
        return root
    vendor = vendor or default_vendor_dir()
    if not vendor.is_dir():
        raise SetupError(f"no --source, no ${SOURCE_ENV}, and no vendored archives at {vendor}")
    return extracted_source(vendor)


ARCHIVE_RECORD = "archive.json"
"""Written beside the unpacked tree (``<cache>/megatron-deepspeed-<commit>/``, outside the
pristine checkout): which archive it came from, its sha256 and the commit its header names."""
IDENTITY_FILES = ("pretrain_gpt.py", "megatron/training.py", "megatron/model/transformer.py")
"""Files compared with the vendored archive's to recognise a tree unpacked from it by hand."""


def archive_commit(archive: Path) -> str | None:
    """The commit ``git archive`` wrote into the tarball's pax header (``comment``), if any."""
    try:
        with tarfile.open(archive) as tar:
            commit = tar.pax_headers.get("comment")
    except (OSError, tarfile.TarError):
        return None
    return commit if commit and len(commit) == 40 else None


def _matches_archive(source: Path, archive: Path) -> bool:
    """The tree's identity files are byte-identical to the archive's (a hand-made unpacking)."""
    try:
        with tarfile.open(archive) as tar:
            for rel in IDENTITY_FILES:
                member = tar.extractfile(f"Megatron-DeepSpeed/{rel}")
                if member is None or member.read() != (source / rel).read_bytes():
                    return False
    except (OSError, KeyError, tarfile.TarError):
        return False
    return True


def framework_identity(source: Path, *, vendor: Path | None = None) -> dict[str, str]:
    """Which Megatron-DeepSpeed ``source`` is: ``commit`` and how it is known (``commit_source``).

    From ``.git`` where the tree is a clone; else from the record written when this tool
    unpacked the vendored archive (archive name, sha256, the commit in its header); else, where
    the tree's key files are identical to the vendored archive's, from that archive; else
    ``unknown`` with the reason."""
    source = Path(source)
    res = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel", "HEAD"],
                         capture_output=True, text=True)
    top, _, head = res.stdout.strip().partition("\n")
    if res.returncode == 0 and head and Path(top).resolve() == source.resolve():  # its own repo, not one around it
        return {"commit": head.strip(), "commit_source": f"git ({source})"}
    record = source.parent / ARCHIVE_RECORD
    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
        return {"commit": str(rec["commit"]),
                "commit_source": f"unpacked from {rec['archive']} (sha256 {rec['sha256']}), recorded in {record}"}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    vendor = vendor or default_vendor_dir()
    name = next(n for n, (_, what) in ARCHIVES.items() if what == "Megatron-DeepSpeed")
    archive = vendor / name
    if archive.is_file() and _matches_archive(source, archive):
        commit = archive_commit(archive)
        if commit:
            return {"commit": commit, "commit_source": f"{', '.join(IDENTITY_FILES)} identical to "
                                                       f"{archive} (sha256 {sha256(archive)})"}
    why = "no .git, no record of an unpacked archive"
    why += (f", and its files differ from {archive}" if archive.is_file() else f", and no {archive} to compare with")
    return {"commit": "unknown", "commit_source": why}


@dataclass(frozen=True)
class Dataset:
    prefix: Path
    """Megatron ``--data-path`` prefix (``…_text_document``)."""
    vocab_size_arg: int
    """``--vocab-size`` for NullTokenizer: the model's vocab − 1 (the tokenizer adds the EOD id)."""


def synthetic_dataset(source: Path, *, vocab_size: int, seq_len: int, num_samples: int,
                      seed: int = 1234) -> Dataset:
    """Random token ids, one document per sample, through the checkout's preprocess_data.py.

    NullTokenizer's vocabulary is ``--vocab-size`` + 1 (its EOD id), so the model's vocab V
    is reached with ``--vocab-size V−1`` and ``--make-vocab-size-divisible-by 1``.
    """
    import numpy as np
    n_docs = num_samples + DATA_TOKENS_SLACK
    key = f"v{vocab_size}-s{seq_len}-n{n_docs}-seed{seed}"
    d = cache_dir() / "megatron-data" / key
    prefix = d / "synthetic_text_document"
    if prefix.with_suffix(".idx").is_file() and prefix.with_suffix(".bin").is_file():
        return Dataset(prefix=prefix, vocab_size_arg=vocab_size - 1)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(tmp / "input.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(n_docs):  # seq_len + 1 ids: the sample and its shifted label
            ids = rng.integers(0, vocab_size - 1, size=seq_len + 1)
            fh.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    cmd = [sys.executable, str(source / "tools" / "preprocess_data.py"), "--input", str(tmp / "input.jsonl"),
           "--output-prefix", str(tmp / "synthetic"), "--tokenizer-type", "NullTokenizer",
           "--vocab-size", str(vocab_size - 1), "--append-eod", "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=source,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(source), os.environ.get("PYTHONPATH", "")])})
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SetupError(f"tools/preprocess_data.py failed (exit {res.returncode}): {tail}")
    (tmp / "input.jsonl").unlink()
    if d.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(d)
    return Dataset(prefix=prefix, vocab_size_arg=vocab_size - 1)


def install(vendor: Path) -> Path:
    """Everything CI and a laptop need: verify, unpack, ezpz, helpers. Returns the source root."""
    root = extracted_source(vendor)
    install_ezpz(vendor)
    build_helpers(root)
    return root
