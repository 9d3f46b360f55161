"""Read PyTorch checkpoints (``torch.save`` files) as NumPy arrays, without torch and without running code.

Implements the two on-disk formats of ``torch.save`` (torch/serialization.py, ``_load`` and
``_legacy_load``):

* zip (torch >= 1.6): ``<archive>/data.pkl`` is a pickle whose persistent ids
  ``('storage', storage_type, key, location, numel)`` point at raw storages ``<archive>/data/<key>``,
  in the byte order named by ``<archive>/byteorder`` (little when absent);
* legacy (torch < 1.6): five consecutive pickles/blocks in one stream: the magic number
  0x1950a86a20f9469cfc6c, the protocol version 1001, a sys_info dict, the object (persistent ids
  ``('storage', storage_type, root_key, location, numel, view_metadata)``), the list of storage keys,
  then per key an int64 element count followed by the raw elements.

Tensors are rebuilt as torch does (``torch._utils._rebuild_tensor_v2``/``_v3``): a strided view of
the storage starting at the storage offset, copied out. Unpickling goes through an allow-list: a
checkpoint is data, so any global other than the handful a state dict needs is refused by name, before
anything could be called.
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from rexnet_serving.models.weights import WeightsError

# Storage classes torch pickles by name (torch/storage.py, ``_dtype_to_storage_type_map``), as
# little-endian NumPy dtypes; BFloat16 has no NumPy type and is widened to float32 after reading.
STORAGE_DTYPES: Dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
    # torch >= 2.0 may pickle an untyped (byte) storage; _rebuild_tensor_v3 then names the dtype.
    "UntypedStorage": "u1",
}

# torch dtypes as pickled globals (``torch float32``), used by _rebuild_tensor_v3.
TORCH_DTYPES: Dict[str, str] = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "?",
    "complex64": "<c8", "complex128": "<c16",
}

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001
ZIP_SIGNATURE = b"PK\x03\x04"
STATE_DICT_WRAPPERS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."


class CheckpointError(WeightsError):
    """A PyTorch checkpoint that cannot be read or converted; the message names the file and problem."""


class _Sealed:
    """Objects the unpickler hands out: a pickle's BUILD opcode must not rewrite their fields."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"refused to set state on a {type(self).__name__.lstrip('_')}")


class _DType(_Sealed):
    """A storage class or torch dtype named in the pickle; only ever a value, never called."""

    __slots__ = ("name", "numpy", "is_bfloat16")

    def __init__(self, name: str, numpy_dtype: str) -> None:
        self.name = name
        self.numpy = np.dtype(numpy_dtype)
        self.is_bfloat16 = name in ("BFloat16Storage", "bfloat16")

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _StorageRef(_Sealed):
    """A storage named by a persistent id; its bytes are attached by the format reader."""

    __slots__ = ("dtype", "key", "numel", "data", "order", "base", "base_offset")

    def __init__(self, dtype: _DType, key: str, numel: int) -> None:
        self.dtype = dtype
        self.key = key
        self.numel = numel
        self.data: Optional[np.ndarray] = None  # 1-D, in ``dtype.numpy`` (file byte order)
        self.order = "<"  # the file's byte order, for reinterpreting untyped storages
        self.base: Optional["_StorageRef"] = None  # legacy views: a slice of another storage
        self.base_offset = 0


class _TensorRef(_Sealed):
    """Arguments of a tensor rebuild, turned into an array once all storages are present."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype", "metadata")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any,
                 dtype: Optional[_DType] = None, metadata: Any = None) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.dtype = dtype
        self.metadata = metadata


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, metadata: Any = None) -> _TensorRef:
    return _TensorRef(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> _TensorRef:
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v3 got {dtype!r} where a torch dtype belongs")
    return _TensorRef(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    return data  # an nn.Parameter is its tensor as far as weights are concerned


_ALLOWED_FUNCTIONS: Dict[Tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs, to local stand-ins; refuses the rest."""

    def __init__(self, file: BinaryIO, path: str,
                 persistent_load: Optional[Callable[[Any], Any]] = None) -> None:
        super().__init__(file)
        self._path = path
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, mapped as pickle's own find_class does, so that messages name the real global.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            if name in STORAGE_DTYPES:
                return _DType(name, STORAGE_DTYPES[name])
            raise CheckpointError(f"{self._path}: unsupported tensor storage torch.{name} (readable: "
                                  f"{', '.join(sorted(STORAGE_DTYPES))})")
        if module == "torch" and name in TORCH_DTYPES:
            return _DType(name, TORCH_DTYPES[name])
        raise CheckpointError(f"{self._path}: refused to load global {module}.{name}: a weights "
                              f"checkpoint may only reference tensors and OrderedDict (nothing in it "
                              f"was executed)")

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id outside the object pickle")
        return self._persistent(pid)


def _unpickle(data: BinaryIO, path: str,
              persistent_load: Optional[Callable[[Any], Any]] = None) -> Any:
    return _RestrictedUnpickler(data, path, persistent_load).load()


def _storage_id(pid: Any, path: str, length: int) -> Tuple[_DType, str, int, Any]:
    """Validate a ``('storage', type, key, location, numel, ...)`` id; return type, key, numel, rest."""
    if not isinstance(pid, tuple) or len(pid) != length:
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        raise CheckpointError(f"{path}: holds a pickled {typename!r} record; only tensors are "
                              f"supported (was the whole model saved instead of its state_dict?)")
    dtype, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(dtype, _DType) or not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"malformed storage id {pid!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    return dtype, key, numel, pid[5:]


# --- the zip format ---------------------------------------------------------------------------------

def _load_zip(path: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive ({exc})") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if any(n.endswith("/constants.pkl") for n in names):
            raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a "
                                  f"torch.save checkpoint")
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip file but not a torch.save checkpoint "
                                  f"(expected one <archive>/data.pkl, found {len(pickles)})")
        root = pickles[0][:-len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = archive.read(root + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
        storages: Dict[str, _StorageRef] = {}

        def persistent_load(pid: Any) -> _StorageRef:
            dtype, key, numel, _ = _storage_id(pid, path, 5)
            if key not in storages:
                storages[key] = _StorageRef(dtype, key, numel)
            return storages[key]

        try:
            obj = _unpickle(io.BytesIO(archive.read(pickles[0])), path, persistent_load)
            for key, storage in storages.items():
                raw = archive.read(f"{root}data/{key}")
                storage.data = _storage_array(raw, storage, byteorder, path)
        except CheckpointError:
            raise
        except KeyError as exc:
            raise CheckpointError(f"{path}: a tensor's storage record is missing ({exc})") from None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({exc})") from None
        except Exception as exc:  # any other unpickling failure of untrusted bytes
            raise CheckpointError(f"{path}: corrupt checkpoint pickle "
                                  f"({type(exc).__name__}: {exc})") from None
    return obj


def _storage_array(raw: bytes, storage: _StorageRef, byteorder: str, path: str) -> np.ndarray:
    storage.order = "<" if byteorder == "little" else ">"
    dtype = storage.dtype.numpy.newbyteorder(storage.order)
    expected = storage.numel * dtype.itemsize
    if len(raw) != expected:
        raise CheckpointError(f"{path}: storage {storage.key} holds {len(raw)} bytes, its tensors "
                              f"need {expected} ({storage.numel} x {storage.dtype})")
    return np.frombuffer(raw, dtype=dtype)


# --- the legacy (pre-1.6) format --------------------------------------------------------------------

def _load_legacy(path: str, stream: BinaryIO) -> Any:
    # Checked on the raw bytes first: any other pickle (a Paddle .pdparams, say) is told apart from a
    # torch file before its globals are looked at.
    if LEGACY_MAGIC_NUMBER.to_bytes(10, "little") not in stream.read(32):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (a pickle without torch's magic "
                              f"number; PyTorch checkpoints are zip archives or start with it)")
    stream.seek(0)
    try:
        magic = _unpickle(stream, path)
        if magic != LEGACY_MAGIC_NUMBER:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (corrupt legacy magic number)")
        version = _unpickle(stream, path)
        if version != LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: legacy checkpoint protocol {version!r} is not supported "
                                  f"(only {LEGACY_PROTOCOL_VERSION})")
        sys_info = _unpickle(stream, path)
        file_size = os.fstat(stream.fileno()).st_size
        little = not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True)
        storages: Dict[str, _StorageRef] = {}

        def persistent_load(pid: Any) -> _StorageRef:
            dtype, root_key, numel, (view,) = _storage_id(pid, path, 6)
            if root_key not in storages:
                storages[root_key] = _StorageRef(dtype, root_key, numel)
            root = storages[root_key]
            if view is None:
                return root
            view_key, offset, view_numel = view
            view_key = str(view_key)
            if view_key not in storages:
                ref = _StorageRef(dtype, view_key, view_numel)
                ref.base, ref.base_offset = root, offset
                storages[view_key] = ref
            return storages[view_key]

        obj = _unpickle(stream, path, persistent_load)
        keys = _unpickle(stream, path)
        if not isinstance(keys, list):
            raise pickle.UnpicklingError(f"storage key list is a {type(keys).__name__}")
        for key in keys:
            key = str(key)
            if key not in storages:
                raise CheckpointError(f"{path}: storage {key} is in the data section but no tensor "
                                      f"uses it")
            storage = storages[key]
            header = stream.read(8)
            if len(header) != 8:
                raise EOFError(f"storage {key} is cut off")
            (numel,) = struct.unpack("<q" if little else ">q", header)
            if numel != storage.numel:
                raise CheckpointError(f"{path}: storage {key} has {numel} elements in the data "
                                      f"section, {storage.numel} in its header")
            nbytes = numel * storage.dtype.numpy.itemsize
            if nbytes > file_size - stream.tell():  # checked before reading: numel is untrusted
                raise EOFError(f"storage {key} is cut off")
            raw = stream.read(nbytes)
            storage.data = _storage_array(raw, storage, "little" if little else "big", path)
        for storage in storages.values():
            if storage.base is not None:
                start, stop = storage.base_offset, storage.base_offset + storage.numel
                base = storage.base.data
                if base is None or not 0 <= start <= stop <= base.size:
                    raise CheckpointError(f"{path}: storage view {storage.key} lies outside "
                                          f"storage {storage.base.key}")
                storage.data = base[start:stop]
    except CheckpointError:
        raise
    except EOFError as exc:
        raise CheckpointError(f"{path}: truncated legacy checkpoint ({exc or 'unexpected end'})") \
            from None
    except Exception as exc:  # any other unpickling failure of untrusted bytes
        problem = "truncated legacy checkpoint" if "truncated" in str(exc) else \
            "not a readable PyTorch checkpoint"
        raise CheckpointError(f"{path}: {problem} ({type(exc).__name__}: {exc})") from None
    return obj


# --- tensors -----------------------------------------------------------------------------------------

def _materialize(ref: _TensorRef, name: str, path: str) -> np.ndarray:
    storage = ref.storage
    where = f"{path}: tensor {name}"
    if not isinstance(storage, _StorageRef) or storage.data is None:
        raise CheckpointError(f"{where} has no storage")
    size, stride, offset = ref.size, ref.stride, ref.offset
    if (not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride)
            or not all(isinstance(v, int) and v >= 0 for v in size + stride)
            or not isinstance(offset, int) or offset < 0):
        raise CheckpointError(f"{where} has a malformed size/stride/offset "
                              f"{size!r}/{stride!r}/{offset!r}")
    data = storage.data
    if ref.dtype is not None and ref.dtype.numpy != storage.dtype.numpy:
        # _rebuild_tensor_v3 over an untyped (byte) storage: reinterpret the bytes as the named dtype.
        if data.nbytes % ref.dtype.numpy.itemsize:
            raise CheckpointError(f"{where}: {data.nbytes} storage bytes are not whole "
                                  f"{ref.dtype} elements")
        data = data.view(ref.dtype.numpy.newbyteorder(storage.order))
    dtype = ref.dtype or storage.dtype
    if 0 in size:
        array = np.empty(size, dtype=data.dtype)
    else:
        # as_strided reads raw memory: bounds are checked first so a hostile file cannot reach
        # past its storage.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise CheckpointError(f"{where} (size {list(size)}, stride {list(stride)}, offset "
                                  f"{offset}) reaches element {last} of a {data.size}-element "
                                  f"storage")
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False)
        array = np.array(view)
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    if dtype.is_bfloat16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if isinstance(ref.metadata, Mapping):
        # torch >= 1.10 records lazy conjugate/negative views as bits instead of copying.
        if ref.metadata.get("neg"):
            array = -array
        if ref.metadata.get("conj"):
            array = np.conj(array)
    return array


def load_torch_checkpoint(path: str) -> Any:
    """Unpickle a ``torch.save`` file with tensors as NumPy arrays (nested dicts/lists kept)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
        if not head:
            raise CheckpointError(f"{path}: empty file, not a PyTorch checkpoint")
        if head == ZIP_SIGNATURE:
            obj = _load_zip(path)
        elif head[:1] == b"\x80":  # a pickle protocol opcode: the legacy stream format
            f.seek(0)
            obj = _load_legacy(path, f)
        else:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                                  f"legacy pickle stream)")
    return _resolve(obj, "", path)


def _resolve(obj: Any, name: str, path: str) -> Any:
    if isinstance(obj, _TensorRef):
        return _materialize(obj, name or "<top level>", path)
    if isinstance(obj, _StorageRef):
        raise CheckpointError(f"{path}: {name or 'the checkpoint'} is a bare storage, not a tensor")
    if isinstance(obj, dict):
        resolved = {k: _resolve(v, f"{name}.{k}" if name else str(k), path) for k, v in obj.items()}
        return OrderedDict(resolved) if isinstance(obj, OrderedDict) else resolved
    if isinstance(obj, (list, tuple)):
        items = [_resolve(v, f"{name}[{i}]", path) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def find_state_dict(checkpoint: Any, path: str) -> Dict[str, np.ndarray]:
    """The state dict inside a checkpoint: top level or under ``state_dict``/``model``, unprefixed."""
    state = checkpoint
    if not _is_state_dict(state) and isinstance(state, Mapping):
        for key in STATE_DICT_WRAPPERS:
            if _is_state_dict(state.get(key)):
                state = state[key]
                break
    if not _is_state_dict(state):
        if isinstance(checkpoint, Mapping):
            shown = ", ".join(repr(k) for k in list(checkpoint)[:10])
            what = f"a dict with keys {shown}" if checkpoint else "an empty dict"
        else:
            what = f"a {type(checkpoint).__name__}"
        raise CheckpointError(f"{path}: no state dict of tensors found (the checkpoint holds {what}; "
                              f"looked at the top level and under {', '.join(STATE_DICT_WRAPPERS)})")
    keys: List[str] = list(state)
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in keys):  # saved from nn.DataParallel
        return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def read_torch_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """Read the state dict of a ``torch.save`` checkpoint (zip or legacy format) as NumPy arrays."""
    path = os.fspath(path)
    return find_state_dict(load_torch_checkpoint(path), path)
