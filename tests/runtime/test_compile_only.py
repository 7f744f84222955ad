"""What a compile-only build compiles for a flavor this CPU cannot run (conftest.compile_isa_sources)."""

from runtime.conftest import touched_isa_sources

from slim_edge.runtime_patches import runtime


def test_compile_only_covers_the_series_isa_code():
    patches = runtime.patch_series()
    x86 = touched_isa_sources(patches, "x86")
    # every file where the series adds AVX2/AVX-512 code (0004, 0006, 0007, 0009, 0011, 0018), no ARM file
    assert x86 == [
        "arch/x86/quants.c",
        "arch/x86/stq1_0-lut.c",
        "repack.cpp",
        "tiled/tiled-kernel.cpp",
        "tiled/tiled.cpp",
    ]
    arm = touched_isa_sources(patches, "arm")
    assert "arch/arm/quants.c" in arm and "tiled/tiled.cpp" in arm and not any("x86" in s for s in arm)
