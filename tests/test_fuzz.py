"""Issue 18: a bounded, seeded fuzz of everything that reads a GGUF file or a checkpoint.

A valid tiny seq2 checkpoint and its GGUF export are mutated (truncations, flipped bytes, absurd 64-bit
counts and lengths in the header, damaged quant_config.json and safetensors headers). Every command that
reads them (`inspect`, `inspect --json`, `gguf retag`, `export --gguf`) must either succeed or stop with
exit code 2 and a one-line message; never a traceback, never an output left behind, and the Python heap
of one call stays bounded (tracemalloc peak): 96 MB for the readers of the 28 MB file, 1.25x the valid
checkpoint's own export for `export`. `eval` and `bench` hand a file that slim-edge's reader
accepts to llama.cpp, which is out of this test's reach (a crash there is llama.cpp's).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from slim_edge.cli import main
from slim_edge.converters.gguf_export import export_checkpoint
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig
from tiny_models import make_tiny_smol

SEED = 18
N_GGUF = 64  # mutants of the GGUF file, each read by three commands
N_CKPT = 16  # mutants of the checkpoint, each exported (an export that still succeeds takes seconds)
READ_PEAK_MB = 96  # the file is 28 MB and the readers read its header: more was fooled by a count or a length
ABSURD = (0, 1, 2**31 - 1, 2**32, 2**32 + 7, 2**63 - 1, 2**64 - 1)


def cli(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, last line on stderr) of `slim-edge ARGS`, run in-process through slim_edge.cli.main,
    the console script's entry. An exception that main lets through is the traceback a user would see."""
    capsys.readouterr()
    argv, sys.argv = sys.argv, ["slim-edge", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_text):
    d = tmp_path_factory.mktemp("fuzz")
    smol = make_tiny_smol(d / "smol", layers=1)
    config = QuantConfig(scheme="seq2", steps=1, batch_size=1, seq_len=32, calib=str(tiny_text))
    run_quantize(str(smol), config, d / "ckpt", progress=False)
    tracemalloc.start()
    export_checkpoint(d / "ckpt", d / "m.gguf")
    export_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    (d / "README.md").unlink(missing_ok=True)  # a model card, where one is written
    return d / "ckpt", d / "m.gguf", export_peak


def _header_end(data: bytes) -> int:
    """Where tensor data starts, roughly: the mutations aim at the header, KV pairs and tensor infos."""
    return min(len(data), 64 * 1024)


def mutate_gguf(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = int(rng.integers(5))
    end = _header_end(data)
    if kind == 0:
        at = int(rng.integers(0, len(data)))
        return data[:at], f"truncated at {at}"
    b = bytearray(data)
    if kind == 1:
        where = rng.integers(0, end, size=int(rng.integers(1, 5)))
        for at in where:
            b[at] ^= 1 << int(rng.integers(8))
        return bytes(b), f"bits flipped at {sorted(where.tolist())}"
    if kind == 2:
        at = int(rng.integers(4, 24))  # version, n_tensors, n_kv
        v = ABSURD[int(rng.integers(len(ABSURD)))]
        b[at : at + 8] = struct.pack("<Q", v)
        return bytes(b[: len(data)]), f"u64 {v} at {at}"
    if kind == 3:
        at = int(rng.integers(24, end - 8))
        v = ABSURD[int(rng.integers(len(ABSURD)))]
        b[at : at + 8] = struct.pack("<Q", v)
        return bytes(b), f"u64 {v} at {at}"
    at, n = int(rng.integers(24, end)), int(rng.integers(1, 64))
    if rng.integers(2):
        return bytes(b[:at] + b[at + n :]), f"{n} bytes deleted at {at}"
    return bytes(b[:at]) + rng.bytes(n) + bytes(b[at:]), f"{n} random bytes inserted at {at}"


def _json_values(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_values(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_values(v, (*path, i))
    yield path


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def mutate_checkpoint(ckpt: Path, out: Path, rng: np.random.Generator) -> str:
    shutil.copytree(ckpt, out)
    kind = int(rng.integers(4))
    cfg = out / "quant_config.json"
    if kind == 0:  # a JSON value replaced by one of the wrong kind or size
        meta = json.loads(cfg.read_text())
        paths = [p for p in _json_values(meta) if p]
        path = paths[int(rng.integers(len(paths)))]
        value = [None, [], {}, "x", -1, 0, 2**63, 1e308, [1, 2, 3]][int(rng.integers(9))]
        _set(meta, path, value)
        cfg.write_text(json.dumps(meta))
        return f"quant_config.json {'/'.join(map(str, path))} = {value!r}"
    if kind == 1:
        text = cfg.read_bytes()
        at = int(rng.integers(len(text)))
        cfg.write_bytes(text[:at])
        return f"quant_config.json truncated at {at}"
    st = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(st.read_bytes())
    if kind == 2:  # the 8-byte header length, or bytes of the JSON header
        if rng.integers(2):
            v = ABSURD[int(rng.integers(len(ABSURD)))]
            data[:8] = struct.pack("<Q", v)
            st.write_bytes(bytes(data))
            return f"{st.name} header length {v}"
        hlen = struct.unpack("<Q", bytes(data[:8]))[0]
        at = 8 + int(rng.integers(hlen))
        data[at] = int(rng.integers(256))
        st.write_bytes(bytes(data))
        return f"{st.name} header byte {at}"
    at = int(rng.integers(len(data)))
    st.write_bytes(bytes(data[:at]))
    return f"{st.name} truncated at {at}"


def check_call(args: list[str], what: str, capsys, out: Path | None = None, peak_mb: float = READ_PEAK_MB) -> int:
    """Run one call and assert the contract; returns its exit code."""
    tracemalloc.start()
    try:
        code, msg = cli(args, capsys)
    except Exception as e:  # a traceback for the user
        pytest.fail(f"{' '.join(map(str, args))} on {what}: {type(e).__name__}: {e}")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert code in (0, 2), (what, args, code, msg)
    assert peak < peak_mb * 2**20, f"{what}: {args[0]} allocated {peak / 2**20:.0f} MB (bound {peak_mb:.0f})"
    if code == 2:
        # the error is the last line on stderr, whole: a message of several lines would end in another one
        assert msg.startswith("slim-edge: error: ") and "Traceback" not in msg, (what, msg)
        if out is not None:
            assert not out.exists(), f"{what}: {out} left behind after: {msg}"
            left = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]
            assert not left, f"{what}: {left} left behind after: {msg}"
    return code


def test_fuzz_gguf_readers(originals, tmp_path, capsys):
    _, gguf, _ = originals
    data = gguf.read_bytes()
    rng = np.random.default_rng(SEED)
    codes = []
    for i in range(N_GGUF):
        mutant, what = mutate_gguf(data, rng)
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(mutant)
        out = tmp_path / "out" / f"r{i}.gguf"
        out.parent.mkdir(exist_ok=True)
        for args, o in (
            (["inspect", str(path)], None),
            (["inspect", str(path), "--json"], None),
            (["gguf", "retag", str(path), "-o", str(out)], out),
        ):
            codes.append(check_call(args, what, capsys, o))
        path.unlink()
    # the mutations reach the reader's refusals, and some leave a readable file (flips in tensor names)
    assert codes.count(2) > 0.6 * len(codes) and codes.count(0) > 0, (codes.count(0), codes.count(2))


def test_fuzz_checkpoint_export(originals, tmp_path, capsys):
    ckpt, _, export_peak = originals
    rng = np.random.default_rng(SEED + 1)
    codes = []
    for i in range(N_CKPT):
        folder = tmp_path / f"c{i}"
        what = mutate_checkpoint(ckpt, folder, rng)
        out = tmp_path / "out" / f"e{i}.gguf"
        out.parent.mkdir(exist_ok=True)
        codes.append(
            check_call(["export", str(folder), "--gguf", str(out)], what, capsys, out, 1.25 * export_peak / 2**20)
        )
        shutil.rmtree(folder)
        for p in out.parent.iterdir():  # a mutant that still exports (a damaged field it does not read)
            p.unlink()
    assert codes.count(2) > 0.5 * len(codes), (codes.count(0), codes.count(2))
