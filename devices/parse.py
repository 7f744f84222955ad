"""Pure parsers for what devices print: getprop, /proc files, sysfs, df, adb, llama-bench.

Every function takes text and returns plain data; tests feed them the captured outputs in
devices/captured/.
"""

from __future__ import annotations

import json
import re

from slim_edge.errors import SlimEdgeError

# The CPU features that decide which llama.cpp kernels run (arm64 /proc/cpuinfo names, then x86 flags).
FEATURES_OF_INTEREST = (
    "asimd",
    "asimddp",
    "asimdhp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
    "sme",
    "sme2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_int8",
)

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


def fastest_cores(max_freqs: dict[int, int], n: int) -> list[int]:
    """The `n` cores with the highest cpuinfo_max_freq (lower index first among equals), ascending.
    Exactly `n`: llama-bench's --cpu-strict 1 gives each thread its own core of the mask, lowest
    first, so a mask with spare slower cores would put threads on those."""
    return sorted(sorted(max_freqs, key=lambda cpu: (-max_freqs[cpu], cpu))[:n])


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


def thermal_scale(raw: int) -> int:
    """Units per degree C that a thermal zone reading of `raw` is taken to be in: 1000, 10 or 1.

    |raw| >= 1000 is millidegrees (the kernel's sysfs ABI); 100 < |raw| < 1000 is tenths of a degree
    (older Qualcomm tsens drivers: msm8953's tsens_tz_sensor zones read 309 for 30.9 C, see
    devices/captured/); |raw| <= 100 is whole degrees (ADC thermistors on the same boards: xo_therm 31).
    Readings alone cannot tell 9.5 C in tenths (95) from 95 C, nor 105 C (105) from 10.5 C in tenths;
    parse_thermal settles the first from the zone's sibling sensors."""
    a = abs(raw)
    return 1000 if a >= 1000 else 10 if a > 100 else 1


def _zone_family(kind: str) -> str:
    return kind.rstrip("0123456789")  # tsens_tz_sensor12 -> tsens_tz_sensor: one driver, one unit


def parse_thermal(text: str) -> dict[str, float]:
    """Thermal zones -> {"thermal_zoneN type": degrees C}, e.g. {"thermal_zone36 cpu-1-0-usr": 42.6}.

    Reads the `N type temp` lines of base.THERMAL_COMMAND, the shape phone owners paste (temp missing
    where the read failed). Units (thermal_scale): millidegrees from 1000 up, tenths of a degree above
    100, whole degrees up to 100. Zones of one family (the type without its trailing number, e.g.
    tsens_tz_sensor) share the largest unit any of them reads in, so a cold tsens zone at 95 (9.5 C)
    beside one at 309 (30.9 C) is read in tenths too. Dropped: zones without a reading, zones that are
    not temperatures, and disconnected sensors (phones report -40000 or -40960, some kernels -273000,
    ADC thermistors -40), i.e. anything outside (-40, 150] degrees."""
    zones = {}
    for line in text.splitlines():
        m = _ZONE_LINE.match(line.strip())
        if m and m.group(3) is not None:
            zones[int(m.group(1))] = (m.group(2), int(m.group(3)))
    family_scale: dict[str, int] = {}
    for kind, raw in zones.values():
        scale = thermal_scale(raw)
        if -40 < raw / scale <= 150:  # a disconnected sensor says nothing about its family's unit
            fam = _zone_family(kind)
            family_scale[fam] = max(family_scale.get(fam, 1), scale)
    out = {}
    for zone, (kind, raw) in sorted(zones.items()):
        celsius = raw / max(thermal_scale(raw), family_scale.get(_zone_family(kind), 1))
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


EXIT_STATUS_MARKER = "__slim_rc="
# The marker line as android.with_exit_status prints it, after a newline of its own; legacy adb runs
# commands on a pty, which turns every "\n" into "\r\n".
_EXIT_STATUS_LINE = re.compile(r"\r?\n" + EXIT_STATUS_MARKER + r"(\d+)\r?(?:\n|\Z)")


def split_exit_status(stdout: str) -> tuple[str, int | None]:
    """Output of a with_exit_status command -> (the command's own output, its exit status), or
    (stdout, None) when no marker came back (the command never ran, or the connection dropped)."""
    found = list(_EXIT_STATUS_LINE.finditer(stdout))
    if not found:
        return stdout, None
    m = found[-1]
    return stdout[: m.start()] + stdout[m.end() :], int(m.group(1))


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
        if line.startswith(marker) and line[len(marker) :].strip():
            cur = line[len(marker) :].strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return {k: "\n".join(v) + ("\n" if v else "") for k, v in out.items()}
