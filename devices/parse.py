"""Pure parsers for what devices print: getprop, /proc files, sysfs, df, adb, llama-bench.

Every function takes text and returns plain data; tests feed them the captured outputs in
devices/captured/.
"""

from __future__ import annotations

import json
import re

from slim_edge.errors import SlimEdgeError

# The CPU features that decide which llama.cpp kernels run (arm64 /proc/cpuinfo names, then x86 flags).
FEATURES_OF_INTEREST = ("asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "sme", "sme2",
                        "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                        "avx512_vnni", "avx512_bf16", "amx_int8")

_GETPROP_LINE = re.compile(r"^\[([^\]]+)\]: \[(.*)\]\s*$")


def parse_getprop(text: str) -> dict[str, str]:
    """`getprop` dump (`[key]: [value]` per line) -> {key: value}; other lines are skipped."""
    props = {}
    for line in text.splitlines():
        m = _GETPROP_LINE.match(line.strip())
        if m:
            props[m.group(1)] = m.group(2)
    return props


def soc_name(props: dict[str, str]) -> str:
    """The most specific SoC name Android reports: ro.soc.model, else ro.board.platform."""
    model = props.get("ro.soc.model", "")
    maker = props.get("ro.soc.manufacturer", "")
    if model:
        return f"{maker} {model}".strip()
    return props.get("ro.board.platform", "") or props.get("ro.hardware", "") or "unknown"


def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo -> {"cpus": [{"processor", "features", "part", ...}], "features": common set,
    "hardware": str}. Works for arm64 (Features, CPU part) and x86 (flags, model name)."""
    cpus: list[dict] = []
    hardware = ""
    cur: dict | None = None
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            cur = {"processor": int(value)}
            cpus.append(cur)
        elif key == "hardware":
            hardware = value
        elif cur is None:
            continue
        elif key in ("features", "flags"):
            cur["features"] = value.split()
        elif key == "cpu part":
            cur["part"] = value
        elif key == "cpu implementer":
            cur["implementer"] = value
        elif key == "model name":
            cur["model_name"] = value
    sets = [set(c.get("features", [])) for c in cpus]
    common = sorted(set.intersection(*sets)) if sets else []
    return {"cpus": cpus, "features": common, "hardware": hardware}


def features_of_interest(features: list[str]) -> list[str]:
    """The subset of `features` that select kernels (dotprod, i8mm, SVE, SME...), in a fixed order."""
    have = set(features)
    return [f for f in FEATURES_OF_INTEREST if f in have]


def parse_sysfs_grep(text: str) -> dict[str, str]:
    """`grep . FILE...` output (`path:value` per line) -> {path: value}."""
    out = {}
    for line in text.splitlines():
        path, sep, value = line.partition(":")
        if sep and path.startswith("/"):
            out[path] = value.strip()
    return out


_CPU_IN_PATH = re.compile(r"/cpu(\d+)/")


def parse_max_freqs(text: str) -> dict[int, int]:
    """`grep . /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq` -> {cpu index: kHz}."""
    freqs = {}
    for path, value in parse_sysfs_grep(text).items():
        m = _CPU_IN_PATH.search(path)
        if m and path.endswith("cpuinfo_max_freq") and value.isdigit():
            freqs[int(m.group(1))] = int(value)
    return dict(sorted(freqs.items()))


def big_cores(max_freqs: dict[int, int], n_threads: int = 1) -> list[int]:
    """The fastest cores to pin `n_threads` threads to: whole clusters (cores sharing a max
    frequency), fastest first, until there are at least `n_threads` cores."""
    if not max_freqs:
        return []
    chosen: list[int] = []
    for freq in sorted(set(max_freqs.values()), reverse=True):
        chosen += [cpu for cpu, f in max_freqs.items() if f == freq]
        if len(chosen) >= n_threads:
            break
    return sorted(chosen)


def cpu_mask(cpus: list[int]) -> str:
    """CPU indices -> the hex mask llama-bench `-C` and `taskset` take (e.g. [4, 5, 6, 7] -> "0xf0")."""
    mask = 0
    for cpu in cpus:
        mask |= 1 << cpu
    return hex(mask)


# Zones that are not temperatures: Qualcomm's battery-current-limiter zones report millivolts (vbat, vph),
# milliamps (ibat), a trip level (bcl) or the battery's state of charge (soc, socd); seen on SM4375 and SM8250.
_NOT_TEMPERATURE = re.compile(r"bcl|ibat|vbat|vph|^socd?$", re.IGNORECASE)
_ZONE_LINE = re.compile(r"^(\d+)\s+(.+?)(?:\s+(-?\d+))?\s*$")


def parse_thermal(text: str) -> dict[str, float]:
    """Thermal zones -> {"thermal_zoneN type": degrees C}, e.g. {"thermal_zone36 cpu-1-0-usr": 42.6}.

    Reads the `N type temp` lines of base.THERMAL_COMMAND, the shape phone owners paste (temp missing
    where the read failed). Values of 1000 and more are millidegrees, as the kernel ABI says; smaller
    ones are taken as degrees. Dropped: zones without a reading, zones that are not temperatures, and
    disconnected sensors (phones report -40000 or -40960, some kernels -273000), i.e. anything outside
    (-40, 150] degrees."""
    zones = {}
    for line in text.splitlines():
        m = _ZONE_LINE.match(line.strip())
        if m and m.group(3) is not None:
            zones[int(m.group(1))] = (m.group(2), int(m.group(3)))
    out = {}
    for zone, (kind, raw) in sorted(zones.items()):
        celsius = raw / 1000 if abs(raw) >= 1000 else float(raw)
        if -40 < celsius <= 150 and not _NOT_TEMPERATURE.search(kind):
            out[f"thermal_zone{zone} {kind}"] = round(celsius, 1)
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: kB}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w[\w()]*):\s+(\d+)(?:\s+kB)?\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def parse_df_available_kb(text: str) -> int:
    """`df -k PATH` (POSIX columns: Filesystem 1K-blocks Used Available Use% Mounted on) -> the
    Available column of the last row, in kB."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise SlimEdgeError(f"Could not read free space from df output {text!r}: expected a header and a row.")
    header = lines[0].split()
    col = next((i for i, h in enumerate(header) if h.lower() in ("available", "avail", "free")), 3)
    # A long filesystem name can wrap onto its own line; count columns from the right then.
    fields = " ".join(lines[1:]).split()
    from_right = len(header) - col - (1 if "on" in (h.lower() for h in header) else 0)
    try:
        return int(fields[-from_right])
    except (ValueError, IndexError):
        raise SlimEdgeError(f"Could not read free space from df output {text!r}: no number in the Available column.")


def parse_adb_devices(text: str) -> list[tuple[str, str]]:
    """`adb devices` -> [(serial, state)], state as adb prints it (device, unauthorized, offline...)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("*") or line.lower().startswith("list of devices"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            out.append((parts[0], parts[1]))
    return out


def parse_sha256sum(text: str) -> dict[str, str]:
    """`sha256sum FILE...` -> {file name (basename): hex digest}; missing files are simply absent."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]{64})\s+\*?(.+)$", line.strip())
        if m:
            out[m.group(2).rsplit("/", 1)[-1]] = m.group(1)
    return out


_RSS_PATTERNS = (
    ("VmHWM", re.compile(r"SLIM_EDGE_VMHWM_KB=(\d+)")),
    ("GNU time -v", re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")),
)


def parse_peak_rss_kb(stderr: str) -> tuple[int | None, str | None]:
    """Peak memory reported on stderr by our VmHWM poller or GNU `time -v` -> (kB, which)."""
    for name, pattern in _RSS_PATTERNS:
        found = pattern.findall(stderr)
        if found and int(found[-1]) > 0:
            return int(found[-1]), name
    return None, None


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench `-o jsonl` (one object per line) or `-o json` (one array) -> list of rows.

    Lines that are not JSON are skipped: backends log to the console before the results (a Galaxy S26
    build prints nine OpenCL/Hexagon lines ahead of the array, see devices/captured/)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")]
    decoder = json.JSONDecoder()
    for i in starts:
        try:
            rows, _ = decoder.raw_decode("".join(lines[i:]).lstrip())
        except json.JSONDecodeError:
            continue  # a log line that happens to start with "["
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            return rows
    rows = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows and any(lines[i].strip() == "[" or lines[i].lstrip().startswith("[{") for i in starts):
        raise SlimEdgeError("llama-bench printed a JSON array that does not parse (cut short?); rerun with -o jsonl.")
    return rows


def parse_sections(text: str, marker: str = "@@") -> dict[str, str]:
    """Split the output of one probe script into its sections (`@@name` lines start one)."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        if line.startswith(marker) and line[len(marker):].strip():
            cur = line[len(marker):].strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return {k: "\n".join(v) + ("\n" if v else "") for k, v in out.items()}
