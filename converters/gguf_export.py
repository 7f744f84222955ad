"""`slim-edge export`: a checkpoint's trained codes written exactly as GGUF tensors.

Architecture metadata, tokenizer and chat template come from the official converter of the pinned
llama.cpp tree (convert_hf_to_gguf.py, run on the dequantized model in f32); then every quantized
linear is replaced by its packed blocks from the checkpoint, in the converter's row order (llama's
q/k rows are permuted for rope, found by exact comparison with the converter's f32 tensor). A token
embedding trained on its type (quantize --embedding-type) is written as its stored codes the same way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import SlimEdgeError
from ..formats import FORMATS, embedding_types, get_format
from ..fsutil import atomic_dir, atomic_path, cache_dir, check_output_file, move_into_place, scratch_dir
from ..memory import check_model_config
from .gguf_types import file_type, patch_types, raw_tensor

EXPORT_FORMAT_VERSION = 1
# f16 and q8_0 come from the converter, the others from llama-quantize of the F16 file
BASELINE_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m", "q4_k_s", "q2_k", "tq2_0", "tq1_0")


def converter_tree() -> Path:
    """The pristine pinned tree (for convert_hf_to_gguf.py and its gguf-py), extracted once."""
    from ..runtime_patches.runtime import PIN, extract_tree

    dest = cache_dir("src", f"llama.cpp-{PIN.commit}")
    if (dest / ".complete").is_file():
        return dest
    with atomic_dir(dest) as tmp:
        tmp.rmdir()  # extract_tree makes its own folder
        extract_tree(tmp)
        (tmp / ".complete").write_text("")
    return dest


def run_converter(hf_folder: Path, out: Path, outtype: str = "f32") -> None:
    script = converter_tree() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(hf_folder), "--outtype", outtype, "--outfile", str(out)]
    print(f"slim-edge: converting with the pinned convert_hf_to_gguf.py ({outtype})", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        # its traceback is not ours to show; its last line (the exception) says what it could not convert
        last = ((proc.stdout + proc.stderr).strip().splitlines() or ["no output"])[-1].strip()
        raise SlimEdgeError(
            f"the pinned convert_hf_to_gguf.py cannot convert this model (exit {proc.returncode}): "
            f"{last}; nothing was written"
        )


def _check_out(out: Path, force: bool) -> None:
    if out.suffix != ".gguf":
        raise SlimEdgeError(f"--gguf {out}: the output file must end in .gguf")
    check_output_file(out, force, "--gguf")
    out.parent.mkdir(parents=True, exist_ok=True)


def _copy_metadata(reader, writer, skip=()) -> None:
    from gguf import GGUFValueType

    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name in ("general.architecture", *skip):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def _permutation(rows: int, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's llama rope permutation of q/k rows, as an index array."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _row_order(converted: np.ndarray, ours: np.ndarray, config: dict, name: str) -> np.ndarray:
    rows = ours.shape[0]
    candidates = [np.arange(rows)]
    for heads in (config.get("num_attention_heads"), config.get("num_key_value_heads")):
        if heads and rows % (2 * heads) == 0:
            candidates.append(_permutation(rows, heads))
    for perm in candidates:
        if np.array_equal(converted.reshape(ours.shape), ours[perm]):
            return perm
    raise SlimEdgeError(
        f"{name}: the converter's tensor matches no known row order of the checkpoint's; "
        f"this architecture's conversion is not supported by exact export yet"
    )


def default_name(meta: dict, label: str) -> str:
    """GGUF naming convention: <BaseName>-<SizeLabel>-<FineTune>-<Encoding>.gguf."""
    src = meta.get("general.name") or "model"
    base = re.sub(r"[^A-Za-z0-9.]+", "-", str(src)).strip("-") or "model"
    return f"{base}-{label.upper()}.gguf"


def export_checkpoint(
    ckpt: Path,
    out: Path,
    *,
    token_embedding_type: str | None = None,
    output_tensor_type: str = "q8_0",
    overrides: list[str] | None = None,
    force: bool = False,
) -> dict:
    """Write the checkpoint as GGUF; returns a summary (types, sizes, metadata).

    token_embedding_type: default the type the checkpoint's embedding trained on (its codes are written),
    q8_0 for a float embedding; another type re-quantizes the trained values."""
    import gguf

    from ..checkpoint import embedding_codes, load_quantized, read_meta, read_tensors

    ckpt, out = Path(ckpt), Path(out)
    meta = read_meta(ckpt)
    token_embedding_type = token_embedding_type or (meta.get("embedding") or {}).get("format", "q8_0")
    _check_out(out, force)
    for t in (token_embedding_type, output_tensor_type):
        if t not in embedding_types():
            raise SlimEdgeError(
                f"embedding/output type {t!r} is not supported; choose one of {', '.join(embedding_types())}"
            )
    rules = _parse_overrides(overrides or [])
    tensors = read_tensors(ckpt)
    emb = embedding_codes(meta, tensors)
    config = json.loads((ckpt / "config.json").read_text())
    plan = {e["name"]: e for e in meta["plan"] if e["mode"] != "keep"}
    check_model_config(ckpt)
    with scratch_dir(out) as tmp:
        model, tok = load_quantized(ckpt)
        # the converter names the model after its folder: use the base model's, as the baselines do
        hf = tmp / (Path(str(meta.get("base_model") or "")).name or "model")
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        del model
        run_converter(hf, tmp / "f32.gguf")
        reader = gguf.GGUFReader(tmp / "f32.gguf")
        arch = str(reader.fields["general.architecture"].contents())
        n_layers = int(config["num_hidden_layers"])
        name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
        to_gguf = {}
        for hf_name in plan:
            g = name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))
            if g is None:
                raise SlimEdgeError(f"no GGUF name for {hf_name} in architecture {arch}")
            to_gguf[g] = hf_name
        writer = gguf.GGUFWriter(tmp / "out.gguf", arch)
        _copy_metadata(reader, writer, skip=("general.file_type",))
        real, types, bias_perm, kept = {}, {}, {}, {}
        for t in reader.tensors:
            name = t.name
            data = np.asarray(t.data)
            if name in to_gguf:
                hf = to_gguf[name]
                e = plan[hf]
                fmt = get_format(e["format"])
                rows, k = e["shape"]
                packed = tensors[f"{hf}.qweight"].numpy()
                perm = _row_order(data, fmt.dequantize(packed, k), config, hf)
                bias_perm[name.rsplit(".", 1)[0] + ".bias"] = perm
                writer.add_tensor(name, raw_tensor(fmt.name, packed[perm]))
                real[name] = (fmt.type_id, k)
                types[name] = fmt.name
            elif name in bias_perm or (name.endswith(".bias") and name.rsplit(".", 1)[0] + ".weight" in to_gguf):
                writer.add_tensor(name, data.astype(np.float32))
                types[name] = "f32"
            elif data.ndim == 2 and (name.startswith("token_embd") or name.startswith("output.")):
                want = _override(rules, name) or (
                    token_embedding_type if name.startswith("token_embd") else output_tensor_type
                )
                x = data.astype(np.float32)
                if name.startswith("token_embd") and emb is not None and want == emb[1].name:
                    enc = emb[2][_row_order(x, emb[1].dequantize(emb[2], x.shape[1]), {}, emb[0])]
                else:
                    enc = _encode_kept(x, want)
                if want == "f16":
                    writer.add_tensor(name, enc)
                else:
                    writer.add_tensor(name, raw_tensor(want, enc))
                    real[name] = (FORMATS[want].type_id, x.shape[1])
                types[name] = want
                kept[name] = _kept_fidelity(x, want, enc)
            else:
                writer.add_tensor(name, data.astype(np.float32) if data.dtype != np.float16 else data)
                types[name] = "f32" if data.dtype != np.float16 else "f16"
        primary = max(
            set(e["format"] for e in plan.values()),
            key=lambda f: sum(p["shape"][0] * p["shape"][1] for p in plan.values() if p["format"] == f),
        )
        writer.add_uint32("general.file_type", file_type(primary))
        used = sorted({v for v in types.values()})
        custom = [f for f in used if f in FORMATS and not FORMATS[f].stock]
        rounded_as_runtime = trained_for(meta["config"])
        slim = {
            "slim_edge.export_format_version": EXPORT_FORMAT_VERSION,
            "slim_edge.scheme": meta["config"]["scheme"],
            "slim_edge.plan": json.dumps(meta["plan"]),
            "slim_edge.type_ids": json.dumps({f: FORMATS[f].type_id for f in used if f in FORMATS}),
            "slim_edge.runtime": ("slim-edge patched llama.cpp (types: " + ", ".join(custom) + ")")
            if custom
            else "stock llama.cpp",
            "slim_edge.trained_for": json.dumps(rounded_as_runtime),
            "slim_edge.training": json.dumps(
                {k: meta.get(k) for k in ("training", "distill_loss", "calibration") if k in meta}
                | {"steps": meta["config"]["steps"]}
            ),
        }
        for k, v in slim.items():
            (writer.add_uint32 if isinstance(v, int) else writer.add_string)(k, v)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        patch_types(tmp / "out.gguf", real)
        move_into_place(tmp / "out.gguf", out)
    size = out.stat().st_size
    n_lin = sum(e["shape"][0] * e["shape"][1] for e in plan.values())
    bits = sum(e["shape"][0] * e["shape"][1] * get_format(e["format"]).bits_per_weight for e in plan.values())
    summary = {
        "file": str(out),
        "bytes": size,
        "scheme": meta["config"]["scheme"],
        "types": types,
        "linear_bits_per_weight": bits / max(n_lin, 1),
        "needs_patched_runtime": bool(custom),
        "custom_types": custom,
        "kept": kept,
        "trained_for": rounded_as_runtime,
    }
    return summary


def trained_for(config: dict) -> dict:
    """Which of the runtime's roundings the checkpoint's model includes (quantize --act-quant /
    --runtime-attention): the runtime must keep them to compute what was trained."""
    return {"act_quant": bool(config.get("act_quant")), "runtime_attention": bool(config.get("runtime_attention"))}


def _encode_kept(x: np.ndarray, kind: str) -> np.ndarray:
    return x.astype(np.float16) if kind == "f16" else FORMATS[kind].quantize(x)


def _decode_kept(enc: np.ndarray, kind: str, k: int) -> np.ndarray:
    return enc.astype(np.float32) if kind == "f16" else FORMATS[kind].dequantize(enc, k)


def _kept_fidelity(x: np.ndarray, kind: str, enc: np.ndarray) -> dict:
    """How well a kept tensor (embedding, head) survives its GGUF type. Not exact means the runtime's model is
    not the checkpoint's there; `exact_in` names an embedding type that would hold it exactly, if any."""
    back = _decode_kept(enc, kind, x.shape[1])
    diff = back - x
    exact = bool(np.array_equal(back, x))
    out = {
        "type": kind,
        "exact": exact,
        "max_abs_err": float(np.abs(diff).max()),
        "rel_rms_err": float(np.sqrt(np.mean(diff**2) / max(float(np.mean(x**2)), 1e-30))),
    }
    if not exact:
        out["exact_in"] = next(
            (
                t
                for t in embedding_types()
                if t != kind and np.array_equal(_decode_kept(_encode_kept(x, t), t, x.shape[1]), x)
            ),
            None,
        )
    return out


def _parse_overrides(rules: list[str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for r in rules:
        pat, sep, typ = r.rpartition("=")
        if not sep or typ not in embedding_types():
            raise SlimEdgeError(
                f"--tensor-type {r!r}: write REGEX=TYPE with TYPE in {', '.join(embedding_types())} "
                f"(quantized linears keep their trained type)"
            )
        try:
            out.append((re.compile(pat), typ))
        except re.error as e:
            raise SlimEdgeError(f"--tensor-type {r!r}: bad regex ({e})") from None
    return out


def _override(rules, name: str) -> str | None:
    for pat, typ in rules:
        if pat.search(name):
            return typ
    return None


def llama_quantize_argv(
    tool: list[str],
    src: Path,
    dst: Path,
    type_: str,
    *,
    token_embedding_type: str | None = None,
    output_tensor_type: str | None = None,
) -> list[str]:
    """`llama-quantize [--token-embedding-type T] [--output-tensor-type T] SRC DST TYPE`; `tool` is the
    command prefix that runs llama-quantize."""
    argv = list(tool)
    if token_embedding_type:
        argv += ["--token-embedding-type", token_embedding_type]
    if output_tensor_type:
        argv += ["--output-tensor-type", output_tensor_type]
    return argv + [str(src), str(dst), type_.upper()]


def llama_quantize(
    src: Path,
    dst: Path,
    type_: str,
    *,
    bin_dir: Path | None = None,
    token_embedding_type: str | None = None,
    output_tensor_type: str | None = None,
) -> Path:
    """Quantize `src` to `type_` with llama-quantize, written to a temporary file first; returns `dst`.

    bin_dir: the folder of another llama.cpp build's llama-quantize (default: the patched host runtime).
    token_embedding_type / output_tensor_type pin those two tensors (e.g. "q6_K"), so that only the
    linear layers differ between types."""
    if bin_dir is None:
        from ..runtime_patches.runtime import ensure_runtime

        tool = ensure_runtime("host").argv("llama-quantize")
    else:
        exe = Path(bin_dir) / "llama-quantize"
        if not exe.is_file():
            raise SlimEdgeError(
                f"--bin-dir {bin_dir} has no llama-quantize; pass the bin folder of a llama.cpp "
                "build (the one holding llama-quantize and llama-bench), or leave --bin-dir out "
                "to use slim-edge's host runtime."
            )
        tool = [str(exe)]
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        argv = llama_quantize_argv(
            tool, src, tmp, type_, token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type
        )
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlimEdgeError(
                f"llama-quantize {type_.upper()} of {src} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-1500:]}"
            )
    return dst


def export_baseline(model: str, out: Path, type_: str, force: bool = False) -> dict:
    """F16/Q8_0 straight from the converter; the other types through the runtime's llama-quantize."""
    from ..models import resolve

    out = Path(out)
    if type_ not in BASELINE_TYPES:
        raise SlimEdgeError(f"--type {type_!r}: choose one of {', '.join(BASELINE_TYPES)}")
    _check_out(out, force)
    folder = resolve(model)
    with scratch_dir(out) as tmp:
        if type_ in ("f16", "q8_0"):
            run_converter(folder, tmp / "out.gguf", type_)
        else:
            run_converter(folder, tmp / "f16.gguf", "f16")
            llama_quantize(tmp / "f16.gguf", tmp / "out.gguf", type_)
        move_into_place(tmp / "out.gguf", out)
    return {"file": str(out), "bytes": out.stat().st_size, "type": type_, "needs_patched_runtime": False}
