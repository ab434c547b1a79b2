"""GPU discovery behind a small seam, and the check of an instance's ``gpu_id``.

Everything that needs GPUs depends on the `NvmlReader` protocol, never on
``pynvml`` directly: production uses `PynvmlReader`, tests use `FakeNvml` to
pretend a machine has any number of GPUs (or none).

``GpuInfo.index`` is NVML's index, the one ``nvidia-smi`` prints. The instance
spawner passes ``gpu_id`` as ``CUDA_VISIBLE_DEVICES``; CUDA numbers devices the
same way only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (its default orders the
fastest first), and NVML ignores the manager's own ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import msgspec
import pynvml

__all__ = [
    "FakeNvml",
    "GpuInfo",
    "InvalidGpuId",
    "NvmlReader",
    "PynvmlReader",
    "validate_gpu_id",
]

logger = logging.getLogger("teisup.instances.gpus")

_T = TypeVar("_T")


class GpuInfo(msgspec.Struct, frozen=True):
    """One GPU as NVML reports it at the moment of reading."""

    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    #: ``None`` where the device or driver does not report it.
    uuid: str | None = None
    #: Percent of the last sample period in which a kernel ran.
    utilization_percent: int | None = None
    temperature_celsius: int | None = None


class NvmlReader(Protocol):
    """What the rest of teisup needs from NVML.

    ``read`` blocks (NVML is a synchronous C library; initialising it can take
    a while on a machine without the persistence daemon), so Trio code calls it
    through ``trio.to_thread.run_sync``. It never raises for a missing library,
    driver or GPU: it returns ``[]`` and says why in `unavailable_reason`.
    """

    def read(self) -> list[GpuInfo]:
        """The GPUs present now, ordered by index; ``[]`` when there are none."""
        ...

    @property
    def unavailable_reason(self) -> str | None:
        """Why the last `read` found no NVML (e.g. the library is missing), else ``None``."""
        ...


class InvalidGpuId(ValueError):
    """An instance asked for a GPU this machine does not have."""

    def __init__(self, message: str, *, gpu_id: int, valid_ids: tuple[int, ...]) -> None:
        super().__init__(message)
        self.gpu_id = gpu_id
        self.valid_ids = valid_ids


def validate_gpu_id(
    gpu_id: int | None,
    gpus: list[GpuInfo],
    *,
    unavailable_reason: str | None = None,
) -> None:
    """Raise `InvalidGpuId` unless ``gpu_id`` names one of ``gpus``.

    ``None`` (no GPU pinning) is always accepted. ``unavailable_reason`` (from
    `NvmlReader.unavailable_reason`) is quoted when there are no GPUs at all.
    """
    if gpu_id is None:
        return
    valid = tuple(sorted(gpu.index for gpu in gpus))
    if isinstance(gpu_id, bool) or gpu_id < 0:
        raise InvalidGpuId(
            f"gpu_id must be a GPU index (an integer >= 0), got {gpu_id!r}",
            gpu_id=gpu_id,
            valid_ids=valid,
        )
    if not valid:
        why = unavailable_reason or "no devices found"
        raise InvalidGpuId(
            f"gpu_id {gpu_id} requested but no GPU is available (NVML: {why})",
            gpu_id=gpu_id,
            valid_ids=valid,
        )
    if gpu_id not in valid:
        ids = ", ".join(str(i) for i in valid)
        raise InvalidGpuId(
            f"gpu_id {gpu_id} requested but this machine has {len(valid)} GPU(s); valid ids: {ids}",
            gpu_id=gpu_id,
            valid_ids=valid,
        )


class FakeNvml:
    """An `NvmlReader` that reports whatever GPUs it is given; for tests and demos.

    `gpus` may be reassigned at any time to simulate changing memory use.
    """

    def __init__(
        self, gpus: Iterable[GpuInfo] = (), *, unavailable_reason: str | None = None
    ) -> None:
        self.gpus = list(gpus)
        self._unavailable_reason = unavailable_reason
        #: How many times `read` was called.
        self.reads = 0

    @classmethod
    def with_gpus(
        cls, count: int, *, name: str = "NVIDIA Fake GPU", memory_total_bytes: int = 80 * 2**30
    ) -> FakeNvml:
        """A fake with ``count`` idle, identical GPUs numbered from 0."""
        return cls(
            GpuInfo(
                index=i,
                name=name,
                uuid=f"GPU-00000000-0000-0000-0000-{i:012d}",
                memory_total_bytes=memory_total_bytes,
                memory_used_bytes=0,
                memory_free_bytes=memory_total_bytes,
                utilization_percent=0,
                temperature_celsius=30,
            )
            for i in range(count)
        )

    @property
    def unavailable_reason(self) -> str | None:
        """The reason given at construction, reported only while there are no GPUs."""
        return None if self.gpus else self._unavailable_reason

    def read(self) -> list[GpuInfo]:
        """A copy of `gpus`."""
        self.reads += 1
        return list(self.gpus)


class PynvmlReader:
    """The real `NvmlReader`, on ``pynvml`` (package ``nvidia-ml-py``).

    NVML is initialised on the first `read` and kept open until `close`, since
    a fresh ``nvmlInit`` per reading is slow on GPUs without persistence mode.
    While NVML is unavailable every `read` retries the initialisation (a
    missing library fails in well under a millisecond), so a driver that
    appears later is picked up; the failure is logged once per distinct reason.
    Thread-safe: reads are serialised by a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialised = False
        self._unavailable_reason: str | None = None
        self._logged_reason: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        """Why the last `read` could not use NVML, or ``None``."""
        return self._unavailable_reason

    def read(self) -> list[GpuInfo]:
        """The GPUs NVML sees now; ``[]`` (never an exception) when it cannot be used."""
        with self._lock:
            try:
                if not self._initialised:
                    pynvml.nvmlInit()
                    self._initialised = True
                count = int(pynvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as exc:
                self._fail(exc)
                return []
            self._unavailable_reason = None
            gpus = []
            for index in range(count):
                gpu = self._read_device(index)
                if gpu is not None:
                    gpus.append(gpu)
            return gpus

    def close(self) -> None:
        """Shut NVML down if `read` initialised it; a later `read` initialises it again."""
        with self._lock:
            self._shutdown()

    def __enter__(self) -> PynvmlReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fail(self, exc: pynvml.NVMLError) -> None:
        # A failure after a successful init (driver unloaded, GPU lost) leaves NVML
        # half-usable; shut it down so the next read starts clean.
        self._shutdown()
        reason = f"{exc} ({type(exc).__name__})"
        self._unavailable_reason = reason
        if reason != self._logged_reason:
            self._logged_reason = reason
            logger.info("NVML unavailable, reporting no GPUs: %s", reason)

    def _shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", exc)

    def _read_device(self, index: int) -> GpuInfo | None:
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError as exc:
            # One broken GPU (e.g. fallen off the bus) must not hide the others.
            logger.warning("skipping GPU %d: NVML error %s", index, exc)
            return None
        utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        temperature = _optional(
            lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        )
        uuid = _optional(lambda: pynvml.nvmlDeviceGetUUID(handle))
        return GpuInfo(
            index=index,
            name=name,
            uuid=None if uuid is None else _text(uuid),
            memory_total_bytes=int(memory.total),
            memory_used_bytes=int(memory.used),
            memory_free_bytes=int(memory.free),
            utilization_percent=None if utilization is None else int(utilization),
            temperature_celsius=None if temperature is None else int(temperature),
        )


def _optional(read: Callable[[], _T]) -> _T | None:
    """A field some devices do not support (``NVMLError_NotSupported``) reads as ``None``."""
    try:
        return read()
    except pynvml.NVMLError:
        return None


def _text(value: Any) -> str:
    # nvidia-ml-py returns str; very old releases returned bytes.
    return value.decode() if isinstance(value, bytes) else str(value)
