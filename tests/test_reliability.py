"""Issue 18: hostile and mistaken input. Outputs that are not ours are never removed or overwritten, bad input
is one SlimEdgeError (value seen, remedy), sizes are checked before anything is allocated."""

import errno
import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from slim_edge.checkpoint import read_meta, write_checkpoint
from slim_edge.converters.inspect import format_report, inspect_gguf
from slim_edge.errors import SlimEdgeError
from slim_edge.fsutil import cache_dir
from slim_edge.pipeline import run_quantize
from slim_edge.quantize import QuantConfig


# --- raw GGUF bytes, written field by field so that any field can be made wrong ---------------------------
def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, v)


def kv_str(key: str, v: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(v)


def gguf_bytes(kv=(), tensors=(), data: bytes = b"", alignment: int = 32) -> bytes:
    """tensors: (name, dims in ggml order, type id, data offset)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv)
    for name, dims, type_id, offset in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_id, offset)
    return out + bytes(-len(out) % alignment) + data


F32 = 0
ARCH = (kv_str("general.architecture", "llama"),)


# --- item 2: deleting what is not ours ----------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Every refusal must come before the model is loaded (so before any training)."""

    def fail(*a, **k):
        raise AssertionError("the model was loaded: the check came too late")

    monkeypatch.setattr("slim_edge.pipeline.load_model", fail)


def _notes(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("flags", [{"force": True}, {"resume": True}, {"resume": True, "force": True}])
def test_force_and_resume_never_remove_a_folder_of_other_files(flags, tiny_llama, tiny_text, tmp_path, no_loading):
    before = _notes(tmp_path / "notes")
    with pytest.raises(SlimEdgeError, match=r"slim-edge did not write .*choose another -o"):
        run_quantize(str(tiny_llama), QuantConfig(calib=str(tiny_text)), tmp_path / "notes", progress=False, **flags)
    assert {p.name: p.read_bytes() for p in (tmp_path / "notes").iterdir()} == before


def test_output_is_never_the_input_or_above_it(tiny_llama, tiny_text, no_loading):
    files = {p.name: p.read_bytes() for p in tiny_llama.iterdir()}
    for out in (tiny_llama, tiny_llama.parent):
        with pytest.raises(SlimEdgeError, match="would delete the input"):
            run_quantize(str(tiny_llama), QuantConfig(calib=str(tiny_text)), out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in tiny_llama.iterdir()} == files


def test_force_onto_a_file_or_a_symlink_is_refused_before_training(tiny_llama, tiny_text, tmp_path, no_loading):
    f = tmp_path / "out"
    f.write_bytes(b"not a folder")
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    for out, kind in ((f, "a file"), (link, "a symlink")):
        with pytest.raises(SlimEdgeError, match=f"is {kind}, not a folder slim-edge wrote"):
            run_quantize(str(tiny_llama), QuantConfig(calib=str(tiny_text)), out, force=True, progress=False)
    assert f.read_bytes() == b"not a folder" and link.is_symlink() and (tmp_path / "elsewhere").is_dir()


def test_a_partial_folder_of_other_files_is_kept(tiny_llama, tiny_text, tmp_path, no_loading):
    before = _notes(tmp_path / "o.partial")
    with pytest.raises(SlimEdgeError, match="o.partial is in the way .* not one slim-edge wrote"):
        run_quantize(str(tiny_llama), QuantConfig(calib=str(tiny_text)), tmp_path / "o", force=True, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o.partial").iterdir()} == before


def test_force_replaces_a_checkpoint_and_an_empty_folder(tiny_llama, tiny_text, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    cfg = QuantConfig(scheme="sherry", calib=str(tiny_text))
    run_quantize(str(tiny_llama), cfg, out, force=True, progress=False)
    first = (out / "model.safetensors").read_bytes()
    run_quantize(str(tiny_llama), QuantConfig(scheme="seq2", calib=str(tiny_text)), out, force=True, progress=False)
    assert read_meta(out)["config"]["scheme"] == "seq2" and (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary or old folder left beside it


# --- item 3: overwriting without --force --------------------------------------------------------------------
def test_model_card_never_replaces_a_readme_slim_edge_did_not_write(tmp_path):
    from slim_edge.converters.model_card import write_card

    readme = tmp_path / "README.md"
    readme.write_text("# my project\n")
    summary = {"bytes": 2**20, "type": "q8_0"}
    card = write_card(tmp_path / "m.gguf", summary, "ckpt", force=True)
    assert card == tmp_path / "m.README.md" and readme.read_text() == "# my project\n"
    assert card.read_text().splitlines()[:3] == ["# m.gguf", "", "Made by slim-edge from `ckpt`."]
    (tmp_path / "m.README.md").write_text("someone's notes\n")
    with pytest.raises(SlimEdgeError, match="not slim-edge's card of m.gguf"):
        write_card(tmp_path / "m.gguf", summary, "ckpt", force=True)
    assert (tmp_path / "m.README.md").read_text() == "someone's notes\n"
    # its own card of the same file is replaced with --force, and only then
    other = tmp_path / "d"
    other.mkdir()
    assert write_card(other / "m.gguf", summary, "a", force=True) == other / "README.md"
    assert write_card(other / "m.gguf", summary, "a") == other / "m.README.md"  # README.md taken, no --force
    with pytest.raises(SlimEdgeError, match="m.README.md already exists; pass --force"):
        write_card(other / "m.gguf", summary, "a")
    assert write_card(other / "m.gguf", {**summary, "bytes": 2**21}, "b", force=True) == other / "README.md"
    assert "- size: 2.0 MiB" in (other / "README.md").read_text()


def test_eval_json_is_not_overwritten_without_force(tiny_llama, tiny_text, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from slim_edge.cli import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "r.json"
    out.write_bytes(b"precious")
    monkeypatch.setattr("slim_edge.evals.eval_cmd.evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    res = CliRunner().invoke(app, [str(tiny_llama), "--corpus", str(tiny_text), "-o", str(out)])
    assert isinstance(res.exception, SlimEdgeError) and "pass --force" in str(res.exception)
    assert out.read_bytes() == b"precious"
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf_bytes(ARCH, [("a", (8,), F32, 0)], bytes(32)))
    res = CliRunner().invoke(app, [str(model), "-o", str(model), "--force"])
    assert isinstance(res.exception, SlimEdgeError) and "is one of the models" in str(res.exception)


def test_full_disk_during_checkpoint_save_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(SlimEdgeError, match=r"the disk is full writing .*ckpt \(No space left on device\)"):
        write_checkpoint({"w": torch.zeros(4)}, {"slim_edge_checkpoint": 1}, tiny_llama, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root, as the sshd tests do)."""
    import subprocess

    d = tmp_path / "small"
    d.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True).returncode
    ):
        pytest.skip("needs root and mount to make a small file system")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_a_real_full_disk_during_checkpoint_save_and_retag(full_disk, tiny_llama, monkeypatch):
    import torch

    from slim_edge.converters.gguf_retag import retag

    big = {"w": torch.zeros(600_000)}  # 2.4 MB on a 1 MiB disk
    with pytest.raises(SlimEdgeError, match=r"not enough disk space in .*need 3 MiB, 1 MiB free"):
        write_checkpoint(big, {"slim_edge_checkpoint": 1}, tiny_llama, full_disk / "ckpt")
    monkeypatch.setattr("slim_edge.checkpoint.check_free_space", lambda *a: None)  # the disk fills while writing
    with pytest.raises(SlimEdgeError, match=r"the disk is full writing .*ckpt \(No space left on device\)"):
        write_checkpoint(big, {"slim_edge_checkpoint": 1}, tiny_llama, full_disk / "ckpt")
    assert list(full_disk.iterdir()) == []
    src = full_disk.parent / "old.gguf"
    stq = np.zeros(42 * 32768, np.uint8)  # 1.3 MB
    src.write_bytes(gguf_bytes(ARCH, [("blk.0.ffn_down.weight", (256, 32768), 42, 0)], stq.tobytes()))
    with pytest.raises(SlimEdgeError, match="the disk is full writing"):
        retag(src, full_disk / "new.gguf")
    assert list(full_disk.iterdir()) == []


def test_quantize_checks_the_disk_before_any_work_and_its_bound_holds(
    full_disk, tiny_llama, tiny_text, tmp_path, monkeypatch
):
    from slim_edge import pipeline
    from slim_edge.models import load_model

    config = QuantConfig(scheme="seq2", steps=2, batch_size=1, seq_len=32, calib=str(tiny_text))
    sizes, train = {}, pipeline.train

    def measured(*a, **k):  # the real training; the size of its last saved state
        state = train(*a, **k)
        sizes["train.dcp"] = sum(f.stat().st_size for f in k["ckpt_path"].with_suffix(".dcp").iterdir())
        return state

    monkeypatch.setattr(pipeline, "train", measured)
    run_quantize(str(tiny_llama), config, tmp_path / "ckpt", progress=False, checkpoint_every=1)
    written = 2 * sizes["train.dcp"] + sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    need = pipeline.disk_need(load_model(str(tiny_llama))[0], config)
    assert written <= need <= 1.5 * written + (16 << 20)  # an upper bound: train.dcp/ twice while a save replaces it
    for slow in ("train", "gptq_", "_training_tokens"):
        monkeypatch.setattr(pipeline, slow, lambda *a, **k: pytest.fail("worked before checking the disk"))
    with pytest.raises(
        SlimEdgeError,
        match=rf"not enough disk space in {full_disk}: need {need >> 20} MiB, "
        rf"1 MiB free",
    ):
        run_quantize(str(tiny_llama), config, full_disk / "ckpt", progress=False)
    assert list(full_disk.iterdir()) == []


def test_a_run_that_failed_before_training_blocks_nothing_and_its_samples_are_reused(
    tiny_llama, tiny_text, tmp_path, monkeypatch
):
    from dataclasses import replace

    from slim_edge import gendata, pipeline
    from slim_edge.checkpoint import is_checkpoint

    drawn, sample = [], gendata.teacher_tokens
    monkeypatch.setattr(gendata, "teacher_tokens", lambda *a, **k: drawn.append(a[1]) or sample(*a, **k))
    # :cache=0: the user's samples cache may hold this draw from an earlier test (then nothing is drawn at all);
    # what is tested here is the .partial folder's copy
    config = QuantConfig(
        scheme="seq2", steps=1, batch_size=1, seq_len=32, calib=f"{tiny_text},teacher:64:cache=0", ptq="gptq"
    )
    gptq = pipeline.gptq_

    def fail_after_sampling(out):
        def broken(*a, **k):
            raise SlimEdgeError("GPTQ failed")

        monkeypatch.setattr(pipeline, "gptq_", broken)
        with pytest.raises(SlimEdgeError, match="GPTQ failed"):
            run_quantize(str(tiny_llama), config, out, progress=False)
        monkeypatch.setattr(pipeline, "gptq_", gptq)
        assert sorted(p.name for p in out.with_name(out.name + ".partial").iterdir()) == ["tokens.pt"]

    fail_after_sampling(tmp_path / "a")
    run_quantize(str(tiny_llama), replace(config, ptq="rtn"), tmp_path / "a", progress=False)  # no --resume/--force
    assert drawn == [64] and is_checkpoint(tmp_path / "a") and not (tmp_path / "a.partial").exists()
    fail_after_sampling(tmp_path / "b")
    run_quantize(str(tiny_llama), replace(config, ptq="rtn", seed=1), tmp_path / "b", progress=False)
    assert drawn == [64, 64, 64]  # another seed samples anew


def test_full_disk_during_an_atomic_file_write_leaves_the_old_file(tmp_path, monkeypatch):
    from slim_edge.converters.model_card import write_card

    card = write_card(tmp_path / "m.gguf", {"bytes": 1, "type": "f16"}, "x")
    old = card.read_bytes()
    real = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SlimEdgeError, match="the disk is full"):
        write_card(tmp_path / "m.gguf", {"bytes": 2, "type": "f16"}, "x", force=True)
    monkeypatch.setattr(os, "replace", real)
    assert card.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_an_atomic_folder_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    """atomic_dir (checkpoints, ONNX exports) fsyncs every file and folder it wrote before the rename that
    publishes them, so a crash soon after cannot leave the name over half-written files."""
    from slim_edge.fsutil import atomic_dir

    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.json").write_text("{}")
        (tmp / "link").symlink_to("a.bin")
    # bottom-up, the link not followed; then the parent, after the rename
    assert synced == [f"{tmp}/sub/b.json", f"{tmp}/sub", f"{tmp}/a.bin", str(tmp), str(tmp_path)]
    assert (tmp_path / "out" / "sub" / "b.json").read_text() == "{}"


# --- item 6: sizes checked before allocating ----------------------------------------------------------------
def test_config_sizes_are_checked_before_allocating(tiny_llama, tmp_path, monkeypatch):
    from slim_edge.evals.eval_cmd import evaluate

    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "hidden_size": 2**20, "intermediate_size": 2**22}))
    monkeypatch.setattr("slim_edge.evals.eval_cmd.load_lm", lambda *a, **k: pytest.fail("allocated first"))
    with pytest.raises(SlimEdgeError, match=r"hidden_size/vocab_size"):
        evaluate([str(big)], progress=False)
    (big / "config.json").write_text(json.dumps({**config, "hidden_size": "576"}))
    with pytest.raises(SlimEdgeError, match=r"hidden_size is '576'; it must be a positive integer"):
        evaluate([str(big)], progress=False)


def test_load_model_checks_config_sizes_before_allocating(tiny_llama, tmp_path, monkeypatch):
    from slim_edge.models import load_model

    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "hidden_size": 2**20, "intermediate_size": 2**22}))
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("allocated first")
    )
    with pytest.raises(SlimEdgeError, match=r"hidden_size/vocab_size"):
        load_model(str(big))


def test_gen_tokens_threads_and_ctx_are_bounded(tiny_llama, tiny_text, monkeypatch):
    from slim_edge.evals.eval_cmd import evaluate

    monkeypatch.setattr("slim_edge.evals.eval_cmd.load_lm", lambda *a, **k: pytest.fail("loaded first"))
    kw = {"corpus": str(tiny_text), "progress": False}
    with pytest.raises(SlimEdgeError, match="--gen-tokens 2000000: give 0 .skip. to 4096"):
        evaluate([str(tiny_llama)], gen_tokens=2_000_000, **kw)
    with pytest.raises(SlimEdgeError, match="--threads 0: need at least 1"):
        evaluate([str(tiny_llama)], threads=0, **kw)
    # the tiny model is trained for 512 positions
    with pytest.raises(SlimEdgeError, match="needs a context of 1024 tokens; .* trained for 512: lower --ctx"):
        evaluate([str(tiny_llama)], ctx=1024, **kw)
    with pytest.raises(SlimEdgeError, match="needs a context of 564 tokens"):
        evaluate([str(tiny_llama)], ctx=64, gen_tokens=500, **kw)


def test_tokenizing_in_pieces_gives_the_ids_of_the_whole_text():
    """On real text and SmolLM2's own tokenizer, the ids of the pieces joined are the ids of the whole text,
    down to the last token, with pieces of 2,000 characters (the default is 64 K)."""
    from transformers import AutoTokenizer

    from slim_edge.corpora import get_text
    from slim_edge.memory import tokenize_in_pieces
    from slim_edge.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    text = get_text("pydocs", "eval").text[:400_000]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tokenize_in_pieces(lambda t: tok(t, add_special_tokens=False)["input_ids"], text, piece_chars=2000)
    assert len(whole) > 40_000 and pieces.dtype == np.int32
    assert pieces.tolist() == whole


def test_inspect_reads_a_huge_metadata_array_in_bounded_memory(tmp_path):
    n = 20_000_000
    array = _s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 0, n) + bytes(n)  # 20 MB of uint8
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf_bytes(ARCH + (array,), [("t", (8,), F32, 0)], bytes(32)))
    tracemalloc.start()
    r = inspect_gguf(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r["metadata"]["tokenizer.ggml.scores"] == f"[{n} items]"
    assert peak < 1 << 20  # the list of 20 M ints was 160 MB


# --- item 7: tracebacks on bad input ------------------------------------------------------------------------
def test_zero_dimension_on_a_type_42_tensor(tmp_path):
    path = tmp_path / "z.gguf"
    path.write_bytes(gguf_bytes(ARCH, [("blk.0.attn_q.weight", (64, 0), 42, 0)], bytes(32)))
    r = inspect_gguf(path, "patched")
    assert r["loads"] is False and r["problems"] == [
        "tensor 'blk.0.attn_q.weight' has a zero dimension (shape [64, 0])"
    ]


def test_metadata_nested_5000_deep(tmp_path):
    deep = _s("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 4999 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "deep.gguf"
    path.write_bytes(gguf_bytes((deep,), [], b""))
    with pytest.raises(SlimEdgeError, match=r"'x' nests arrays more than 16 deep .*the file is corrupt"):
        inspect_gguf(path)


@pytest.mark.parametrize(
    "content,what",
    [
        ("[]", "a JSON list"),
        ("null", "a JSON NoneType"),
        ('{"slim_edge_checkpoint": 1}', "config is None"),
        (
            '{"slim_edge_checkpoint": 1, "config": {"scheme": "sherry"}, "plan": [{"name": "a", "format": "stq1_0", '
            '"mode": "sherry", "type_id": 43, "shape": ["64", "256"]}]}',
            r"the shape of plan entry 0 \(a\) is \['64', '256'\]",
        ),
        ('{"slim_edge_checkpoint": 1, "config": {"scheme": "sherry"}, "plan": [{"name": "a"}]}', "plan entry 0 is"),
    ],
)
def test_damaged_quant_config(content, what, tmp_path):
    (tmp_path / "quant_config.json").write_text(content)
    with pytest.raises(SlimEdgeError, match=f"is damaged: .*{what}.*re-run slim-edge quantize"):
        read_meta(tmp_path)


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("batch_size", -1), ("seq_len", 0), ("steps", -1)])
def test_training_sizes_are_checked(field, value):
    with pytest.raises(SlimEdgeError, match=f"--{field.replace('_', '-')} {value}: it must be an integer of at least"):
        QuantConfig(**{field: value})


def test_bad_devices_and_time_limit(tiny_llama):
    from typer.testing import CliRunner

    from slim_edge.cli import app
    from slim_edge.devices import get_device
    from slim_edge.pipeline import pick_device

    with pytest.raises(SlimEdgeError, match="--device 'tpu' is not a device slim-edge trains on"):
        pick_device("tpu")
    with pytest.raises(SlimEdgeError, match="--device ssh needs --host user@address"):
        get_device("ssh", host=None, port=22)
    r = CliRunner().invoke(app, ["quantize", str(tiny_llama), "--time-limit", "-1", "-o", "x"])
    assert isinstance(r.exception, SlimEdgeError) and "--time-limit -1.0" in str(r.exception)


# --- item 8: wrong or silent acceptance ---------------------------------------------------------------------
def test_a_checkpoint_without_quant_config_is_not_trained_as_an_hf_model(tiny_llama, tiny_text, tmp_path):
    ckpt = tmp_path / "q"
    run_quantize(str(tiny_llama), QuantConfig(calib=str(tiny_text)), ckpt, progress=False)
    (ckpt / "quant_config.json").unlink()
    with pytest.raises(SlimEdgeError, match="slim-edge checkpoint without its quant_config.json"):
        run_quantize(str(ckpt), QuantConfig(calib=str(tiny_text)), tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_inspect_says_no_for_files_llama_cpp_refuses(tmp_path):
    cases = {
        "dup": ([("a", (8,), F32, 0), ("a", (8,), F32, 32)], "tensor name 'a' appears twice"),
        "misaligned": (
            [("a", (8,), F32, 0), ("b", (8,), F32, 40)],
            "tensor 'b' starts at data offset 40, not a multiple of the alignment 32",
        ),
        "rows": ([("a", (100, 1), 43, 0)], "tensor 'a': rows of 100 weights are not whole STQ1_0 blocks of 256"),
    }
    for name, (tensors, problem) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(gguf_bytes(ARCH, tensors, bytes(96)))
        r = inspect_gguf(path, "patched")
        assert (r["loads"], r["problems"]) == (False, [problem]), name
        assert "loads in the patched runtime: no" in format_report(r)


def test_inspect_escapes_terminal_control_characters(tmp_path):
    path = tmp_path / "esc.gguf"
    path.write_bytes(
        gguf_bytes(
            ARCH + (kv_str("general.name", "\x1b[2J\x1b]0;owned\x07"),), [("t\x1b[31m", (8,), F32, 0)], bytes(32)
        )
    )
    text = format_report(inspect_gguf(path))
    assert "\x1b" not in text and "\x07" not in text
    assert "general.name: \\x1b[2J\\x1b]0;owned\\x07" in text and "t\\x1b[31m" in text


def test_retag_refuses_a_damaged_file_and_in_place_keeps_a_symlink(tmp_path):
    from slim_edge.converters.gguf_retag import retag
    from slim_edge.formats import get_format

    stq = get_format("stq1_0").quantize(np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32))
    good = gguf_bytes(ARCH, [("blk.0.attn_k.weight", (256, 1), 42, 0)], stq.tobytes() + bytes(-stq.size % 32))
    damaged = tmp_path / "dup.gguf"
    damaged.write_bytes(gguf_bytes(ARCH, [("a", (256, 1), 42, 0), ("a", (8,), F32, 64)], bytes(96)))
    with pytest.raises(SlimEdgeError, match="tensor name 'a' appears twice.*nothing written"):
        retag(damaged)
    assert not (tmp_path / "dup-retag.gguf").exists()
    target = tmp_path / "real.gguf"
    target.write_bytes(good)
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    plan, written = retag(link, in_place=True)
    assert link.is_symlink() and written == target.resolve()
    data = target.read_bytes()
    pos = data.index(_s("blk.0.attn_k.weight")) + len(_s("blk.0.attn_k.weight")) + 4 + 2 * 8
    assert struct.unpack_from("<I", data, pos)[0] == 43 and data[:pos] + data[pos + 4 :] == good[:pos] + good[pos + 4 :]


def test_eval_says_what_is_wrong_with_a_truncated_or_legacy_gguf(tmp_path, tiny_text, monkeypatch):
    from slim_edge.evals.eval_cmd import evaluate
    from slim_edge.formats import get_format

    monkeypatch.setattr("slim_edge.evals.eval_cmd.load_lm", lambda *a, **k: pytest.fail("runtime asked first"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_bytes(ARCH, [("a", (64, 4), F32, 0)], bytes(100)))
    with pytest.raises(SlimEdgeError, match=r"needs 1024 bytes of data, the file holds 100; the file is truncated"):
        evaluate([str(cut)], corpus=str(tiny_text), progress=False)
    stq = get_format("stq1_0").quantize(np.zeros((1, 256), np.float32))
    legacy = tmp_path / "old.gguf"
    legacy.write_bytes(gguf_bytes(ARCH, [("blk.0.attn_k.weight", (256, 1), 42, 0)], stq.tobytes()))
    with pytest.raises(SlimEdgeError, match=r"cannot be loaded: .*older AngelSlim file.*slim-edge gguf retag"):
        evaluate([str(legacy)], corpus=str(tiny_text), progress=False)


def test_bench_copies_nothing_before_refusing_a_non_gguf(tmp_path):
    from slim_edge.devices.base import Device
    from slim_edge.evals.bench import BenchConfig, run_bench

    class Recorder(Device):
        name = "recorder"
        copied: list = []

        def copy_to(self, local, remote):
            self.copied.append(local)

        def shell(self, command, *, timeout=None):
            raise AssertionError("the device was used before the files were checked")

    good = tmp_path / "m.gguf"
    good.write_bytes(gguf_bytes(ARCH, [("a", (8,), F32, 0)], bytes(32)))
    notes = tmp_path / "notes.gguf"
    notes.write_text("hello")
    dev = Recorder()
    with pytest.raises(SlimEdgeError, match=r"notes.gguf: not a GGUF file \(it starts with b'hell'"):
        run_bench([good, notes], dev, BenchConfig(threads=[1]), progress=False)
    assert dev.copied == []


# --- session 17's re-probe: options that trained silently on nonsense ------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", -1.0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("scale_lr", -0.1),
        ("scale_lr", float("inf")),
        ("arenas_lambda", -1.0),
        ("tequila_lambda", float("nan")),
        ("warmup", -3),
    ],
)
def test_learning_rates_and_loss_weights_must_be_finite_and_not_negative(field, value):
    # --lr -1 trained by gradient ascent (distillation loss 23.8 -> 249) and --lr nan wrote a NaN model, exit 0
    with pytest.raises(
        SlimEdgeError,
        match=rf"{field.replace('_', '-') if field != 'warmup' else 'warmup'}"
        rf".* {value!r}",
    ):
        QuantConfig(**{field: value})
    QuantConfig(scale_lr=0.0, arenas_lambda=0.0, tequila_lambda=0.0)  # zero: frozen scales, no Arenas / Tequila term


def test_teacher_for_a_model_that_is_not_a_checkpoint_is_refused(tiny_llama, tiny_text, tmp_path, no_loading):
    # --teacher was ignored unless MODEL is a checkpoint: `--teacher /nonexistent` trained from MODEL, exit 0
    with pytest.raises(
        SlimEdgeError,
        match=r"--teacher /nonexistent: a teacher is only chosen when MODEL is a "
        r"slim-edge checkpoint",
    ):
        run_quantize(
            str(tiny_llama),
            QuantConfig(calib=str(tiny_text)),
            tmp_path / "o",
            progress=False,
            teacher_model="/nonexistent",
        )
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_trained_model_is_not_finite_writes_nothing(tiny_llama, tiny_text, tmp_path):
    # one Adam step of 1e30 leaves the loss of step 1 finite (it is computed before the step) and the weights not:
    # the final distillation loss was nan and the checkpoint was written anyway
    config = QuantConfig(scheme="seq2", steps=1, batch_size=1, seq_len=32, lr=1e30, calib=str(tiny_text))
    with pytest.raises(SlimEdgeError, match=r"distillation loss is (nan|inf).*nothing was written.*lower --lr"):
        run_quantize(str(tiny_llama), config, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_folder_given_as_a_gguf_file_is_named_a_folder(tmp_path):
    # inspect and retag said "d: no such file" for a folder that exists
    from slim_edge.converters.gguf_retag import retag

    for read in (inspect_gguf, retag):
        with pytest.raises(SlimEdgeError, match=r"is a folder, not a GGUF file; pass a .gguf file"):
            read(tmp_path)
        with pytest.raises(SlimEdgeError, match=r"none.gguf: no such file"):
            read(tmp_path / "none.gguf")


@pytest.mark.parametrize(
    "calib,msg",
    [
        ("/nonexistent.txt", r"--calib /nonexistent.txt: no such file"),
        ("wiki,teacher:abc", r"cannot read 'teacher:abc'; write teacher or teacher:N"),
        ("EMPTY", r"EMPTY: the file is empty \(0 bytes\)"),
        ("BLANK", r"BLANK: the file is empty \(3 bytes\)"),
    ],
)
def test_a_dry_run_checks_calib_before_loading_the_model(calib, msg, tiny_llama, tmp_path, no_loading):
    # --dry-run planned and exited 0 on a --calib the real run refuses; an empty file was refused only after the
    # model had loaded (session 18)
    if calib in ("EMPTY", "BLANK"):
        (tmp_path / calib).write_text("" if calib == "EMPTY" else " \n\n")
        calib, msg = str(tmp_path / calib), msg.replace(calib, str(tmp_path / calib))
    with pytest.raises(SlimEdgeError, match=msg):
        run_quantize(str(tiny_llama), QuantConfig(calib=calib), tmp_path / "o", progress=False, dry_run=True)


# --- session 18 ----------------------------------------------------------------------------------------------------
def test_python_m_scripts_end_bad_input_with_one_line_and_exit_2(tmp_path):
    # `python -m slim_edge.evals.lab.ckpt_parts unpack EMPTY_DIR OUT` printed a Typer traceback (a SlimEdgeError)
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "slim_edge.evals.lab.ckpt_parts", "unpack", str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"slim-edge: error: {tmp_path} holds no part*.safetensors")
    # every entry point under evals/, the lab's research scripts included, runs through the same handler
    evals = Path(__file__).resolve().parents[1] / "evals"
    for script in sorted(evals.glob("*.py")) + sorted(evals.glob("lab/*.py")):
        text = script.read_text()
        if 'if __name__ == "__main__":' in text:
            assert "run_main(" in text.split('if __name__ == "__main__":')[1], script.name


# --- session 19: the hostile-input re-probe (tests/probe_inputs.py) --------------------------------------------
def test_paths_that_cannot_be_looked_up_are_named_not_a_traceback(tmp_path):
    import subprocess
    import sys

    from slim_edge.converters.gguf_read import read_tensor_table
    from slim_edge.fsutil import check_output_dir, check_output_file
    from slim_edge.runtime_patches.runtime import extract_tree

    os.mkfifo(tmp_path / "fifo.gguf")  # opening it would block for ever
    os.symlink("b.gguf", tmp_path / "a.gguf")
    os.symlink("a.gguf", tmp_path / "b.gguf")
    with pytest.raises(SlimEdgeError, match=r"fifo.gguf is a FIFO, not a GGUF file"):
        read_tensor_table(tmp_path / "fifo.gguf")
    with pytest.raises(SlimEdgeError, match=r"a.gguf is a symlink loop, not a GGUF file"):
        read_tensor_table(tmp_path / "a.gguf")
    long = tmp_path / ("d" * 5000)
    from slim_edge.converters.model_card import card_path

    for call in (
        lambda: read_tensor_table(long),
        lambda: check_output_file(long, False, "--gguf"),
        lambda: card_path(long / "m.gguf"),  # export asks for the card's path first
        lambda: check_output_dir(long, False, lambda p: True),
    ):
        with pytest.raises(SlimEdgeError, match=r"\.\.\.\(5\d\d\d characters\): File name too long"):
            call()
    with pytest.raises(SlimEdgeError, match=r"File name too long; pick a new directory"):
        extract_tree(long, sdist=tmp_path / "unused.tar.gz")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SlimEdgeError, match=r"f exists and is not an empty folder"):
        extract_tree(tmp_path / "f", sdist=tmp_path / "unused.tar.gz")
    # the CLI's own look-up (is it an ONNX folder?) comes first in `inspect`
    cli = Path(sys.executable).with_name("slim-edge")
    proc = subprocess.run([str(cli), "inspect", str(long)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "File name too long" in proc.stderr


def test_runtime_cache_that_is_a_file_and_zero_jobs_are_refused(tmp_path, monkeypatch):
    from slim_edge.runtime_patches import runtime

    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("SLIM_EDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SlimEdgeError, match=r"SLIM_EDGE_CACHE=.*/cache is a file, not a folder"):
        cache_dir()
    monkeypatch.setattr(runtime, "require", lambda *a: pytest.fail("went on to build"))
    for jobs in (0, -3):
        with pytest.raises(SlimEdgeError, match=rf"--jobs {jobs}: give at least 1 compile job"):
            runtime.build(jobs=jobs)


def test_bench_refuses_options_its_device_ignores_and_a_missing_key(tmp_path):
    from slim_edge.cli import bench
    from slim_edge.devices.ssh import SshDevice
    from slim_edge.evals.tiny_gguf import write_tiny_llama_gguf

    with pytest.raises(SlimEdgeError, match=r"--identity /nonexistent-key: no such key file"):
        SshDevice(host="pi@127.0.0.1", identity="/nonexistent-key")
    with pytest.raises(SlimEdgeError, match=r"--port 70000: an ssh port lies between 1 and 65535"):
        SshDevice(host="pi@127.0.0.1", port=70000)
    g = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    for device, opts, named in (
        ("host", {"host": "pi@x"}, "--host"),
        ("ssh", {"host": "pi@x", "serial": "R58"}, "--serial"),
        ("android", {"port": 2222}, "--port"),
        ("ssh", {"host": "pi@x", "isa": "avx512"}, "--isa"),
    ):
        with pytest.raises(SlimEdgeError, match=rf"^{named} given with --device {device}, which does not use it"):
            bench([g], device=device, output=tmp_path / "res", **opts)
        assert not (tmp_path / "res").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write in, root included: immutable (chattr +i), or mode 0500 for a plain user."""
    import shutil
    import subprocess

    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o500)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode:
        pytest.skip("root without chattr +i: no folder is read-only")
    yield d
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(d)])
    d.chmod(0o700)


def test_a_read_only_output_folder_is_refused_before_any_work(read_only_dir, tiny_llama, tiny_text, no_loading):
    from slim_edge.demo import run_demo
    from slim_edge.fsutil import check_output_file
    from slim_edge.runtime_patches.runtime import extract_tree

    ro = read_only_dir
    with pytest.raises(SlimEdgeError, match=rf"-o {ro}/out: cannot write in {ro} \("):
        run_quantize(str(tiny_llama), QuantConfig(calib=str(tiny_text)), ro / "out", progress=False)
    with pytest.raises(SlimEdgeError, match=rf"--json {ro}/r.json: cannot write in {ro} \("):
        check_output_file(ro / "r.json", False, "--json")
    with pytest.raises(SlimEdgeError, match=rf"cannot make {ro}/src \("):
        extract_tree(ro / "src", sdist=ro / "unused.tar.gz")
    with pytest.raises(SlimEdgeError, match=rf"-o {ro}/demo: cannot write in {ro} \("):
        run_demo(out=ro / "demo")
    with pytest.raises(SlimEdgeError, match=rf"-o {tiny_text} is a file, not a results folder"):
        run_demo(out=tiny_text)
    assert list(ro.iterdir()) == []
    with pytest.raises(SlimEdgeError, match=r"--dry-run with --resume: a dry run trains nothing"):
        run_quantize(
            str(tiny_llama),
            QuantConfig(calib=str(tiny_text)),
            ro.parent / "out",
            progress=False,
            dry_run=True,
            resume=True,
        )


def test_a_model_the_converter_refuses_is_one_line_without_its_traceback(tiny_llama, tiny_text, tmp_path):
    # tiny_llama's byte-level tokenizer is one llama.cpp's converter does not recognise
    import subprocess
    import sys

    run_quantize(str(tiny_llama), QuantConfig(steps=0, calib=str(tiny_text)), tmp_path / "ck", progress=False)
    cli = Path(sys.executable).with_name("slim-edge")
    proc = subprocess.run(
        [str(cli), "export", str(tmp_path / "ck"), "--gguf", str(tmp_path / "m.gguf")], capture_output=True, text=True
    )
    errors = [
        ln
        for ln in proc.stderr.splitlines()
        if not ln.startswith(("slim-edge: converting", "Writing")) and "Writing model shards" not in ln and ln.strip()
    ]  # the progress bar's own lines
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-1500:]
    assert errors[0] == (
        "slim-edge: error: the pinned convert_hf_to_gguf.py cannot convert this model (exit 1): "
        "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre(); "
        "nothing was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_text_and_model_paths_that_are_not_files_say_what_they_are(tmp_path, tiny_text):
    from slim_edge.corpora import read_text_file
    from slim_edge.evals.eval_cmd import preflight
    from slim_edge.train import calib_file

    os.mkfifo(tmp_path / "fifo.gguf")
    os.symlink("b.gguf", tmp_path / "a.gguf")
    os.symlink("a.gguf", tmp_path / "b.gguf")
    with pytest.raises(SlimEdgeError, match=rf"--calib {tmp_path}/fifo.gguf: it is a FIFO; pass a UTF-8 text file"):
        calib_file(str(tmp_path / "fifo.gguf"))
    with pytest.raises(SlimEdgeError, match=rf"--calib {tmp_path}: it is a folder"):
        calib_file(str(tmp_path))
    with pytest.raises(
        SlimEdgeError,
        match=r"corpus file .*a.gguf is a symlink loop, not a file; pass a UTF-8 "
        r"text file",
    ):
        read_text_file(tmp_path / "a.gguf")
    with pytest.raises(SlimEdgeError, match=r"fifo.gguf is a FIFO, not a GGUF file"):
        preflight(str(tmp_path / "fifo.gguf"))
    with pytest.raises(SlimEdgeError, match=r"GGUF file .*none.gguf does not exist"):
        preflight(str(tmp_path / "none.gguf"))
