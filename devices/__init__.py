"""Devices to benchmark on, keyed by `--device`: one small module per device."""

from __future__ import annotations

from slim_edge.errors import SlimEdgeError

from .base import Device, DeviceInfo, RunResult

# --device value -> module in this package (the module holds one Device subclass).
DEVICES = {
    "host": ("host", "HostDevice"),
    "android": ("android", "AndroidDevice"),
    "ssh": ("ssh", "SshDevice"),
    "qemu-arm64": ("qemu_arm64", "QemuArm64Device"),
}


def get_device(name: str, **options) -> Device:
    """Build the device `name` with its options (serial=, host=, port=, identity=...).
    Options a device does not take are ignored, so one CLI can pass them all."""
    import importlib
    import inspect

    if name not in DEVICES:
        raise SlimEdgeError(f"Unknown device {name!r}. Choose one of: {', '.join(DEVICES)}.")
    module, cls_name = DEVICES[name]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = ["DEVICES", "Device", "DeviceInfo", "RunResult", "get_device"]
