"""Read what a checkpoint holds without loading its tensors, and without running its code.

A torch checkpoint is a pickle. Unpickling one with :mod:`pickle` (or ``torch.load`` without
``weights_only``) can run arbitrary code, so this module walks the pickle with
:class:`SafeUnpickler`: every global it names becomes an inert placeholder, except a short
allowlist of harmless constructors (``OrderedDict``, ``set``, ``torch.Size`` as a tuple, ...).
Tensors become :class:`TensorRef` (dtype, shape, storage key) and storages are never read, so
summarising a 1 GB checkpoint reads its central directory and ``data.pkl`` only.

Understood formats: torch zip files (``<prefix>/data.pkl``), legacy non-zip torch files (the
pickles before the raw storages), ``.safetensors`` (8-byte header length + JSON header) and
Hugging Face Trainer checkpoint folders (``trainer_state.json``). torch itself is not imported.

A checkpoint is untrusted input, so walking one has hard bounds (:class:`ReadLimits`): the
pickle's size, its operations, nesting, the size its shared references would expand to, and
time. The walk uses pickle's pure-Python unpickler, whose memo is a dict (the C one allocates
``index * 2`` slots for one memo index a file names); a dictionary key or set element nested
deeper than the bound is refused before Python hashes it (hashing one recursively overflows the C
stack). Walkers after the load visit a shared object once. A file past a bound is reported as
``too large/complex`` and costs milliseconds, or at most the bounds.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .values import is_number

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SCALAR_READ_BYTES = 16  # a scalar tensor's storage (e.g. Lightning's best_model_score) may be read

_DTYPE_SIZES = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "int64": 8, "long": 8, "int32": 4, "int": 4, "int16": 2, "short": 2, "int8": 1, "uint8": 1,
    "bool": 1, "complex64": 8, "complex128": 16, "cfloat": 8, "cdouble": 16, "uint16": 2,
    "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1,
}
_DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128"}
# torch.<X>Storage -> dtype name
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2",
}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                       "U16": "uint16", "U32": "uint32", "U64": "uint64"}


class UnreadableCheckpoint(ValueError):
    """The file is not a checkpoint this reader understands; the message says what it is."""


class TooComplexCheckpoint(UnreadableCheckpoint):
    """The file's pickle is past one of the reader's bounds (ReadLimits); it was not walked."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"too large/complex ({detail})")


@dataclass(frozen=True)
class ReadLimits:
    """What walking one checkpoint's pickle may cost at most.

    Real checkpoints sit far below: the pickle of a model with Adam state is ~100 bytes and
    ~40 operations per tensor, nests under 10 levels and shares almost nothing.
    """

    max_pickle_bytes: int = 32 << 20  # the decompressed pickle
    max_ops: int = 4_000_000  # pickle operations: each makes or links at most one object
    max_depth: int = 100  # containers inside containers
    max_expanded: int = 4_000_000  # objects, counting a shared one at every place it is used
    max_seconds: float = 15.0  # CPU time of this process: a busy machine does not trip it
    max_key_nodes: int = 10_000  # one dictionary key or set element, expanded


DEFAULT_LIMITS = ReadLimits()
MAX_PICKLE_BYTES = DEFAULT_LIMITS.max_pickle_bytes


# --- placeholders -------------------------------------------------------------------------

@dataclass(frozen=True)
class DType:
    name: str

    @property
    def itemsize(self) -> int:
        return _DTYPE_SIZES.get(self.name, 1)


@dataclass(frozen=True)
class StorageType:
    dtype: str


@dataclass
class StorageRef:
    """A storage named by a checkpoint; its bytes stay on disk."""

    key: str
    dtype: str
    location: str
    numel: int
    nbytes: int | None = None  # filled from the zip entry's size when known
    value: Any = None  # only for scalar storages the reader chose to read


@dataclass
class TensorRef:
    """A tensor's description: dtype, shape, and which storage holds it."""

    dtype: str
    shape: tuple[int, ...]
    storage: StorageRef | None = None
    offset: int = 0
    parameter: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def value(self) -> Any:
        """The number a scalar tensor holds, when its storage was read; else None."""
        if self.numel != 1 or self.storage is None or self.storage.value is None:
            return None
        values = self.storage.value
        return values[self.offset] if self.offset < len(values) else None

    def describe(self) -> str:
        return f"tensor({self.dtype}, shape={list(self.shape)})"


class Opaque:
    """An inert stand-in for an object of a class the reader refuses to construct.

    Records constructor arguments and state; it never calls anything from the file.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.items = {}
        obj.elements = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_opaque_types: dict[str, type[Opaque]] = {}
_LEAF_TYPES = frozenset({int, float, str, bool, bytes, bytearray, complex, type(None), TensorRef})


def _opaque_type(module: str, name: str) -> type[Opaque]:
    qualname = f"{module}.{name}"
    cls = _opaque_types.get(qualname)
    if cls is None:
        cls = type("Opaque", (Opaque,), {"qualname": qualname, "__module__": __name__})
        _opaque_types[qualname] = cls
    return cls


# --- safe stand-ins for the few callables a torch pickle needs ----------------------------

def _first(args: tuple[Any, ...], kind: type) -> Any:
    return next((a for a in args if isinstance(a, kind)), None)


def _rebuild_tensor(*args: Any) -> TensorRef:
    """Any torch._utils._rebuild_* call: take the storage, offset and shape it names."""
    storage = _first(args, StorageRef)
    shape: tuple[int, ...] = ()
    offset = 0
    if storage is not None:
        i = args.index(storage)
        if len(args) > i + 2 and isinstance(args[i + 1], int) and isinstance(args[i + 2], tuple):
            offset, shape = args[i + 1], args[i + 2]
    else:
        shape = _first(args, tuple) or ()
    dtype = storage.dtype if storage else next((a.name for a in args if isinstance(a, DType)), "?")
    dims = tuple(s for s in shape if type(s) is int) if isinstance(shape, tuple) else ()
    if len(dims) > 64 or not all(0 <= s < 1 << 63 for s in dims) or type(offset) is not int:
        raise pickle.UnpicklingError("a tensor with an implausible shape or offset")
    return TensorRef(dtype=dtype, shape=dims, storage=storage, offset=offset)


def _rebuild_parameter(data: Any = None, *args: Any, **kwargs: Any) -> Any:
    if isinstance(data, TensorRef):
        data.parameter = True
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: tuple = (), state: Any = None) -> Any:
    if (isinstance(func, type) and issubclass(func, Opaque)) or any(func is f for f in _SAFE_CALLABLES):
        return func(*args)
    return _opaque_type("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


def _codecs_encode(text: Any, encoding: str = "utf-8", *args: Any) -> bytes:
    """How protocol-2 pickles spell bytes; only the two encodings pickle itself uses."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode(encoding)


def _size(values: Any = ()) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or len(values) > 64 or not all(type(v) is int for v in values):
        raise pickle.UnpicklingError("a torch.Size that is not a short tuple of integers")
    return tuple(values)


def _device(*args: Any) -> str:
    if len(args) > 2 or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
        raise pickle.UnpicklingError("a torch.device that is not a name and an index")
    return ":".join(str(a) for a in args)


def _reconstructor(cls: Any, base: Any = None, state: Any = None) -> Any:
    """copyreg._reconstructor (protocol 0/1 objects): an inert object of the placeholder class."""
    obj = cls.__new__(cls) if isinstance(cls, type) and issubclass(cls, Opaque) else Opaque()
    obj.state = state
    return obj


class _NumpyDType(Opaque):
    qualname = "numpy.dtype"


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy.core.multiarray.scalar(dtype, bytes): decode the common number types with struct."""
    code = dtype.args[0] if isinstance(dtype, Opaque) and dtype.args and isinstance(dtype.args[0], str) else None
    formats = {"f8": "<d", "f4": "<f", "i8": "<q", "i4": "<i", "u8": "<Q", "u4": "<I",
               "b1": "<?", "f2": "<e", "i2": "<h", "u2": "<H", "i1": "<b", "u1": "<B"}
    if isinstance(data, bytes) and code in formats and struct.calcsize(formats[code]) == len(data):
        return struct.unpack(formats[code], data)[0]
    return _opaque_type("numpy", "scalar")(dtype, data)


def _check_hashable(value: Any, limits: ReadLimits) -> None:
    """Refuse a dictionary key or set element Python could not hash safely: nested deeper than
    the bound (hashing recurses in C) or, with shared references, too large to hash in time."""
    if type(value) not in (tuple, frozenset):
        return
    stack = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > limits.max_depth or seen > limits.max_key_nodes:
            raise TooComplexCheckpoint(f"a dictionary key or set element nests deeper than {limits.max_depth} "
                                       f"levels or holds more than {limits.max_key_nodes} objects")
        if type(item) in (tuple, frozenset):
            stack.extend((x, depth + 1) for x in item)


def _hashable_items(items: Any) -> list[Any]:
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError(f"a set built from {type(items).__name__}")
    for item in items:
        _check_hashable(item, DEFAULT_LIMITS)
    return list(items)


def _safe_set(items: Any = ()) -> set[Any]:
    return set(_hashable_items(items))


def _safe_frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_hashable_items(items))


def _safe_ordered_dict(items: Any = ()) -> collections.OrderedDict[Any, Any]:
    pairs = list(items.items()) if isinstance(items, dict) else items
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise pickle.UnpicklingError("an OrderedDict built from something other than pairs")
    for key, _ in pairs:
        _check_hashable(key, DEFAULT_LIMITS)
    return collections.OrderedDict(pairs)


_SAFE_CALLABLES = (_rebuild_tensor, _rebuild_parameter, _size, _device)

# set, frozenset and OrderedDict are stand-in functions, not the classes: NEWOBJ/OBJ on a class
# would build it from the file's items without the key check above
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _safe_ordered_dict,
    ("collections", "defaultdict"): lambda *a: {},
    ("builtins", "set"): _safe_set,
    ("builtins", "frozenset"): _safe_frozenset,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): _safe_set,
    ("__builtin__", "frozenset"): _safe_frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class SafeUnpickler(pickle._Unpickler):
    """Walks a pickle without constructing its classes or calling its functions, within bounds.

    ``find_class`` returns allowlisted harmless callables or inert :class:`Opaque` types, so
    a ``__reduce__`` payload such as ``os.system`` becomes a placeholder record, never a call.
    ``persistent_load`` turns torch's storage ids into :class:`StorageRef` without reading data.
    Every operation counts against ``limits``; keys are checked before they are hashed.
    """

    def __init__(self, file: Any, *, limits: ReadLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.storages: dict[str, StorageRef] = {}
        self.refused: set[str] = set()  # globals replaced by placeholders: loading them needs trust
        self.limits = limits
        self._ops = 0
        self._deadline = time.process_time() + limits.max_seconds

    def load(self) -> Any:
        """pickle._Unpickler.load() with the operations counted in the loop itself (a wrapper
        around each would double what reading a normal checkpoint costs), reading the file
        directly until a FRAME (protocol 4+) asks for pickle's unframer."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read, self.readline = self._file_read, self._file_readline
        self.readinto = self._unframer.readinto
        self.metastack: list[Any] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        dispatch = self.dispatch
        ops = 0
        self._check_budget()
        try:
            while True:
                key = self.read(1)
                if not key:
                    raise EOFError
                ops += 1
                if not ops & 0x3FF:
                    self._ops = ops
                    self._check_budget()
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            self._ops = ops
            return stop.value

    def load_frame(self) -> None:
        self.read, self.readline = self._unframer.read, self._unframer.readline
        super().load_frame()

    def _check_budget(self) -> None:
        if self._ops > self.limits.max_ops:
            raise TooComplexCheckpoint(f"its pickle has more than {self.limits.max_ops:,} operations")
        if time.process_time() >= self._deadline:
            raise TooComplexCheckpoint(f"walking its pickle took more than {self.limits.max_seconds:g} s of CPU time")

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch":
            if name.endswith("Storage"):
                return StorageType(_STORAGE_DTYPES.get(name, name[: -len("Storage")].lower() or "uint8"))
            if name in _DTYPE_SIZES or name.startswith(("float", "int", "uint", "complex", "qint", "quint", "bool", "bfloat")):
                return DType(_DTYPE_ALIASES.get(name, name))
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return _rebuild_tensor
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage", "_LegacyStorage"):
            return StorageType("uint8")
        if len(self.refused) < 1000:
            self.refused.add(f"{module}.{name}"[:200])
        return _opaque_type(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5:
            storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
            if not isinstance(key, (str, int)) or not isinstance(location, str):
                raise pickle.UnpicklingError("a storage id that is not a name and a location")
            if isinstance(storage_type, StorageType):
                dtype = storage_type.dtype
            elif isinstance(storage_type, DType):
                dtype = storage_type.name
            else:
                dtype = "?"
            key = str(key)
            ref = self.storages.get(key)
            if ref is None:
                ref = StorageRef(key=key, dtype=dtype, location=location[:100],
                                 numel=numel if type(numel) is int and 0 <= numel < 1 << 63 else 0)
                self.storages[key] = ref
            return ref
        return None  # legacy 'module' records and anything else: nothing to rebuild

    # the operations that hash what the file supplies check it first (after a MARK, pickle's
    # pure-Python unpickler keeps the items since the mark as self.stack)
    def load_setitem(self) -> None:
        _check_hashable(self.stack[-2], self.limits)
        super().load_setitem()

    def load_setitems(self) -> None:
        for key in self.stack[::2]:
            _check_hashable(key, self.limits)
        super().load_setitems()

    def load_dict(self) -> None:
        for key in self.stack[::2]:
            _check_hashable(key, self.limits)
        super().load_dict()

    def load_additems(self) -> None:
        for item in self.stack:
            _check_hashable(item, self.limits)
        super().load_additems()

    def load_frozenset(self) -> None:
        for item in self.stack:
            _check_hashable(item, self.limits)
        super().load_frozenset()

    def load_ext1(self) -> None:
        raise pickle.UnpicklingError("extension codes (EXT1/2/4) are not used by checkpoints")

    load_ext2 = load_ext4 = load_ext1


# the operations, with the overrides above in place of pickle's own
SafeUnpickler.dispatch = {code: getattr(SafeUnpickler, op.__name__)
                          for code, op in pickle._Unpickler.dispatch.items()}


# --- reading files ------------------------------------------------------------------------

@dataclass
class TorchFile:
    """The walked pickle of a torch checkpoint plus facts about its storages."""

    obj: Any
    storages: dict[str, StorageRef]
    format: str  # "zip" or "legacy"
    members: int = 0
    storage_bytes: int = 0
    refused: list[str] = field(default_factory=list)


def sniff(path: Path) -> str:
    """What a file looks like from its first bytes: zip, legacy, safetensors, empty, text, binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except IsADirectoryError:
        return "dir"
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x80\x02" and b"\x8a\n" in head[:4]:  # pickled long: the legacy magic number
        return "legacy"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{" and _fits_header(path, head)):
        return "safetensors"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c.isspace() for c in text):
            return "text"
    except UnicodeDecodeError:
        pass
    return "binary"


def _fits_header(path: Path, head: bytes) -> bool:
    """A safetensors file's first 8 bytes are its header's length: one that fits in the file
    (random bytes with a '{' at offset 8 give an absurd length)."""
    try:
        return int.from_bytes(head[:8], "little") <= path.stat().st_size - 8
    except OSError:
        return False


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB" if n >= 1 << 20 else f"{n} bytes"


def _safe_load_pickle(data: Any, limits: ReadLimits = DEFAULT_LIMITS) -> tuple[Any, SafeUnpickler]:
    unpickler = SafeUnpickler(data, encoding="latin1", limits=limits)
    try:
        obj = unpickler.load()
    except TooComplexCheckpoint:
        raise
    except RecursionError as e:
        raise UnreadableCheckpoint("its pickle nests too deeply to summarise") from e
    except MemoryError as e:
        raise TooComplexCheckpoint("walking its pickle ran out of memory") from e
    except Exception as e:  # any malformed stream: EOFError, UnpicklingError, TypeError from a bad opcode
        raise UnreadableCheckpoint(f"its pickle is damaged ({e.__class__.__name__}: {str(e)[:200]})") from e
    check_shape(obj, limits, unpickler._deadline)
    return obj, unpickler


_END = object()


def _children(obj: Any) -> Any:
    """What a walker would descend into; None for a leaf."""
    if isinstance(obj, dict):
        return (*obj.keys(), *obj.values()) if any(type(k) in (tuple, frozenset) for k in obj) else obj.values()
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    if isinstance(obj, Opaque):
        return (*obj.args, *obj.kwargs.values(), obj.state, *obj.items.values(), *obj.elements)
    return None


def check_shape(root: Any, limits: ReadLimits = DEFAULT_LIMITS, deadline: float | None = None) -> None:
    """Refuse a walked object that nests deeper than the bound, or whose shared references would
    expand past it: one pass over the distinct containers (a shared one is measured once)."""
    sizes: dict[int, int] = {}  # id -> expanded size, for containers measured already
    active: set[int] = set()  # ids on the current path: a reference back is a cycle, counted once
    frames: list[list[Any]] = []  # [container, iterator over its container children, expanded size so far]
    entered = 0

    def enter(node: Any) -> int | None:
        """The expanded size of `node` when known now; None when it was pushed to walk."""
        children = _children(node)
        if children is None:
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            return 1
        if len(frames) >= limits.max_depth:
            raise TooComplexCheckpoint(f"it nests containers deeper than {limits.max_depth} levels")
        active.add(key)
        # leaves are counted in bulk: only containers are walked one by one
        nested = [c for c in children if type(c) not in _LEAF_TYPES]
        frames.append([node, iter(nested), 1 + len(children) - len(nested)])
        return None

    if enter(root) is not None:
        return
    while frames:
        frame = frames[-1]
        if frame[2] > limits.max_expanded:
            raise TooComplexCheckpoint(f"its shared references expand to more than {limits.max_expanded:,} objects")
        child = next(frame[1], _END)
        if child is _END:
            frames.pop()
            key = id(frame[0])
            active.discard(key)
            sizes[key] = frame[2]
            if frames:
                frames[-1][2] += frame[2]
            continue
        entered += 1
        if deadline is not None and entered & 0x3FFF == 0 and time.process_time() > deadline:
            raise TooComplexCheckpoint(f"walking its pickle took more than {limits.max_seconds:g} s of CPU time")
        known = enter(child)
        if known is not None:
            frame[2] += known


def read_torch_zip(path: Path, *, read_scalars: bool = True, limits: ReadLimits = DEFAULT_LIMITS) -> TorchFile:
    """Walk `<prefix>/data.pkl` of a torch zip checkpoint; storages stay unread (tiny scalars aside)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UnreadableCheckpoint(f"a damaged or truncated zip ({e})") from e
    with archive:
        infos = archive.infolist()
        pkl = sorted((i for i in infos if i.filename.endswith("data.pkl")), key=lambda i: len(i.filename))
        if not pkl:
            raise UnreadableCheckpoint("a zip file without data.pkl, not a torch checkpoint")
        entry = pkl[0]
        if entry.file_size > limits.max_pickle_bytes:
            raise TooComplexCheckpoint(f"its data.pkl is {_mb(entry.file_size)}; the bound is {_mb(limits.max_pickle_bytes)}")
        prefix = entry.filename[: -len("data.pkl")]
        try:
            # in memory (its declared size is bounded): the unpickler reads it an opcode at a time
            data = archive.read(entry)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise UnreadableCheckpoint(f"a damaged zip: data.pkl is unreadable ({e})") from e
        obj, unpickler = _safe_load_pickle(io.BytesIO(data), limits)
        sizes = {i.filename: i for i in infos}
        total = 0
        for key, ref in unpickler.storages.items():
            info = sizes.get(f"{prefix}data/{key}")
            if info is not None:
                ref.nbytes = info.file_size
                total += info.file_size
                if read_scalars and info.file_size <= SCALAR_READ_BYTES and ref.numel == 1:
                    ref.value = _decode_scalar(archive, info, ref.dtype)
        return TorchFile(obj=obj, storages=unpickler.storages, format="zip", members=len(infos),
                         storage_bytes=total, refused=sorted(unpickler.refused))


def _decode_scalar(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: str) -> Any:
    formats = {"float64": "d", "float32": "f", "float16": "e", "int64": "q", "int32": "i",
               "int16": "h", "int8": "b", "uint8": "B", "bool": "?"}
    try:
        data = archive.read(info)
    except (zipfile.BadZipFile, OSError):
        return None
    if dtype == "bfloat16" and len(data) >= 2:
        return [struct.unpack("<f", b"\x00\x00" + data[:2])[0]]
    fmt = formats.get(dtype)
    if fmt is None or len(data) % struct.calcsize(fmt):
        return None
    return list(struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data))


def read_torch_legacy(path: Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> TorchFile:
    """Walk a legacy (non-zip) torch file: magic, protocol, sys_info, then the object."""
    with open(path, "rb") as raw:
        # the pickles come first and declare no size: at most the bound of them, in memory
        head = raw.read(limits.max_pickle_bytes + 1)
    f = io.BytesIO(head[: limits.max_pickle_bytes])
    try:
        magic, _ = _safe_load_pickle(f, limits)
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise UnreadableCheckpoint("a pickle file, not a torch checkpoint")
        _safe_load_pickle(f, limits)  # protocol version
        _safe_load_pickle(f, limits)  # sys_info
        obj, unpickler = _safe_load_pickle(f, limits)
    except UnreadableCheckpoint:
        if len(head) > limits.max_pickle_bytes and f.tell() >= limits.max_pickle_bytes:
            raise TooComplexCheckpoint(f"its pickles are larger than {_mb(limits.max_pickle_bytes)}") from None
        raise
    total = 0
    for ref in unpickler.storages.values():
        ref.nbytes = ref.numel * _DTYPE_SIZES.get(ref.dtype, 1)
        total += ref.nbytes
    return TorchFile(obj=obj, storages=unpickler.storages, format="legacy", storage_bytes=total,
                     refused=sorted(unpickler.refused))


def read_torch(path: Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> TorchFile:
    """Walk a torch checkpoint (zip or legacy) within `limits`."""
    kind = sniff(path)
    if kind == "zip":
        return read_torch_zip(path, limits=limits)
    if kind == "legacy":
        return read_torch_legacy(path, limits=limits)
    raise UnreadableCheckpoint(describe_non_checkpoint(path, kind))


def describe_non_checkpoint(path: Path, kind: str) -> str:
    return {
        "empty": "an empty file (0 bytes)",
        "text": "a text file, not a checkpoint",
        "dir": "a directory without checkpoints",
        "binary": "not a checkpoint (unrecognised bytes)",
        "safetensors": "not a valid safetensors file",
        "pickle": "a plain pickle, not a torch checkpoint (reading it would need full unpickling, which can run code)",
    }.get(kind, f"not a checkpoint ({kind})")


def read_safetensors(path: Path) -> dict[str, Any]:
    """Header facts of a .safetensors file: metadata, tensor count, parameters, dtypes, bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableCheckpoint("a truncated safetensors file (no header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise UnreadableCheckpoint("not a valid safetensors file (header length out of range)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnreadableCheckpoint(f"not a valid safetensors file (bad header: {e})") from e
    if not isinstance(header, dict):
        raise UnreadableCheckpoint("not a valid safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    dtypes: dict[str, int] = {}
    params = tensor_bytes = 0
    end = 0
    for name, spec in header.items():
        if not isinstance(spec, dict) or "shape" not in spec or "data_offsets" not in spec:
            raise UnreadableCheckpoint(f"not a valid safetensors file (bad entry {name!r})")
        dtype = _SAFETENSORS_DTYPES.get(spec.get("dtype"), str(spec.get("dtype")))
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        params += math.prod(int(s) for s in spec["shape"])
        begin, stop = spec["data_offsets"]
        tensor_bytes += stop - begin
        end = max(end, stop)
    if 8 + length + end > size:
        raise UnreadableCheckpoint(f"a truncated safetensors file ({size} bytes, header needs {8 + length + end})")
    return {"metadata": metadata, "tensors": len(header), "parameters": params, "dtypes": dtypes,
            "tensor_bytes": tensor_bytes}


# --- summarising ----------------------------------------------------------------------------

def to_plain(obj: Any, depth: int = 0, *, max_items: int = 200) -> Any:
    """JSON-ready data: tensors become descriptions (scalars their value), placeholders their state."""
    if depth > 12:
        return "..."
    if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) >= 1 << 64:
        return f"<int of {obj.bit_length()} bits>"  # str() of a huge int is refused, or slow
    if isinstance(obj, str) and len(obj) > 10_000:
        return obj[:10_000] + f"... ({len(obj)} characters)"
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, TensorRef):
        value = obj.value
        return value if value is not None else obj.describe()
    if isinstance(obj, (StorageRef, StorageType)):
        return f"<storage {obj.dtype}>"
    if isinstance(obj, DType):
        return obj.name
    if isinstance(obj, dict):
        out = {}
        for i, (k, v) in enumerate(obj.items()):
            if i >= max_items:
                out["..."] = f"{len(obj) - max_items} more"
                break
            out[str(k) if not isinstance(k, str) else k] = to_plain(v, depth + 1)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj) if isinstance(obj, (set, frozenset)) else obj
        plain = [to_plain(v, depth + 1) for v in items[:max_items]]
        if len(items) > max_items:
            plain.append(f"... {len(items) - max_items} more")
        return plain
    if isinstance(obj, complex):
        return str(obj)
    if isinstance(obj, Opaque):
        # dict subclasses (AttributeDict), Namespace-like objects: their contents are the facts
        if obj.items:
            return to_plain(obj.items, depth + 1)
        if isinstance(obj.state, dict):
            return to_plain(obj.state, depth + 1)
        if isinstance(obj.state, tuple) and obj.state and isinstance(obj.state[-1], dict):
            return to_plain(obj.state[-1], depth + 1)
        if obj.elements:
            return to_plain(obj.elements, depth + 1)
        return f"<{obj.qualname}>"
    return repr(obj)[:200]


def tensor_stats(obj: Any) -> dict[str, Any]:
    """Count tensors, their elements, dtypes and unique storage bytes anywhere in `obj`; a shared
    object (a tensor or a container) counts once. Elements are not parameters: see
    parameter_summary()."""
    count = params = 0
    dtypes: dict[str, int] = {}
    storages: dict[str, int] = {}
    stack = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, (TensorRef, dict, list, tuple, Opaque)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, TensorRef):
            count += 1
            params += item.numel
            dtypes[item.dtype] = dtypes.get(item.dtype, 0) + 1
            if item.storage is not None:
                storages[item.storage.key] = item.storage.nbytes or item.storage.numel * DType(item.dtype).itemsize
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, Opaque):
            stack.extend(item.items.values())
            stack.append(item.state)
            stack.extend(item.elements)
    return {"tensors": count, "tensor_elements": params, "dtypes": dtypes, "tensor_bytes": sum(storages.values())}


# state-dict entries that are buffers, not parameters (BatchNorm's running statistics)
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def _is_state_dict(obj: Any) -> bool:
    """A module's state dict: names to tensors (a module's `_extra_state` entries aside)."""
    if not isinstance(obj, dict) or not obj:
        return False
    tensors = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, TensorRef):
            tensors += 1
        elif not key.endswith("_extra_state"):
            return False
    return tensors > 0


def _is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, dict) and "state" in obj and "param_groups" in obj


def parameter_summary(obj: Any, meta_key: str) -> dict[str, Any]:
    """Parameters counted from the model's state dict(s) and where they were found (`top-level`,
    `state_dict`, `model`, ...); buffers, optimizer state and every other tensor apart. Tensors
    that share storage (tied weights) count once, as model.parameters() yields them."""
    models: list[tuple[str, dict[Any, Any]]] = []
    optimizers: list[Any] = []
    if _is_state_dict(obj):
        models.append(("top-level", obj))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key == meta_key:
                continue
            if _is_state_dict(value):
                models.append((str(key), value))
            elif _is_optimizer_state(value) or (isinstance(value, (list, tuple)) and value
                                                 and all(_is_optimizer_state(v) for v in value)):
                optimizers.append(value)  # Lightning keeps a list of them: optimizer_states
    params = buffers = 0
    seen: set[Any] = set()
    for _, state in models:
        for name, t in state.items():
            if not isinstance(t, TensorRef):
                continue
            ident = (t.storage.key, t.offset, t.shape) if t.storage is not None else id(t)
            if ident in seen:
                continue
            seen.add(ident)
            if name.rsplit(".", 1)[-1] in _BUFFER_NAMES:
                buffers += t.numel
            else:
                params += t.numel
    total, model, optimizer = (tensor_stats(x) for x in (obj, [s for _, s in models], optimizers))
    out: dict[str, Any] = {}
    if models:
        out.update(parameters=params, parameters_in=[where for where, _ in models], buffers=buffers)
    out.update(optimizer_tensors=optimizer["tensors"], optimizer_elements=optimizer["tensor_elements"],
               other_tensors=total["tensors"] - model["tensors"] - optimizer["tensors"],
               other_elements=total["tensor_elements"] - model["tensor_elements"] - optimizer["tensor_elements"])
    return out


def _number(v: Any) -> float | int | None:
    if isinstance(v, TensorRef):
        v = v.value
    return v if is_number(v) else None


NANOGPT_KEYS = ("iter_num", "best_val_loss", "model_args", "config")
DICT_HINT_KEYS = ("epoch", "step", "iter", "iter_num", "global_step", "loss", "val_loss",
                  "best_val_loss", "config", "args", "model_args", "hparams", "hyper_parameters")


def classify(obj: Any, meta_key: str) -> dict[str, Any]:
    """{'kind', 'epoch', 'step', 'metrics', 'meta', 'summary'} for a walked checkpoint object."""
    out: dict[str, Any] = {"kind": "unknown", "epoch": None, "step": None, "metrics": {},
                           "meta": {}, "summary": {}}
    out["summary"].update(tensor_stats(obj))
    if isinstance(obj, Opaque) and obj.items:
        obj = obj.items
    out["summary"].update(parameter_summary(obj, meta_key))
    if not isinstance(obj, dict):
        out["summary"]["type"] = obj.qualname if isinstance(obj, Opaque) else type(obj).__name__
        if isinstance(obj, TensorRef):
            out["kind"] = "state_dict"
        return out
    keys = [str(k) for k in obj]
    out["summary"]["keys"] = keys[:50]
    meta = obj.get(meta_key)
    if isinstance(meta, dict) and "format_version" in meta:
        plain = to_plain({k: v for k, v in meta.items() if k != "rng"})
        out.update(kind="trainctl", meta=plain, epoch=plain.get("epoch"), step=plain.get("step"),
                   metrics=plain.get("metrics") or {})
        out["summary"]["state_keys"] = [k for k in keys if k != meta_key]
        return out
    if "pytorch-lightning_version" in obj or {"state_dict", "global_step", "epoch"} <= set(keys):
        out["kind"] = "lightning"
        out["epoch"], out["step"] = _number(obj.get("epoch")), _number(obj.get("global_step"))
        summary = out["summary"]
        summary["lightning_version"] = obj.get("pytorch-lightning_version")
        hp = obj.get("hyper_parameters")
        if hp is not None:
            summary["hyper_parameters"] = to_plain(hp)
        for name, state in (obj.get("callbacks") or {}).items():
            if isinstance(state, dict) and "best_model_score" in state:
                monitor = state.get("monitor") or "score"
                score = _number(state.get("best_model_score"))
                summary.setdefault("model_checkpoints", []).append({
                    "callback": str(name), "monitor": state.get("monitor"),
                    "best_model_score": score, "best_model_path": state.get("best_model_path"),
                    "mode": _mode_from_callback_key(str(name))})
                if score is not None:
                    out["metrics"][f"best_{monitor}"] = score
        return out
    if any(k in obj for k in DICT_HINT_KEYS):
        out["kind"] = "dict"
        out["epoch"] = _number(obj.get("epoch"))
        step = next((_number(obj.get(k)) for k in ("step", "global_step", "iter_num", "iter")
                     if _number(obj.get(k)) is not None), None)
        out["step"] = step
        for k, v in obj.items():
            n = _number(v)
            if n is not None and isinstance(k, str) and any(w in k.lower() for w in ("loss", "acc", "ppl", "score", "metric")):
                out["metrics"][k] = n
        for k in ("config", "args", "model_args", "hparams", "hyper_parameters"):
            if k in obj:
                out["summary"][k] = to_plain(obj[k])
        if any(k in obj for k in NANOGPT_KEYS):
            out["summary"]["style"] = "nanogpt"
        return out
    values = list(obj.values())
    if values and all(isinstance(v, TensorRef) for v in values):
        out["kind"] = "state_dict"
        return out
    out["kind"] = "dict"
    return out


def _mode_from_callback_key(key: str) -> str | None:
    for mode in ("min", "max"):
        if f"'mode': '{mode}'" in key:
            return mode
    return None


def read_hf_folder(folder: Path) -> dict[str, Any]:
    """A Hugging Face Trainer checkpoint folder: trainer_state.json plus the weight files' headers."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableCheckpoint(f"trainer_state.json is unreadable ({e})") from e
    if not isinstance(state, dict):
        raise UnreadableCheckpoint("trainer_state.json is not an object")
    history = state.get("log_history") or []
    metrics: dict[str, Any] = {}
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict):
            for k, v in entry.items():
                if is_number(v) and k not in ("epoch", "step") and ("loss" in k or k.startswith("eval_")):
                    metrics[k] = v
    if is_number(state.get("best_metric")):
        metrics["best_metric"] = state["best_metric"]
    files = {}
    total = 0
    for p in sorted(folder.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            files[p.name] = size
            total += size
    summary: dict[str, Any] = {
        "global_step": state.get("global_step"), "epoch": state.get("epoch"),
        "best_metric": state.get("best_metric"),
        "best_model_checkpoint": state.get("best_model_checkpoint"),
        "log_history_tail": history[-3:] if isinstance(history, list) else [],
        "files": files,
    }
    weights = next((folder / n for n in ("model.safetensors", "adapter_model.safetensors") if (folder / n).is_file()), None)
    if weights is not None:
        try:
            summary.update({k: v for k, v in read_safetensors(weights).items() if k != "metadata"})
        except UnreadableCheckpoint as e:
            summary["weights_error"] = str(e)
    step = state.get("global_step")
    return {"kind": "huggingface", "epoch": state.get("epoch"), "step": step if is_number(step) else None,
            "metrics": metrics, "summary": summary, "bytes": total}

