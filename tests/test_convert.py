"""rexnet-convert: the official ClovaAI checkpoint converts and matches PyTorch's logits; torch.save's
zip and legacy formats read back exactly (strides, offsets, dtypes, wrappers); every width is inferred;
bad files get one clear error and nothing in them runs.

The checkpoints here are written by a minimal torch.save writer below (no torch), which emits the same
pickle globals and persistent ids as torch/serialization.py.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import paddle
import pytest

from conftest import REPO_ROOT, shared_file
from rexnet_serving.convert import ConversionResult, convert_checkpoint, main
from rexnet_serving.models import VARIANTS, build_model, load_weights, read_state_dict
from rexnet_serving.torch_checkpoint import (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION,
                                             CheckpointError, read_torch_checkpoint)

FIXTURE = "fixtures/official_rexnetv1_1.0_seed0.pth"
FIXTURE_IO = "fixtures/official_rexnetv1_1.0_seed0_io.npz"


# --- a minimal torch.save writer ---------------------------------------------------------------------

class Global:
    """Pickled as ``GLOBAL module name``, as torch's classes and functions are."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # the pickler requires reduce functions to be callable
        raise AssertionError("never called")


class Storage:
    def __init__(self, key: str, values: np.ndarray, type_name: str = "FloatStorage",
                 raw: Optional[bytes] = None) -> None:
        self.key, self.type_name = key, type_name
        self.values = np.ascontiguousarray(values).ravel()
        self.raw = self.values.tobytes() if raw is None else raw
        self.numel = self.values.size


class StorageView:
    """A legacy-format view: ``numel`` elements of ``root`` from ``offset``, under its own key."""

    def __init__(self, root: Storage, key: str, offset: int, numel: int) -> None:
        self.root, self.key, self.offset, self.numel = root, key, offset, numel


class Tensor:
    def __init__(self, storage: Any, size: Tuple[int, ...], stride: Optional[Tuple[int, ...]] = None,
                 offset: int = 0, v3_dtype: Optional[str] = None) -> None:
        if stride is None:
            stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), stride, offset
        self.v3_dtype = v3_dtype
        self.state: Optional[Dict[str, Any]] = None


def tensor(array: np.ndarray, key: str, type_name: str = "FloatStorage") -> Tensor:
    return Tensor(Storage(key, array, type_name), array.shape)


class TorchPickler(pickle._Pickler):  # the pure-Python pickler, whose save() can be extended
    def __init__(self, file: io.BytesIO, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageView):
            root = obj.root
            return ("storage", Global("torch", root.type_name), root.key, "cpu", root.numel,
                    (obj.key, obj.offset, obj.numel))
        if isinstance(obj, Storage):
            pid = ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            args = (obj.storage, obj.offset, obj.size, obj.stride, False, OrderedDict())
            if obj.state is not None:  # a BUILD opcode after the rebuild, as a hostile file could add
                return Global("torch._utils", "_rebuild_tensor_v2"), args, obj.state
            if obj.v3_dtype:
                dtype = Global("torch", obj.v3_dtype)
                return Global("torch._utils", "_rebuild_tensor_v3"), args + (dtype,)
            return Global("torch._utils", "_rebuild_tensor_v2"), args
        return NotImplemented


def storages_of(obj: Any) -> List[Storage]:
    found: Dict[str, Storage] = {}

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            root = o.storage.root if isinstance(o.storage, StorageView) else o.storage
            found.setdefault(root.key, root)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
    walk(obj)
    return list(found.values())


def write_zip(path: Path, obj: Any, archive: str = "archive") -> Path:
    buf = io.BytesIO()
    TorchPickler(buf, legacy=False).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", "little")
        for storage in storages_of(obj):
            z.writestr(f"{archive}/data/{storage.key}", storage.raw)
        z.writestr(f"{archive}/version", "3\n")
    return path


def write_legacy(path: Path, obj: Any) -> Path:
    buf = io.BytesIO()
    for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION,
                   {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    TorchPickler(buf, legacy=True).dump(obj)
    storages = storages_of(obj)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for storage in storages:
        buf.write(struct.pack("<q", storage.numel))
        buf.write(storage.raw)
    path.write_bytes(buf.getvalue())
    return path


WRITERS = {"zip": write_zip, "legacy": write_legacy}


# --- the real official checkpoint --------------------------------------------------------------------

def test_official_checkpoint_matches_pytorch_logits(tmp_path: Path) -> None:
    src = shared_file(FIXTURE)
    io_arrays = np.load(shared_file(FIXTURE_IO))
    out = tmp_path / "ReXNet_1_0_pretrained.pdparams"
    proc = subprocess.run([sys.executable, "-m", "rexnet_serving.convert", str(src), "-o", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ReXNet_1_0" in proc.stdout and "1000" in proc.stdout and str(out) in proc.stdout

    model = build_model("ReXNet_1_0")
    assert load_weights(model, str(out), strict=True) == []
    model.eval()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(io_arrays["x"])).numpy()
    diff = float(np.abs(logits - io_arrays["logits"]).max())
    print(f"max |paddle - pytorch| logits difference: {diff:.3g}")
    assert diff <= 1e-5


# --- the formats ------------------------------------------------------------------------------------

def synthetic_checkpoint() -> Tuple[Dict[str, Tensor], Dict[str, np.ndarray]]:
    """Tensors exercising strides, offsets and dtypes, with the arrays they must read back as."""
    rng = np.random.default_rng(0)
    square = rng.standard_normal((3, 4)).astype(np.float32)
    flat = rng.standard_normal(10).astype(np.float32)
    half = rng.standard_normal((2, 3)).astype(np.float16)
    wide = rng.standard_normal(5).astype(np.float32)
    bf16 = (wide.view(np.uint32) >> 16).astype(np.uint16)
    shared = Storage("shared", flat)
    tensors = {
        "conv.weight": tensor(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "0"),
        "transposed": Tensor(Storage("1", square), (4, 3), stride=(1, 4)),
        "offset": Tensor(shared, (2, 3), stride=(3, 1), offset=4),
        "same_storage": Tensor(shared, (4,), offset=0),
        "half": tensor(half, "2", "HalfStorage"),
        "double": tensor(flat.astype(np.float64), "3", "DoubleStorage"),
        "bn.num_batches_tracked": Tensor(Storage("4", np.array([7], np.int64), "LongStorage"), ()),
        "mask": tensor(np.array([True, False, True]), "5", "BoolStorage"),
        "bfloat16": tensor(bf16, "6", "BFloat16Storage"),
        "empty": Tensor(Storage("7", np.zeros(0, np.float32)), (0, 3)),
    }
    expected = {
        "conv.weight": tensors["conv.weight"].storage.values.reshape(2, 3, 3, 3),
        "transposed": square.T,
        "offset": flat[4:10].reshape(2, 3),
        "same_storage": flat[:4],
        "half": half,
        "double": flat.astype(np.float64),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "mask": np.array([True, False, True]),
        "bfloat16": (bf16.astype(np.uint32) << 16).view(np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    return tensors, expected


def assert_same(got: Dict[str, np.ndarray], expected: Dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("wrap", ["top", "state_dict", "model", "module."])
def test_synthesized_checkpoints_read_back_exactly(tmp_path: Path, fmt: str, wrap: str) -> None:
    tensors, expected = synthetic_checkpoint()
    obj: Any = OrderedDict(tensors)
    if wrap == "module.":
        obj = OrderedDict((f"module.{k}", v) for k, v in tensors.items())
    elif wrap != "top":
        obj = {"epoch": 3, wrap: obj, "best_acc": 0.5}
    path = WRITERS[fmt](tmp_path / "ckpt.pth", obj)
    assert_same(read_torch_checkpoint(str(path)), expected)


def test_untyped_storage_with_v3_dtype(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.float32)
    raw = Storage("0", values.view(np.uint8), "UntypedStorage")
    transposed = Tensor(raw, (3, 2), stride=(1, 3), v3_dtype="float32")
    path = write_zip(tmp_path / "v3.pth", {"w": transposed})
    np.testing.assert_array_equal(read_torch_checkpoint(str(path))["w"], values.reshape(2, 3).T)


def test_legacy_storage_views(tmp_path: Path) -> None:
    flat = np.arange(12, dtype=np.float32)
    root = Storage("root", flat)
    obj = {"a": Tensor(StorageView(root, "view", 2, 8), (2, 3), offset=1), "b": Tensor(root, (12,))}
    got = read_torch_checkpoint(str(write_legacy(tmp_path / "views.pth", obj)))
    np.testing.assert_array_equal(got["a"], flat[3:9].reshape(2, 3))
    np.testing.assert_array_equal(got["b"], flat)


# --- every width ------------------------------------------------------------------------------------

def official_naming(paddle_state: Dict[str, np.ndarray]) -> "OrderedDict[str, Tensor]":
    """A Paddle state dict renamed the way ClovaAI's PyTorch model names it."""
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for i, (key, value) in enumerate(paddle_state.items()):
        module, _, leaf = key.rpartition(".")
        torch_leaf = {"_mean": "running_mean", "_variance": "running_var"}.get(leaf, leaf)
        out[f"{module}.{torch_leaf}"] = tensor(value, str(i))
        if leaf == "_variance":
            out[f"{module}.num_batches_tracked"] = Tensor(
                Storage(f"{i}n", np.array([100], np.int64), "LongStorage"), ())
    return out


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_width_inference_for_every_variant(tmp_path: Path, arch: str) -> None:
    with paddle.LazyGuard():  # names and shapes only; the values are drawn below
        model = build_model(arch, class_num=7)
    rng = np.random.default_rng(1)
    expected = {k: rng.random(v.shape, dtype=np.float32) for k, v in model.state_dict().items()}
    stem = tmp_path / f"rexnetv1_{VARIANTS[arch].width_mult}"
    src = write_zip(Path(f"{stem}.pth"), official_naming(expected))

    result = convert_checkpoint(str(src))
    assert result == ConversionResult(arch=arch, class_num=7, num_keys=len(expected),
                                      output=f"{stem}.pdparams")
    assert_same(read_state_dict(result.output), expected)


# --- bad input --------------------------------------------------------------------------------------

@pytest.fixture()
def small_checkpoint(tmp_path: Path) -> Path:
    tensors, _ = synthetic_checkpoint()
    return write_zip(tmp_path / "small.pth", OrderedDict(tensors))


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        read_torch_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_truncated_and_corrupt_files(tmp_path: Path, small_checkpoint: Path) -> None:
    data = small_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:len(data) // 2])
    expect_error(truncated, "corrupt or truncated zip")

    # flip bytes inside a stored tensor: the zip CRC catches it
    corrupt = tmp_path / "corrupt.pth"
    offset = data.index(b"archive/data/0") + len("archive/data/0") + 8
    corrupt.write_bytes(data[:offset] + bytes(b ^ 0xFF for b in data[offset:offset + 16])
                        + data[offset + 16:])
    expect_error(corrupt, "corrupt")

    tensors, _ = synthetic_checkpoint()
    legacy = write_legacy(tmp_path / "legacy.pth", OrderedDict(tensors)).read_bytes()
    for cut in (10, len(legacy) - 200):  # inside the storages, inside the object pickle
        (tmp_path / "legacy_cut.pth").write_bytes(legacy[:-cut])
        expect_error(tmp_path / "legacy_cut.pth", "truncated legacy checkpoint")


def test_random_and_empty_files(tmp_path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.pth").write_bytes(b"\x01" + noise)
    expect_error(tmp_path / "noise.pth", "not a PyTorch checkpoint")
    (tmp_path / "pickle_noise.pth").write_bytes(b"\x80\x02" + noise)
    expect_error(tmp_path / "pickle_noise.pth", "not a PyTorch checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    expect_error(tmp_path / "empty.pth", "empty file")
    expect_error(tmp_path / "missing.pth", "no such")


def test_tensor_outside_its_storage_and_no_state_dict(tmp_path: Path) -> None:
    # a hostile size/stride must not make the reader look past the storage's bytes
    outside = {"w": Tensor(Storage("0", np.zeros(4, np.float32)), (3, 3))}
    expect_error(write_zip(tmp_path / "outside.pth", outside), "tensor w", "4-element storage")
    expect_error(write_zip(tmp_path / "meta.pth", {"epoch": 1}), "no state dict", "'epoch'")
    rewritten = Tensor(Storage("0", np.zeros(4, np.float32)), (4,))
    rewritten.state = {"size": (1000,)}
    expect_error(write_zip(tmp_path / "build.pth", {"w": rewritten}), "refused to set state")


class Evil:
    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> Any:
        return self.func, (self.arg,)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("func, name", [(os.system, f"{os.system.__module__}.system"),
                                        (eval, "builtins.eval")])
def test_forbidden_globals_are_refused_unexecuted(tmp_path: Path, fmt: str, func: Any,
                                                  name: str) -> None:
    marker = tmp_path / "executed"
    payload = (f"touch {marker}" if func is os.system
               else f"open({str(marker)!r}, 'w').close()")
    tensors, _ = synthetic_checkpoint()
    obj = OrderedDict(tensors)
    obj["payload"] = Evil(func, payload)
    path = WRITERS[fmt](tmp_path / "evil.pth", obj)
    expect_error(path, f"refused to load global {name}")
    assert not marker.exists()


def test_arch_mismatch_and_misfit(tmp_path: Path) -> None:
    with paddle.LazyGuard():
        model = build_model("ReXNet_1_0", class_num=3)
    state = {k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()}
    src = write_zip(tmp_path / "r10.pth", official_naming(state))
    with pytest.raises(CheckpointError, match="is ReXNet_1_0 .*not the requested ReXNet_2_0"):
        convert_checkpoint(str(src), arch="ReXNet_2_0")
    assert not (tmp_path / "r10.pdparams").exists()

    del state["features.3.out.4.weight"]
    src = write_zip(tmp_path / "misfit.pth", official_naming(state))
    with pytest.raises(CheckpointError, match="missing key: features.3.out.4.weight"):
        convert_checkpoint(str(src))
    assert not (tmp_path / "misfit.pdparams").exists()


def test_cli_failures_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "rexnet_serving.convert", str(bad)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("rexnet-convert: error: ") and str(bad) in proc.stderr
    assert not (tmp_path / "bad.pdparams").exists()



def test_cli_usage_error_exits_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "x.pth"), "--arch", "ReXNet_9_9"])
    assert info.value.code == 2
