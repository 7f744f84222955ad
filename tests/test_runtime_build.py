"""The pinned runtime: the pin, the patch series, the cache key, the builds and their errors."""

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slim_edge.cli import app, main
from slim_edge.errors import SlimEdgeError
from slim_edge.fsutil import sha256_file
from slim_edge.runtime_patches import runtime as rt


@pytest.fixture(scope="module")
def sdist():
    try:
        return rt.fetch_sdist(quiet=True)
    except SlimEdgeError as e:  # offline and not cached
        pytest.skip(f"pinned sdist unavailable: {e}")


@pytest.fixture(scope="module")
def pristine(sdist, tmp_path_factory):
    return rt.extract_tree(tmp_path_factory.mktemp("pristine") / "llama.cpp", sdist)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIM_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANDROID_NDK", raising=False)
    return tmp_path / "cache"


# --- the pin -------------------------------------------------------------------------------------


def test_pin(sdist):
    assert sha256_file(sdist) == rt.PIN.sha256
    assert rt.changelog_commit(sdist) == rt.PIN.commit == "0c1e57098"
    assert rt.submodule_head(sdist) == rt.PIN.commit_full
    assert rt.PIN.commit_full.startswith(rt.PIN.commit)
    rt.verify_sdist(sdist)


def test_pin_rejects_other_bytes(tmp_path):
    fake = tmp_path / rt.PIN.sdist_name
    fake.write_bytes(b"not the sdist")
    with pytest.raises(SlimEdgeError, match=f"sha256 is .* the pin is {rt.PIN.sha256}"):
        rt.verify_sdist(fake)


def test_pristine_tree_is_the_pinned_commit(pristine):
    assert not (pristine / ".git").exists()  # the submodule gitfile would point nowhere
    ggml_h = (pristine / "ggml/include/ggml.h").read_text()
    assert re.search(r"GGML_TYPE_Q2_0\s*=\s*42,", ggml_h)
    assert re.search(r"GGML_TYPE_COUNT\s*=\s*43,", ggml_h)
    cm = (pristine / "ggml/CMakeLists.txt").read_text()
    parts = [re.search(rf"set\(GGML_VERSION_{p} (\d+)\)", cm).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    version = ".".join(parts)
    assert version == rt.PIN.ggml_version


def test_cmake_options_exist_in_the_tree(pristine):
    """Every project option we set is declared by the pinned tree (a renamed option is silently ignored)."""
    text = "\n".join(p.read_text(errors="replace") for p in pristine.rglob("CMakeLists.txt"))
    text += "\n".join(p.read_text(errors="replace") for p in pristine.rglob("*.cmake"))
    configs = [rt.BuildConfig("host"), rt.BuildConfig("host", isa="avx512"), rt.BuildConfig("linux-arm64")]
    names = {a[2:].split("=")[0] for c in configs for a in c.cmake_args()}
    ours = sorted(n for n in names if not n.startswith(("CMAKE_", "ANDROID_", "BUILD_SHARED_LIBS")))
    missing = [n for n in ours if not re.search(rf"(option\(\s*{n}\b|set\(\s*{n}\b|DEFINED {n}\b)", text)]
    assert missing == []


def test_patch_series_applies_to_the_pristine_tree(pristine, tmp_path):
    tree = tmp_path / "tree"
    rt.prepare_source(tree, rt.patch_series())
    patches = rt.patch_series()
    # the series is applied in name order, each patch once
    assert [p.name for p in patches] == sorted(p.name for p in patches)
    if not patches:
        assert (tree / "ggml/include/ggml.h").read_bytes() == (pristine / "ggml/include/ggml.h").read_bytes()


# --- patches, keys, the cache ---------------------------------------------------------------------


def _tiny_tree(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("one\ntwo\nthree\n")
    return tree


GOOD = """--- a/a.txt
+++ b/a.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""
BAD = GOOD.replace(" three", " four")


@pytest.mark.parametrize("use_git", [True, False])
def test_failing_patch_is_named(tmp_path, monkeypatch, use_git):
    if not use_git:
        real = rt.shutil.which
        monkeypatch.setattr(rt.shutil, "which", lambda p: None if p == "git" else real(p))
    tree = _tiny_tree(tmp_path)
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-good.patch").write_text(GOOD)
    (pdir / "0002-bad.patch").write_text(BAD.replace("-two\n+TWO", "-TWO\n+2"))
    series = rt.patch_series(pdir)
    assert [p.name for p in series] == ["0001-good.patch", "0002-bad.patch"]
    with pytest.raises(SlimEdgeError, match=r"patch 0002-bad\.patch does not apply"):
        rt.apply_patches(tree, series)
    assert (tree / "a.txt").read_text() == "one\nTWO\nthree\n"  # the good one went in


def test_series_ignores_other_files(tmp_path):
    for name in ("0001-a.patch", "README.md", "notes.patch", "01-short.patch", "0002-b.patch"):
        (tmp_path / name).write_text(GOOD)
    assert [p.name for p in rt.patch_series(tmp_path)] == ["0001-a.patch", "0002-b.patch"]
    assert rt.patch_series(tmp_path / "empty") == []


def test_cache_key(tmp_path, cache, monkeypatch):
    pdir = tmp_path / "p"
    pdir.mkdir()
    (pdir / "0001-x.patch").write_text(GOOD)
    host = rt.BuildConfig("host")
    k = host.key(rt.patch_series(pdir))
    assert k == rt.BuildConfig("host").key(rt.patch_series(pdir))  # stable
    monkeypatch.setenv("SLIM_EDGE_CACHE", str(tmp_path / "elsewhere"))
    assert k == host.key(rt.patch_series(pdir))  # no machine paths in the key
    (pdir / "0001-x.patch").write_text(GOOD + "\n")
    assert host.key(rt.patch_series(pdir)) != k  # a patch's bytes
    k1 = host.key(rt.patch_series(pdir))
    (pdir / "0001-x.patch").rename(pdir / "0001-y.patch")
    assert host.key(rt.patch_series(pdir)) != k1  # its name
    assert host.key([]) != k1
    keys = {
        c.key([])
        for c in (
            host,
            rt.BuildConfig("host", isa="avx512"),
            rt.BuildConfig("linux-arm64"),
            rt.BuildConfig("host", tools=("llama-bench",)),
            rt.BuildConfig("linux-arm64", arm_arch="armv8.6-a+dotprod+i8mm"),
        )
    }
    assert len(keys) == 5
    # tool order does not matter; android-arm64 without an NDK is the static linux-arm64 build
    assert rt.BuildConfig(tools=("b", "a")).key([]) == rt.BuildConfig(tools=("a", "b")).key([])
    a, lx = rt.BuildConfig("android-arm64"), rt.BuildConfig("linux-arm64")
    assert a.key([]) == lx.key([]) and rt._runtime_dir(a, a.key([])) == rt._runtime_dir(lx, lx.key([]))
    assert rt._runtime_dir(host, k).parent == tmp_path / "elsewhere" / "runtime"
    assert rt._runtime_dir(host, k).name == f"host-{k[:12]}"


def test_unfinished_build_is_not_found(cache):
    config = rt.BuildConfig("linux-arm64")
    key = config.key(rt.patch_series())
    root = rt._runtime_dir(config, key)
    (root / "bin").mkdir(parents=True)
    for t in config.tools:
        (root / "bin" / t).write_text("")
    (root / "runtime.json").write_text(json.dumps({"tools": {t: f"bin/{t}" for t in config.tools}}))
    with pytest.raises(SlimEdgeError, match="run `slim-edge runtime build --target linux-arm64`"):
        rt.find_runtime("linux-arm64")  # no marker: a killed build
    (root / rt.MARKER).write_text("0" * 64 + "\n")
    with pytest.raises(SlimEdgeError):
        rt.find_runtime("linux-arm64")  # a marker for another key
    (root / rt.MARKER).write_text(key + "\n")
    assert rt.find_runtime("linux-arm64").tool("llama-bench") == root / "bin" / "llama-bench"
    assert rt.find_runtime("android-arm64").root == root


def test_bad_target_and_isa():
    with pytest.raises(SlimEdgeError, match="unknown target 'ios'.*host, linux-arm64, android-arm64"):
        rt.BuildConfig("ios")
    with pytest.raises(SlimEdgeError, match="unknown --isa 'sse'"):
        rt.BuildConfig("host", isa="sse")


def _path_with(tmp_path, *programs):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for p in programs:
        os.symlink(rt.shutil.which(p), d / p)
    return str(d)


def test_missing_tools_name_the_debian_package(tmp_path, cache, monkeypatch):
    only_cmake = _path_with(tmp_path, "cmake", "ninja")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(SlimEdgeError, match=r"cmake not found on PATH.*apt-get install cmake"):
        rt.build("host")
    with pytest.raises(SlimEdgeError, match=r"qemu-aarch64 not found.*apt-get install qemu-user"):
        rt.emulator()
    monkeypatch.setenv("PATH", only_cmake)
    with pytest.raises(SlimEdgeError, match=r"\bcc not found.*apt-get install build-essential"):
        rt.build("host")
    with pytest.raises(SlimEdgeError, match=r"aarch64-linux-gnu-gcc not found.*g\+\+-aarch64-linux-gnu"):
        rt.build("linux-arm64")
    assert not (cache / "downloads").exists()  # nothing was fetched before the check


def test_ndk_must_be_real(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ANDROID_NDK", str(tmp_path))
    with pytest.raises(SlimEdgeError, match="no build/cmake/android.toolchain.cmake"):
        rt.build("android-arm64")


# --- real builds ------------------------------------------------------------------------------------


def _elf(path: Path) -> tuple[int, bool]:
    """(e_machine, has PT_INTERP) of a 64-bit little-endian ELF."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return machine, 3 in types


def _run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def host_runtime():
    return rt.ensure_runtime("host")


@pytest.mark.runtime
def test_host_tools_run(host_runtime):
    r = _run(host_runtime.argv("llama-cli") + ["--version"])
    assert r.returncode == 0, r.stderr
    assert f"commit {rt.PIN.commit}" in r.stdout + r.stderr
    r = _run(host_runtime.argv("llama-quantize") + ["--help"])
    assert "Q2_0" in r.stdout + r.stderr and "TQ1_0" in r.stdout + r.stderr
    for t in rt.DEFAULT_TOOLS:
        assert _elf(host_runtime.tool(t))[0] == 62  # x86-64
    assert (host_runtime.lib_dir / "libllama.so").exists()


@pytest.mark.runtime
def test_cli_where_reports_paths(host_runtime):
    r = CliRunner().invoke(app, ["runtime", "where", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["lib"] == str(host_runtime.lib_dir)
    assert set(info["tools"]) == set(rt.DEFAULT_TOOLS)
    r = CliRunner().invoke(app, ["runtime", "python-env"])
    assert f"export LLAMA_CPP_LIB_PATH={host_runtime.lib_dir}" in r.stdout


def _need_bindings():
    # find_spec, not importorskip: importing llama_cpp here would load a library into pytest itself
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install llama-cpp-python==0.3.36")


LOAD = """
import json, sys
from slim_edge.runtime_patches.runtime import load_bindings, loaded_libraries
llama_cpp = load_bindings()
print(json.dumps({"lib": llama_cpp.llama_cpp._lib._name,
                  "maps": [str(p) for p in loaded_libraries() if "ggml" in p.name or "llama" in p.name],
                  "info": llama_cpp.llama_print_system_info().decode()}))
"""


@pytest.mark.runtime
def test_bindings_load_our_library(host_runtime):
    _need_bindings()
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")}
    r = _run([sys.executable, "-c", LOAD], env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    lib = host_runtime.lib_dir.resolve()
    assert Path(out["lib"]) == host_runtime.lib_dir / "libllama.so"
    names = {Path(p).name.split(".so")[0] for p in out["maps"]}
    assert {"libllama", "libggml", "libggml-base", "libggml-cpu"} <= names
    assert all(Path(p).resolve().parent == lib for p in out["maps"])
    assert "AVX2 = 1" in out["info"]


def test_the_bindings_carry_no_library_and_say_what_to_build(tmp_path):
    """`make setup` installs llama-cpp-python with LLAMA_BUILD=OFF: no libllama.so of its own (no second llama.cpp
    compile). With no runtime built (an empty cache), slim-edge's bindings() names the command that builds one."""
    _need_bindings()
    spec = importlib.util.find_spec("llama_cpp")
    assert not list(Path(spec.origin).parent.rglob("libllama*")), "the bindings were built with their own library"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")},
        "SLIM_EDGE_CACHE": str(tmp_path / "cache"),
    }
    code = (
        "from slim_edge.errors import SlimEdgeError\nfrom slim_edge.evals.backends import bindings\n"
        "try:\n    bindings()\nexcept SlimEdgeError as e:\n    print('REFUSED', e)\n"
    )
    r = _run([sys.executable, "-c", code], env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "REFUSED no llama.cpp runtime built for target host" in r.stdout, r.stdout
    assert "run `slim-edge runtime build --target host`" in r.stdout
    assert "llama-cpp-python has no library of its own to fall back on" in r.stdout


@pytest.mark.runtime
def test_bindings_refuse_a_foreign_library(host_runtime, tmp_path):
    _need_bindings()
    code = (
        "import os, shutil, sys; from slim_edge.runtime_patches import runtime as rt\n"
        f"d = sys.argv[1]; shutil.copytree({str(host_runtime.lib_dir)!r}, d, symlinks=True)\n"
        "os.environ['LLAMA_CPP_LIB_PATH'] = d\nimport llama_cpp\n"
        "try:\n    rt.load_bindings()\nexcept rt.SlimEdgeError as e:\n    print('REFUSED', e)\n"
    )
    r = _run([sys.executable, "-c", code, str(tmp_path / "other")])
    assert "REFUSED llama_cpp was already imported with" in r.stdout, r.stdout + r.stderr


@pytest.mark.cross
def test_static_arm64_runs_under_qemu():
    arm = rt.ensure_runtime("linux-arm64", tools=rt.DEVICE_TOOLS)  # CI builds the device set, not llama-cli
    assert set(rt.DEVICE_TOOLS) <= set(arm.tools)
    for t in arm.tools:
        machine, dynamic = _elf(arm.tool(t))
        assert machine == 183 and not dynamic  # AArch64, statically linked: runs from /data/local/tmp
    assert rt.find_runtime("linux-arm64", tools=("llama-bench",)).root == arm.root  # a device bench finds it
    argv = arm.argv("llama-completion")
    assert argv[:3] == [rt.shutil.which("qemu-aarch64"), "-cpu", "cortex-a76"]
    r = _run(argv + ["--version"])
    assert r.returncode == 0, r.stderr
    assert f"commit {rt.PIN.commit}" in r.stdout + r.stderr
    assert "aarch64" in r.stdout + r.stderr


def test_failed_step_shows_the_log_tail(tmp_path):
    log = tmp_path / "build.log"
    want = r"(?s)building x failed \(exit 3\).*boom.*full log"
    with open(log, "w") as f, pytest.raises(SlimEdgeError, match=want):
        rt._run_logged(
            ["sh", "-c", "echo '[1/2] cc a.c'; echo boom; exit 3"],
            dict(os.environ),
            f,
            log,
            "building x",
            progress=False,
        )
    assert "boom" in log.read_text()


def test_work_dir_is_fixed_per_target_with_a_spare_while_busy(tmp_path):
    with rt._work_dir(tmp_path, ".work-host") as first:
        assert first == tmp_path / ".work-host"  # the same path every time: ccache hits across keys
        with rt._work_dir(tmp_path, ".work-host") as second:
            assert second == tmp_path / ".work-host-1"  # another key builds meanwhile
    with rt._work_dir(tmp_path, ".work-host") as again:
        assert again == first


@pytest.mark.runtime
def test_a_default_build_serves_a_subset_of_its_tools():
    """kernel_bench asks for llama-bench + llama-quantize: the full default build must do."""
    from slim_edge.runtime_patches.runtime import ensure_runtime, find_runtime

    full = ensure_runtime("host")
    sub = find_runtime("host", tools=("llama-bench", "llama-quantize"))
    assert sub.bin_dir == full.bin_dir and (sub.bin_dir / "llama-bench").is_file()


REPO = Path(__file__).resolve().parent.parent


def test_shipped_series_is_the_repositorys_whole_series():
    names = [p.name for p in rt.patch_series()]
    assert names == sorted(p.name for p in (REPO / "runtime_patches").glob("[0-9][0-9][0-9][0-9]-*.patch"))
    assert len(names) >= 9 and names[0].startswith("0001-")


@pytest.mark.parametrize("keep, word", [((), "empty"), ((1, 2, 4), "incomplete")])
def test_an_empty_or_incomplete_shipped_series_is_refused(monkeypatch, tmp_path, keep, word):
    for p in rt.patch_series():
        if int(p.name[:4]) in keep:
            (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(rt, "PATCH_DIR", tmp_path)
    with pytest.raises(SlimEdgeError, match=f"patch series in .* is {word}"):
        rt.patch_series()


def test_cli_patches_lists_the_series():
    r = CliRunner().invoke(app, ["runtime", "patches", "--json"])
    assert r.exit_code == 0, r.output
    import hashlib

    assert json.loads(r.stdout) == [
        {"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in rt.patch_series()
    ]
    r = CliRunner().invoke(app, ["runtime", "patches"])
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].endswith("  0001-ggml-add-STQ1_0-and-Q2_0C-types.patch")


@pytest.mark.parametrize("keep, word", [((), "empty"), ((1, 3), "incomplete")])
def test_cli_patches_refuses_an_empty_or_incomplete_series(monkeypatch, tmp_path, capsys, keep, word):
    for p in rt.patch_series():
        if int(p.name[:4]) in keep:
            (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(rt, "PATCH_DIR", tmp_path)
    monkeypatch.setattr(sys, "argv", ["slim-edge", "runtime", "patches", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == 2 and not out.out
    assert out.err.startswith("slim-edge: error: the runtime patch series in") and f" is {word} " in out.err
    assert "Traceback" not in out.err


def test_a_wheel_install_finds_the_whole_series(tmp_path):
    """Installed from a wheel (no source tree), the runtime reads its patches as package data, byte for byte."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "whl"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "whl").glob("slim_edge-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import json, hashlib, slim_edge.runtime_patches.runtime as rt; print(json.dumps([rt.__file__] + "
        "[[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in rt.patch_series()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    ).stdout
    where, *got = json.loads(out)
    assert where.startswith(str(tmp_path / "site"))
    import hashlib

    assert got == [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in rt.patch_series()]
