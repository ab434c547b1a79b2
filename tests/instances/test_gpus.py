"""GPU discovery: the real NVML reader on this machine, the fake, and gpu_id checks."""

from __future__ import annotations

import logging

import msgspec
import pynvml
import pytest

from teisup.instances.gpus import (
    FakeNvml,
    GpuInfo,
    InvalidGpuId,
    NvmlReader,
    PynvmlReader,
    validate_gpu_id,
)


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    return GpuInfo(
        index=index,
        name=name,
        memory_total_bytes=80 * 2**30,
        memory_used_bytes=2**30,
        memory_free_bytes=79 * 2**30,
        utilization_percent=5,
    )


def test_real_nvml_never_raises_and_agrees_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="teisup.instances.gpus")
    with PynvmlReader() as reader:
        first = reader.read()
        second = reader.read()
    assert [g.index for g in first] == list(range(len(first)))
    assert len(second) == len(first)
    if first:  # a machine with GPUs
        assert reader.unavailable_reason is None
        assert all(g.memory_total_bytes > 0 for g in first)
    else:
        assert reader.unavailable_reason is not None
        unavailable = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
        assert len(unavailable) == 1  # logged once, not on every read


def test_real_nvml_close_without_read_is_harmless() -> None:
    reader = PynvmlReader()
    reader.close()
    reader.close()
    assert reader.unavailable_reason is None


def test_fake_reports_several_gpus() -> None:
    fake = FakeNvml.with_gpus(2)
    reader: NvmlReader = fake
    gpus = reader.read()
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].uuid != gpus[1].uuid
    assert reader.unavailable_reason is None
    assert fake.reads == 1


def test_fake_can_change_between_reads() -> None:
    fake = FakeNvml([gpu(0)])
    fake.gpus = [msgspec.structs.replace(gpu(0), memory_used_bytes=50 * 2**30)]
    assert fake.read()[0].memory_used_bytes == 50 * 2**30
    fake.read().clear()
    assert len(fake.gpus) == 1  # read returns a copy


def test_fake_without_gpus_reports_a_reason() -> None:
    fake = FakeNvml(unavailable_reason="NVML Shared Library Not Found")
    assert fake.read() == []
    assert fake.unavailable_reason == "NVML Shared Library Not Found"


def test_gpu_info_round_trips_as_json() -> None:
    info = gpu(1)
    assert msgspec.json.decode(msgspec.json.encode(info), type=GpuInfo) == info


@pytest.mark.parametrize("gpu_id", [None, 0, 1])
def test_valid_gpu_ids(gpu_id: int | None) -> None:
    validate_gpu_id(gpu_id, [gpu(0), gpu(1)])


def test_none_is_fine_without_gpus() -> None:
    validate_gpu_id(None, [])


def test_no_gpu_rejects_any_id_and_quotes_nvml() -> None:
    with pytest.raises(InvalidGpuId) as info:
        validate_gpu_id(0, [], unavailable_reason="NVML Shared Library Not Found")
    assert str(info.value) == (
        "gpu_id 0 requested but no GPU is available (NVML: NVML Shared Library Not Found)"
    )
    assert info.value.valid_ids == ()
    with pytest.raises(InvalidGpuId, match=r"no GPU is available \(NVML: no devices found\)"):
        validate_gpu_id(3, [])


def test_out_of_range_names_the_valid_ids() -> None:
    with pytest.raises(InvalidGpuId) as info:
        validate_gpu_id(2, [gpu(1), gpu(0)])
    assert str(info.value) == "gpu_id 2 requested but this machine has 2 GPU(s); valid ids: 0, 1"
    assert info.value.gpu_id == 2
    assert info.value.valid_ids == (0, 1)


def test_ids_follow_the_nvml_indices_not_the_list_positions() -> None:
    gpus = [gpu(0), gpu(2)]  # GPU 1 could not be read
    validate_gpu_id(2, gpus)
    with pytest.raises(InvalidGpuId, match="valid ids: 0, 2"):
        validate_gpu_id(1, gpus)


@pytest.mark.parametrize("gpu_id", [-1, True])
def test_negative_or_bool_rejected(gpu_id: int) -> None:
    with pytest.raises(InvalidGpuId, match="integer >= 0"):
        validate_gpu_id(gpu_id, [gpu(0)])


def test_invalid_gpu_id_is_a_value_error() -> None:
    assert issubclass(InvalidGpuId, ValueError)


class _Memory:
    total, used, free = 16 * 2**30, 2**30, 15 * 2**30


class _Utilization:
    gpu, memory = 42, 7


class _StubNvml:
    """Stands in for the NVML C library under pynvml's functions, to drive PynvmlReader."""

    def __init__(self, count: int, broken: frozenset[int] = frozenset()) -> None:
        self.count, self.broken = count, broken
        self.inits = self.shutdowns = 0
        self.count_error: pynvml.NVMLError | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetUUID",
        ):
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise self.count_error
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.broken:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"Stub GPU"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        return _Memory()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Utilization:
        return _Utilization()

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle}"


def test_real_reader_maps_devices_and_skips_a_broken_one(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubNvml(count=3, broken=frozenset({1}))
    stub.install(monkeypatch)
    reader = PynvmlReader()
    gpus = reader.read()
    assert gpus == [
        GpuInfo(0, "Stub GPU", 16 * 2**30, 2**30, 15 * 2**30, "GPU-0", 42, None),
        GpuInfo(2, "Stub GPU", 16 * 2**30, 2**30, 15 * 2**30, "GPU-2", 42, None),
    ]
    reader.read()
    assert stub.inits == 1  # NVML stays initialised between reads
    reader.close()
    assert stub.shutdowns == 1


def test_real_reader_recovers_after_nvml_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubNvml(count=1)
    stub.install(monkeypatch)
    reader = PynvmlReader()
    stub.count_error = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert reader.read() == []
    failed_reason = reader.unavailable_reason
    assert failed_reason is not None
    assert stub.shutdowns == 1  # the half-usable session was shut down
    stub.count_error = None
    assert len(reader.read()) == 1
    assert reader.unavailable_reason is None
    assert stub.inits == 2
