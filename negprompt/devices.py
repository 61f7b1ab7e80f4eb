"""Device and dtype names a user gives (``auto``, ``cuda``, ``float16`` …) → torch's, with one-line errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.errors import NegpromptError

if TYPE_CHECKING:
    import torch

# Names only: the command line lists them without importing torch (see docs/architecture.md, instant CLI).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "float16", "bfloat16")  # each the name of a torch dtype


class DeviceError(NegpromptError):
    """A device or dtype this machine or torch build cannot run on."""


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | None = "auto") -> str:
    """``auto`` → ``cuda`` when ``torch.cuda.is_available()``, else ``mps`` when available, else ``cpu``.

    An explicit ``cuda`` or ``mps`` that this machine lacks is a :class:`DeviceError`.
    """
    import torch

    name = "auto" if name is None else str(name)
    if name not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {name!r}; accepted: {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "device 'cuda' is not available here (torch.cuda.is_available() is False: no CUDA GPU or a CPU-only "
            f"torch build); accepted on this machine: {', '.join(available_devices())}"
        )
    if name == "mps" and not _mps_available():
        raise DeviceError(
            f"device 'mps' is not available here (no Apple GPU); accepted on this machine: {', '.join(available_devices())}"
        )
    return name


def available_devices() -> list[str]:
    """The device names :func:`resolve_device` accepts on this machine."""
    import torch

    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if _mps_available() else [])


def torch_dtype(name: str | None = "float32") -> torch.dtype:
    """``float32`` | ``float16`` | ``bfloat16`` → the torch dtype."""
    name = "float32" if name is None else str(name)
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}")
    import torch

    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype → the name :func:`torch_dtype` accepts."""
    for name in DTYPES:
        if torch_dtype(name) == dtype:
            return name
    raise DeviceError(f"models in {dtype} are not supported; accepted dtypes: {', '.join(DTYPES)}")
