"""Issue 18's hostile-input re-probe: run the installed `slim-edge` on bad inputs and count the clean answers.

Clean = the expected exit status (2, or 0 where the input is in fact fine), no traceback, a failure ends with one
`slim-edge: error:` line naming the value, and nothing new left on disk. Each probe runs as a subprocess in a
fresh folder, on a tiny random model, checkpoint and GGUF built once under --work.

    .venv/bin/python tests/probe_inputs.py --work /tmp/probe18 [--json out.json] [-k NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from tiny_models import make_tiny_smol

CLI = str(Path(sys.executable).with_name("slim-edge"))
LONG = "/tmp/" + "/".join(["d" * 250] * 17) + "/x.gguf"  # > 4096 characters


def build_fixtures(f: Path) -> None:
    """The inputs the probes point at; made once (delete --work to rebuild)."""
    from pydoc_data.topics import topics

    from slim_edge.evals.tiny_gguf import write_tiny_llama_gguf
    from slim_edge.pipeline import run_quantize
    from slim_edge.quantize import QuantConfig

    if (f / ".done").exists():
        return
    f.mkdir(parents=True, exist_ok=True)
    (f / "text.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:60_000])
    make_tiny_smol(f / "model")  # SmolLM2's tokenizer: the converter knows it, so export gets to its outputs
    run_quantize(
        str(f / "model"), QuantConfig(scheme="sherry", steps=0, calib=str(f / "text.txt")), f / "ckpt", progress=False
    )
    write_tiny_llama_gguf(f / "tiny.gguf")
    (f / "zero").write_bytes(b"")
    (f / "zero.gguf").write_bytes(b"")
    os.mkfifo(f / "fifo.gguf")
    os.symlink("loop-b.gguf", f / "loop-a.gguf")
    os.symlink("loop-a.gguf", f / "loop-b.gguf")
    (f / "dir.gguf").mkdir()
    (f / "adir").mkdir()
    for name in ("-dash.gguf", "sp ace é模型.gguf", "new\nline.gguf"):
        shutil.copy(f / "tiny.gguf", f / name)
    shutil.copytree(f / "model", f / "badcfg")
    (f / "badcfg" / "config.json").write_bytes(bytes(range(1, 256)) * 4)  # binary, no NUL
    shutil.copytree(f / "ckpt", f / "future")
    meta = json.loads((f / "future" / "quant_config.json").read_text())
    meta["slim_edge_checkpoint"] = 99
    (f / "future" / "quant_config.json").write_text(json.dumps(meta))
    (f / "ro").mkdir()
    if os.geteuid() != 0:  # root writes through mode bits: the folder is made immutable instead
        os.chmod(f / "ro", stat.S_IRUSR | stat.S_IXUSR)
    elif subprocess.run(["chattr", "+i", str(f / "ro")]).returncode:
        sys.exit("root without chattr +i: no read-only folder for the probes")
    (f / ".done").write_text("")


def probes(F: str) -> list[tuple]:
    """(name, argv after `slim-edge`, expected exit status, text the message must hold, extra env)."""
    m, ck, g, t = f"{F}/model", f"{F}/ckpt", f"{F}/tiny.gguf", f"{F}/text.txt"
    q = ["quantize", m, "--calib", t]
    qd = q + ["--dry-run"]
    e = ["eval", g, "--corpus", t, "--chunks", "1", "--ctx", "64", "--gen-tokens", "0"]
    b = ["bench", g, "-p", "8", "-n", "4", "-r", "1", "-t", "1", "--no-chat-ttft"]
    return [
        # quantize: option values
        ("q.scheme", qd + ["--scheme", "foo"], 2, "foo", {}),
        ("q.target", qd + ["--target", "q9"], 2, "q9", {}),
        ("q.steps-neg", qd + ["--steps", "-1"], 2, "-1", {}),
        ("q.batch0", qd + ["--batch-size", "0"], 2, "0", {}),
        ("q.seq0", qd + ["--seq-len", "0"], 2, "0", {}),
        ("q.lr-nan", qd + ["--lr", "nan"], 2, "nan", {}),
        ("q.distill", qd + ["--distill", "bogus"], 2, "bogus", {}),
        ("q.ptq", qd + ["--ptq", "bogus"], 2, "bogus", {}),
        ("q.bits-high", qd + ["--scheme", "seq2", "--bits", "9"], 2, "9", {}),
        ("q.emb-type", qd + ["--embedding-type", "q3"], 2, "q3", {}),
        ("q.device", qd + ["--device", "tpu"], 2, "tpu", {}),
        ("q.shard", qd + ["--shard", "zero3"], 2, "zero3", {}),
        ("q.ckpt-every0", qd + ["--checkpoint-every", "0"], 2, "0", {}),
        ("q.block-steps-neg", qd + ["--block-steps", "-1"], 2, "-1", {}),
        ("q.ptq-samples0", qd + ["--ptq", "gptq", "--ptq-samples", "0"], 2, "0", {}),
        ("q.ce-neg", qd + ["--ce-weight", "-1"], 2, "-1", {}),
        ("q.teacher-syntax", ["quantize", m, "--calib", "teacher:abc", "--dry-run"], 2, "teacher:abc", {}),
        ("q.resume+dry-run", qd + ["--resume"], 2, "--resume", {}),
        # quantize: files
        ("q.calib-missing", ["quantize", m, "--calib", "/nonexistent.txt", "--dry-run"], 2, "/nonexistent.txt", {}),
        ("q.calib-0byte", ["quantize", m, "--calib", f"{F}/zero", "--dry-run"], 2, f"{F}/zero", {}),
        ("q.calib-fifo", ["quantize", m, "--calib", f"{F}/fifo.gguf", "--dry-run"], 2, "fifo.gguf", {}),
        ("q.calib-dir", ["quantize", m, "--calib", f"{F}/adir", "--dry-run"], 2, "adir", {}),
        ("q.model-0byte", ["quantize", f"{F}/zero", "--calib", t, "--dry-run"], 2, "zero", {}),
        ("q.model-missing", ["quantize", "/nonexistent-model", "--calib", t, "--dry-run"], 2, "nonexistent-model", {}),
        ("q.model-binary-config", ["quantize", f"{F}/badcfg", "--calib", t, "--dry-run"], 2, "config.json", {}),
        ("q.future-version", ["quantize", f"{F}/future", "--calib", t, "--dry-run"], 2, "99", {}),
        # a new folder inside the input model is fine (refused: -o equal to or above the input)
        ("q.out-inside-input", q + ["--steps", "0", "-o", f"{ck}/more"], 0, "", {}),
        ("q.out-read-only", q + ["--steps", "0", "-o", f"{F}/ro/out"], 2, f"{F}/ro/out", {}),
        ("q.out-long", q + ["--steps", "0", "-o", LONG[:-5]], 2, "d" * 50, {}),
        ("q.out-is-file", q + ["--steps", "0", "-o", t], 2, t, {}),
        ("q.cache-is-file", qd, 0, "", {"SLIM_EDGE_CACHE": f"{F}/zero"}),  # a dry run needs no cache
        # export
        ("x.hf-no-type", ["export", m, "--gguf", "o.gguf"], 2, m, {}),
        ("x.type", ["export", ck, "--type", "q9", "--gguf", "o.gguf"], 2, "q9", {}),
        ("x.emb-type", ["export", ck, "--token-embedding-type", "q3", "--gguf", "o.gguf"], 2, "q3", {}),
        ("x.out-type", ["export", ck, "--output-tensor-type", "bogus", "--gguf", "o.gguf"], 2, "bogus", {}),
        ("x.tensor-type-no-eq", ["export", ck, "--tensor-type", "nothing", "--gguf", "o.gguf"], 2, "nothing", {}),
        ("x.tensor-type-regex", ["export", ck, "--tensor-type", "[=q8_0", "--gguf", "o.gguf"], 2, "[", {}),
        ("x.onnx+gguf", ["export", ck, "--onnx", "o", "--gguf", "o.gguf"], 2, "--onnx", {}),
        ("x.out-dir", ["export", ck, "--gguf", f"{F}/adir"], 2, "adir", {}),
        ("x.out-read-only", ["export", ck, "--gguf", f"{F}/ro/o.gguf"], 2, f"{F}/ro", {}),
        ("x.out-long", ["export", ck, "--gguf", LONG], 2, "d" * 50, {}),
        ("x.src-0byte", ["export", f"{F}/zero", "--gguf", "o.gguf"], 2, "zero", {}),
        ("x.future", ["export", f"{F}/future", "--gguf", "o.gguf"], 2, "99", {}),
        ("x.onnx-read-only", ["export", ck, "--onnx", f"{F}/ro/onnx"], 2, f"{F}/ro", {}),
        # inspect
        ("i.0byte", ["inspect", f"{F}/zero.gguf"], 2, "zero.gguf", {}),
        ("i.fifo", ["inspect", f"{F}/fifo.gguf"], 2, "fifo.gguf", {}),
        ("i.symlink-loop", ["inspect", f"{F}/loop-a.gguf"], 2, "loop-a.gguf", {}),
        ("i.dir", ["inspect", f"{F}/dir.gguf"], 2, "dir.gguf", {}),
        ("i.long", ["inspect", LONG], 2, "d" * 50, {}),
        ("i.runtime", ["inspect", g, "--runtime", "bogus"], 2, "bogus", {}),
        ("i.text", ["inspect", t], 2, t, {}),
        ("i.dash-name", ["inspect", "--", f"{F}/-dash.gguf"], 0, "", {}),
        ("i.unicode-space", ["inspect", f"{F}/sp ace é模型.gguf"], 0, "", {}),
        ("i.newline", ["inspect", f"{F}/new\nline.gguf"], 0, "", {}),
        # eval
        ("e.threads", e + ["--threads", "10000"], 0, "", {}),  # oversubscribed, but it runs
        ("e.chunks0", e + ["--chunks", "0"], 2, "0", {}),
        ("e.ctx1", e + ["--ctx", "1"], 2, "1", {}),
        ("e.gen-neg", e + ["--gen-tokens", "-5"], 2, "-5", {}),
        ("e.0byte", ["eval", f"{F}/zero.gguf", "--corpus", t], 2, "zero.gguf", {}),
        ("e.fifo", ["eval", f"{F}/fifo.gguf", "--corpus", t], 2, "fifo.gguf", {}),
        ("e.loop", ["eval", f"{F}/loop-a.gguf", "--corpus", t], 2, "loop-a.gguf", {}),
        ("e.corpus-0byte", e[:2] + ["--corpus", f"{F}/zero"], 2, f"{F}/zero", {}),
        ("e.corpus-fifo", e[:2] + ["--corpus", f"{F}/fifo.gguf"], 2, "fifo.gguf", {}),
        ("e.corpus-dir", e[:2] + ["--corpus", f"{F}/adir"], 2, "adir", {}),
        ("e.split", e + ["--split", "bogus"], 2, "bogus", {}),
        ("e.json-is-model", e + ["--json", g], 2, g, {}),
        ("e.json-read-only", e + ["--json", f"{F}/ro/r.json"], 2, f"{F}/ro", {}),
        ("e.json-dir", e + ["--json", f"{F}/adir"], 2, "adir", {}),
        ("e.ref-text", e + ["-r", t], 2, t, {}),
        ("e.train-text-missing", e + ["--train-text", "/nonexistent.txt"], 2, "/nonexistent.txt", {}),
        ("e.binary-config", ["eval", f"{F}/badcfg", "--corpus", t], 2, "config.json", {}),
        ("e.future", ["eval", f"{F}/future", "--corpus", t], 2, "99", {}),
        # bench
        ("b.p0", b + ["-p", "0"], 2, "0", {}),
        ("b.n-neg", b + ["-n", "-5"], 2, "-5", {}),
        ("b.t-abc", b + ["-t", "abc"], 2, "abc", {}),
        ("b.t-huge", b + ["-t", "10000", "-o", "res"], 0, "", {}),  # the device's count is not known here
        ("b.r0", b + ["-r", "0"], 2, "0", {}),
        ("b.delay-neg", b + ["--delay", "-1"], 2, "-1", {}),
        ("b.cool", b + ["--cool-to", "500"], 2, "500", {}),
        ("b.device", b + ["--device", "tpu"], 2, "tpu", {}),
        ("b.ssh-no-host", b + ["--device", "ssh"], 2, "--host", {}),
        ("b.ssh-port", b + ["--device", "ssh", "--host", "pi@127.0.0.1", "--port", "70000"], 2, "70000", {}),
        (
            "b.ssh-identity",
            b + ["--device", "ssh", "--host", "pi@127.0.0.1", "--identity", "/nonexistent-key"],
            2,
            "/nonexistent-key",
            {},
        ),
        ("b.host-with-host", b + ["--device", "host", "--host", "pi@x"], 2, "--host", {}),
        ("b.android-serial-ssh", b + ["--device", "ssh", "--host", "pi@x", "--serial", "R58"], 2, "--serial", {}),
        ("b.qemu-threads", b + ["--device", "qemu-arm64", "-t", "0"], 2, "0", {}),
        ("b.0byte", ["bench", f"{F}/zero.gguf"], 2, "zero.gguf", {}),
        ("b.baselines", b + ["--baselines", "q9"], 2, "q9", {}),
        ("b.out-read-only", b + ["-o", f"{F}/ro/res"], 2, f"{F}/ro", {}),
        ("b.compare", b + ["--compare", "q9"], 2, "q9", {}),
        # gguf retag
        ("r.0byte", ["gguf", "retag", f"{F}/zero.gguf"], 2, "zero.gguf", {}),
        ("r.fifo", ["gguf", "retag", f"{F}/fifo.gguf"], 2, "fifo.gguf", {}),
        ("r.loop", ["gguf", "retag", f"{F}/loop-a.gguf"], 2, "loop-a.gguf", {}),
        ("r.to", ["gguf", "retag", g, "--to", "999"], 2, "999", {}),
        ("r.in-place+o", ["gguf", "retag", g, "--in-place", "-o", "x.gguf"], 2, "x.gguf", {}),
        # runtime
        ("rt.target", ["runtime", "build", "--target", "bogus"], 2, "bogus", {}),
        ("rt.isa", ["runtime", "build", "--isa", "bogus"], 2, "bogus", {}),
        ("rt.jobs0", ["runtime", "build", "--jobs", "0"], 2, "0", {}),
        ("rt.tool", ["runtime", "build", "--tool", "bogus"], 2, "bogus", {}),
        ("rt.arm-arch", ["runtime", "build", "--target", "linux-arm64", "--arm-arch", "x;rm -rf /"], 2, "x;rm", {}),
        ("rt.where-target", ["runtime", "where", "--target", "bogus"], 2, "bogus", {}),
        ("rt.cache-is-file", ["runtime", "where"], 2, f"{F}/zero", {"SLIM_EDGE_CACHE": f"{F}/zero"}),
        ("rt.source-exists", ["runtime", "source", m], 2, m, {}),
        ("rt.source-read-only", ["runtime", "source", f"{F}/ro/src"], 2, f"{F}/ro", {}),
        ("rt.source-long", ["runtime", "source", LONG[:-5]], 2, "d" * 50, {}),
        # demo
        ("d.steps0", ["demo", "--steps", "0"], 2, "0", {}),
        ("d.ptq", ["demo", "--ptq", "foo"], 2, "foo", {}),
        ("d.chunks-neg", ["demo", "--eval-chunks", "-1"], 2, "-1", {}),
        ("d.out-read-only", ["demo", "-o", f"{F}/ro/demo"], 2, f"{F}/ro", {}),
        ("d.out-file", ["demo", "-o", t], 2, t, {}),
    ]


def _tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


def run_probe(name, argv, want, needle, env, fixtures: Path, scratch: Path, timeout: float) -> dict:
    cwd = scratch / name
    cwd.mkdir(parents=True)
    before = _tree(fixtures)
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            [CLI, *argv],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
            stdin=subprocess.DEVNULL,
        )
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as ex:
        rc, err = (
            "timeout",
            (ex.stderr or b"").decode(errors="replace") if isinstance(ex.stderr, bytes) else (ex.stderr or ""),
        )
    left = sorted((_tree(fixtures) - before) | _tree(cwd))
    errors = [ln for ln in err.splitlines() if ln.startswith("slim-edge: error:") or ln.startswith("Error")]
    last = err.strip().splitlines()[-1] if err.strip() else ""
    faults = []
    if rc != want:
        faults.append(f"exit {rc}, want {want}")
    if "Traceback" in err:
        faults.append("traceback")
    if want == 2 and rc == 2:
        if not (last.startswith("slim-edge: error:") or last.startswith("│") or "Error" in err):
            faults.append("no error line")
        if needle and needle not in err:
            faults.append(f"message lacks {needle!r}")
    if left and want != 0:
        faults.append(f"left {len(left)} path(s): {left[:2]}")
    return {
        "name": name,
        "argv": argv,
        "rc": rc,
        "seconds": round(time.monotonic() - t0, 1),
        "clean": not faults,
        "faults": faults,
        "message": last[:300],
        "error_lines": len(errors),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/slim-edge-probe"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("-k", default="", help="run only probes whose name contains this")
    ap.add_argument("--timeout", type=float, default=90)
    args = ap.parse_args()
    fixtures = args.work.resolve() / "fixtures"
    build_fixtures(fixtures)
    scratch = args.work.resolve() / f"runs-{int(time.time())}"
    results = []
    for name, argv, want, needle, env in probes(str(fixtures)):
        if args.k in name:
            r = run_probe(name, argv, want, needle, env, fixtures, scratch, args.timeout)
            results.append(r)
            print(
                f"{'clean' if r['clean'] else 'NOT CLEAN':9} {name:24} rc={r['rc']} {r['seconds']:5}s "
                f"{'; '.join(r['faults'])} | {r['message'][:160]}",
                flush=True,
            )
    shutil.rmtree(scratch, ignore_errors=True)
    n_clean = sum(r["clean"] for r in results)
    print(f"{len(results)} bad inputs tried, {n_clean} clean, {len(results) - n_clean} not clean")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if n_clean == len(results) else 1)


if __name__ == "__main__":
    main()
