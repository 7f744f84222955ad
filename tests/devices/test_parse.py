"""Every parser on captured output of real devices (devices/captured/), exact values."""

import pytest

from slim_edge.devices import parse
from slim_edge.devices.base import PROBE_SCRIPT, info_from_probe
from slim_edge.errors import SlimEdgeError
from slim_edge.evals.bench import summarize_rows


def test_getprop_snapdragon_8_gen_3(captured):
    props = parse.parse_getprop(captured("getprop_sm8650_oneplus12.txt"))
    assert props["ro.soc.model"] == "SM8650"
    assert props["ro.board.platform"] == "pineapple"
    assert props["ro.product.model"] == "PJD110"
    assert props["ro.build.version.release"] == "15"
    assert props["ro.product.cpu.abi"] == "arm64-v8a"
    assert parse.soc_name(props) == "QTI SM8650"
    assert len(props) == 14


def test_getprop_dimensity_8100(captured):
    props = parse.parse_getprop(captured("getprop_mt6895_realme_gt_neo3.txt"))
    assert parse.soc_name(props) == "Mediatek MT6895"
    assert props["ro.product.cpu.abilist"] == "arm64-v8a,armeabi-v7a,armeabi"
    assert props["ro.build.version.release"] == "12"
    assert props["dalvik.vm.isa.arm64.variant"] == "cortex-a55"


def test_soc_name_falls_back_to_board_platform():
    assert parse.soc_name({"ro.board.platform": "kalama"}) == "kalama"
    assert parse.soc_name({}) == "unknown"


def test_cpuinfo_sm8550(captured):
    info = parse.parse_cpuinfo(captured("cpuinfo_sm8550.txt"))
    assert [c["processor"] for c in info["cpus"]] == list(range(8))
    # Cortex-A510 x3, A715 x2, A710 x2, X3 x1
    assert [c["part"] for c in info["cpus"]] == ["0xd46"] * 3 + ["0xd4d"] * 2 + ["0xd47"] * 2 + ["0xd4e"]
    assert "i8mm" in info["features"] and "asimddp" in info["features"] and "sve" not in info["features"]
    assert len(info["features"]) == 36
    assert parse.features_of_interest(info["features"]) == ["asimd", "asimddp", "asimdhp", "i8mm"]


def test_cpuinfo_pixel8_has_sve2(captured):
    info = parse.parse_cpuinfo(captured("cpuinfo_pixel8_tensor_g3.txt"))
    assert len(info["cpus"]) == 9
    assert info["cpus"][8]["part"] == "0xd4e"
    assert parse.features_of_interest(info["features"]) == ["asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2"]


def test_cpuinfo_sdm845_has_no_dotprod(captured):
    info = parse.parse_cpuinfo(captured("cpuinfo_galaxy_s9_sdm845.txt"))
    assert info["hardware"] == "Qualcomm Technologies, Inc SDM845"
    assert parse.features_of_interest(info["features"]) == ["asimd", "asimdhp"]


def test_max_freqs_and_big_core_mask_pixel8(captured):
    freqs = parse.parse_max_freqs(captured("cpufreq_pixel8_tensor_g3.txt"))
    assert freqs == {
        0: 1704000,
        1: 1704000,
        2: 1704000,
        3: 1704000,
        4: 2367000,
        5: 2367000,
        6: 2367000,
        7: 2367000,
        8: 2914000,
    }
    assert parse.big_cores(freqs, 1) == [8]
    assert parse.cpu_mask(parse.big_cores(freqs, 1)) == "0x100"
    assert parse.big_cores(freqs, 2) == [4, 5, 6, 7, 8]
    assert parse.cpu_mask(parse.big_cores(freqs, 4)) == "0x1f0"
    assert parse.big_cores(freqs, 6) == list(range(9))


def test_max_freqs_and_big_core_mask_sdm845(captured):
    freqs = parse.parse_max_freqs(captured("cpufreq_galaxy_s9_sdm845.txt"))
    assert set(freqs.values()) == {1766400, 2803200}
    assert parse.big_cores(freqs, 4) == [4, 5, 6, 7]
    assert parse.cpu_mask([4, 5, 6, 7]) == "0xf0"
    assert parse.big_cores({}, 2) == []


def test_thermal_zones_motorola_sm4375(captured):
    zones = parse.parse_thermal(captured("thermal_moto_sm4375.txt"))
    # 93 zones: 6 gave no reading, 7 are not temperatures (ibat x2, bcl x3, socd, vbat), 3 are disconnected
    # sensors (-40000, -40960 x2)
    assert len(zones) == 77
    assert max(zones.items(), key=lambda kv: kv[1]) == ("thermal_zone36 cpu-1-0-usr", 42.6)
    assert [v for k, v in zones.items() if "-usr" in k and " cpu-" in k] == [
        39.1,
        38.7,
        38.0,
        38.4,
        38.0,
        38.7,
        42.6,
        41.1,
        42.2,
        40.7,
    ]  # 6 little-core sensors, 4 on the 2 big cores
    assert zones["thermal_zone3 modem-lte-sub6-pa1"] == 27.0
    assert zones["thermal_zone67 pm7250b_tz"] == 30.7
    assert zones["thermal_zone89 qcom_battery"] == zones["thermal_zone92 battery"] == 29.7
    assert zones["thermal_zone90 front_temp"] == 32.4 and zones["thermal_zone91 back_temp"] == 32.5
    for gone in (
        "thermal_zone0 modem-mmw-pa1-step",
        "thermal_zone20 modem-mmw-pa1-usr",  # no reading
        "thermal_zone68 pm7250b-ibat-lvl0",
        "thermal_zone70 pm7250b-bcl-lvl0",  # mA, trip level
        "thermal_zone73 socd",
        "thermal_zone88 vbat",  # state of charge, mV
        "thermal_zone74 conn-therm-usr",
        "thermal_zone85 qtm_n_therm",
    ):  # -40000, -40960
        assert gone not in zones


def _msm8953_zone_lines(captured) -> tuple[str, dict[str, int]]:
    """The msm8953 capture as THERMAL_COMMAND's `N type temp` lines, and {sensor: units per degree} from
    msm_thermal's sensor_info. Its `cat */temp` and `cat */type` ran in glob order: 0 1 10 11 ... 2 20 ..."""
    s = parse.parse_sections(captured("thermal_msm8953.txt"))
    temps, types = s["temp"].split(), s["type"].split()
    zones = sorted(range(len(temps)), key=str)
    lines = "".join(f"{z} {kind} {t}\n" for z, kind, t in zip(zones, types, temps))
    units = {f[1]: int(f[3]) for f in (ln.split(":") for ln in s["sensor_info"].splitlines())}
    return lines, units


def test_thermal_zones_msm8953_three_scales(captured):
    lines, units = _msm8953_zone_lines(captured)
    zones = parse.parse_thermal(lines)
    assert len(zones) == 23  # 24 zones; pa_therm1 reads -40, a disconnected thermistor
    # tenths of a degree (tsens), whole degrees (ADC thermistors), millidegrees (PMIC, battery, charger)
    assert [v for k, v in zones.items() if "tsens_tz_sensor" in k] == [  # sensors 1-15 in zones 6-20
        30.6,
        30.6,
        30.6,
        32.2,
        30.9,
        30.9,
        31.3,
        32.2,
        30.9,
        30.6,
        30.9,
        31.9,
        31.3,
        30.3,
        30.6,
    ]
    assert zones["thermal_zone20 tsens_tz_sensor15"] == 30.6 and zones["thermal_zone9 tsens_tz_sensor4"] == 32.2
    assert zones["thermal_zone2 xo_therm"] == 31.0 and zones["thermal_zone22 pa_therm0"] == 30.0
    assert zones["thermal_zone4 case_therm"] == 7.0
    assert zones["thermal_zone21 pm8953_tz"] == 32.6 and zones["thermal_zone5 chg_temp"] == 24.6
    assert zones["thermal_zone0 bms"] == zones["thermal_zone23 battery"] == 25.0
    assert "thermal_zone1 pa_therm1" not in zones
    # the unit guessed from each reading is the one the driver declares in sensor_info
    raw = {kind: int(t) for _, kind, t in (ln.split() for ln in lines.splitlines())}
    assert {name: parse.thermal_scale(raw[name]) for name in units if name in raw} == {
        name: u for name, u in units.items() if name in raw
    }
    assert len([n for n in units if n in raw]) == 21  # tsens 1-15, pm8953_tz, 5 ADC thermistors


def test_thermal_scale_edges_synthetic():
    """Synthetic readings (not captured) for the cases the rule has to settle."""
    assert [parse.thermal_scale(r) for r in (42600, 1000, 999, 309, 101, 100, 31, 0, -40, -400, -40000)] == [
        1000,
        1000,
        10,
        10,
        10,
        1,
        1,
        1,
        1,
        10,
        1000,
    ]
    zones = parse.parse_thermal(
        "0 tsens_tz_sensor0 309\n1 tsens_tz_sensor1 95\n"  # a cold sensor beside a warm one: both tenths
        "2 cpu-0-0-usr 38000\n3 cpu-0-1-usr 500\n"  # separate families: 500 alone reads as tenths
        "4 pa_therm0 95\n"  # whole degrees when nothing says otherwise
        "5 tsens_tz_sensor2 -400\n6 skin-therm 1520\n"
    )  # -40.0 in tenths: disconnected; 1.5 C in millidegrees
    assert zones == {
        "thermal_zone0 tsens_tz_sensor0": 30.9,
        "thermal_zone1 tsens_tz_sensor1": 9.5,
        "thermal_zone2 cpu-0-0-usr": 38.0,
        "thermal_zone3 cpu-0-1-usr": 50.0,
        "thermal_zone4 pa_therm0": 95.0,
        "thermal_zone6 skin-therm": 1.5,
    }
    # a family reading in millidegrees keeps a sub-degree sibling in millidegrees
    assert parse.parse_thermal("7 xo-therm0 27000\n8 xo-therm1 500\n") == {
        "thermal_zone7 xo-therm0": 27.0,
        "thermal_zone8 xo-therm1": 0.5,
    }


def test_meminfo(captured):
    mem = parse.parse_meminfo(captured("meminfo_devvm.txt"))
    assert mem == {
        "MemTotal": 24683656,
        "MemFree": 19792532,
        "MemAvailable": 22144068,
        "Buffers": 93624,
        "Cached": 2319236,
    }


def test_df(captured):
    assert parse.parse_df_available_kb(captured("df_devvm.txt")) == 80215684
    wrapped = (
        "Filesystem     1K-blocks     Used Available Use% Mounted on\n/dev/block/dm-50\n"
        "               230481612 61236408 169114132  27% /data\n"
    )
    assert parse.parse_df_available_kb(wrapped) == 169114132
    with pytest.raises(SlimEdgeError, match="df output"):
        parse.parse_df_available_kb("df: /nowhere: No such file or directory\n")


def test_adb_devices(captured):
    assert parse.parse_adb_devices(captured("adb_devices_unauthorized.txt")) == [("R58M41XYZ12", "unauthorized")]
    assert parse.parse_adb_devices(captured("adb_devices_none.txt")) == []
    assert parse.parse_adb_devices(captured("adb_devices_two.txt")) == [
        ("R58M41XYZ12", "device"),
        ("emulator-5554", "device"),
    ]
    assert (
        parse.parse_adb_devices(
            "* daemon not running; starting now at tcp:5037\n* daemon started successfully\nList of devices attached\n"
        )
        == []
    )


def test_sha256sum():
    text = (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  "
        "/data/local/tmp/slim-edge/models/a.gguf\n"
        "sha256sum: /data/local/tmp/slim-edge/models/b.gguf: No such file or directory\n"
    )
    assert parse.parse_sha256sum(text) == {"a.gguf": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}


def test_peak_rss():
    assert parse.parse_peak_rss_kb("noise\nSLIM_EDGE_VMHWM_KB=123456\n") == (123456, "VmHWM")
    gnu = "\tMaximum resident set size (kbytes): 98765\n\tAverage resident set size (kbytes): 0\n"
    assert parse.parse_peak_rss_kb(gnu) == (98765, "GNU time -v")
    assert parse.parse_peak_rss_kb("SLIM_EDGE_VMHWM_KB=0\n") == (None, None)


def test_llama_bench_json_galaxy_s26(captured):
    # -o json as the phone printed it: backend log lines first, then the array
    rows = parse.parse_llama_bench(captured("llama_bench_json_galaxy_s26_sm8850_htp.txt"))
    assert [(r["n_prompt"], r["n_gen"], r["avg_ts"]) for r in rows] == [(1024, 0, 4190.935295), (0, 256, 77.197416)]
    assert {r["model_type"] for r in rows} == {"qwen3 0.6B Q4_K - Medium"}
    assert rows[0]["backends"] == "OpenCL,HTP" and rows[0]["gpu_info"] == "QUALCOMM Adreno(TM) 840, Hexagon"
    assert rows[0]["build_number"] == 11469 and rows[0]["n_threads"] == 4
    assert rows[1]["samples_ts"] == [77.2815, 77.4307, 77.0974, 76.6359, 77.5415]
    prefill, decode = summarize_rows(rows)
    assert prefill[0]["n_prompt"] == 1024 and prefill[0]["ttft_ms_mean"] == pytest.approx(244.49, abs=0.01)
    assert decode[0]["tps_mean"] == 77.197416


def test_llama_bench_cut_short(captured):
    text = captured("llama_bench_json_galaxy_s26_sm8850_htp.txt")
    with pytest.raises(SlimEdgeError, match="does not parse"):
        parse.parse_llama_bench(text[: len(text) // 2])
    assert parse.parse_llama_bench("[Start thinking]\n") == []


def test_sections_and_probe_on_captured_phone(captured):
    text = "\n".join(
        [
            "@@uname",
            "aarch64",
            "@@getprop",
            captured("getprop_sm8650_oneplus12.txt"),
            "@@cpuinfo",
            captured("cpuinfo_pixel8_tensor_g3.txt"),
            "@@maxfreq",
            captured("cpufreq_pixel8_tensor_g3.txt"),
            "@@thermal",
            captured("thermal_moto_sm4375.txt"),
            "@@meminfo",
            captured("meminfo_devvm.txt"),
            "@@df",
            captured("df_devvm.txt"),
            "@@time",
            "",
            "@@nproc",
            "9",
        ]
    )
    info = info_from_probe("android", text)
    assert info.arch == "aarch64"
    assert info.soc == "QTI SM8650"
    assert info.model == "OnePlus PJD110"
    assert info.android_version == "15"
    assert info.abi == "arm64-v8a"
    assert info.n_cpus == 9
    assert info.big_cores == [8]
    assert len(info.thermal_c) == 77 and info.thermal_c["thermal_zone36 cpu-1-0-usr"] == 42.6
    assert info.mem_available_kb == 22144068
    assert info.storage_available_kb == 80215684
    assert "sve2" in info.cpu_features_of_interest
    assert not info.has_gnu_time and not info.emulated
    assert "@@getprop" in PROBE_SCRIPT and "cpuinfo_max_freq" in PROBE_SCRIPT and "{thermal}" in PROBE_SCRIPT


def test_cpuinfo_dimensity_7300(captured):
    """A Dimensity phone (no Hardware line on newer kernels, ' : ' separators as Termux prints them)."""
    info = parse.parse_cpuinfo(captured("cpuinfo_dimensity7300_partial.txt"))
    assert [c["processor"] for c in info["cpus"]] == [0, 1, 2, 3, 4]
    assert [c["part"] for c in info["cpus"]] == ["0xd05"] * 4 + ["0xd41"]  # Cortex-A55 x4, Cortex-A78
    assert len(info["features"]) == 16
    assert parse.features_of_interest(info["features"]) == ["asimd", "asimddp", "asimdhp"]
