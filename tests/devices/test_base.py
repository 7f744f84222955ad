"""The shared device flow: registry, refusals before copying, runtime lookup."""

import os

import pytest

from slim_edge.devices import DEVICES, get_device
from slim_edge.devices.base import DeviceInfo, check_fits, find_runtime_dirs
from slim_edge.errors import SlimEdgeError


def test_registry():
    assert list(DEVICES) == ["host", "android", "ssh", "qemu-arm64"]
    assert get_device("android", serial="R58M41XYZ12", host="ignored").serial == "R58M41XYZ12"
    assert get_device("ssh", host="pi@10.0.0.2", port=2222).port == 2222
    assert get_device("qemu-arm64").emulated
    with pytest.raises(SlimEdgeError, match="Unknown device 'iphone'.*host, android, ssh, qemu-arm64"):
        get_device("iphone")


def _file(tmp_path, name, mib):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(mib * 2**20)
    return p


def test_too_little_storage(tmp_path):
    files = [_file(tmp_path, "a.gguf", 300), _file(tmp_path, "b.gguf", 200)]
    info = DeviceInfo(device="android", arch="aarch64", storage_available_kb=400 * 1024, mem_available_kb=8 << 20)
    with pytest.raises(SlimEdgeError, match="need 500 MiB plus 64 MiB headroom, but only 400 MiB is free"):
        check_fits(info, files)


def test_too_little_ram(tmp_path):
    files = [_file(tmp_path, "f16.gguf", 300)]
    info = DeviceInfo(device="android", arch="aarch64", storage_available_kb=8 << 20, mem_available_kb=200 * 1024)
    with pytest.raises(SlimEdgeError, match="largest model file is 300 MiB but only 200 MiB of RAM.*MemAvailable"):
        check_fits(info, files)
    check_fits(DeviceInfo(device="host", arch="x86_64"), files)  # unknown figures: nothing to refuse


@pytest.mark.runtime
def test_runtime_dirs_hold_the_built_tools_and_library():
    from slim_edge.runtime_patches.runtime import ensure_runtime

    rt = ensure_runtime("host")
    bin_dir, lib_dir = find_runtime_dirs("host")
    assert (bin_dir, lib_dir) == (rt.root / "bin", rt.root / "lib")
    assert (bin_dir / "llama-bench").stat().st_size > 0 and os.access(bin_dir / "llama-bench", os.X_OK)
    assert sorted(p.name for p in lib_dir.glob("libllama.so*"))[0] == "libllama.so"


def test_runtime_not_built_for_target(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIM_EDGE_CACHE", str(tmp_path))  # an empty cache: nothing is built
    with pytest.raises(SlimEdgeError, match="android-arm64"):
        find_runtime_dirs("android-arm64")
