"""A corpus of hostile checkpoints (issue 8) and a runner that feeds each to `tvtool extract`.

Every `case_*` function writes one hostile input into a directory and returns its path; `CASES`
names them all. The runner imports torch and tvtool once, then forks one child per case that runs
the real CLI (`tvtool extract GOOD HOSTILE` and the reverse), with its stderr in a file and its
peak RSS from `wait4`, so each case is a separate process at the cost of a fork:

    python tests/hostile_corpus.py DIR   # builds the corpus in DIR, prints JSON results

A pickle that runs code would create `DIR/CASE/CANARY`; the test asserts it never exists. Peak
RSS is compared with a control run (a valid extract) in the same way.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

CANARY = "CANARY"
GOOD = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3), "a.bias": torch.ones(4)}
CASES: dict[str, Callable[[Path], Path]] = {}
BOMBS: set[str] = set()  # cases whose peak memory is asserted
BOTH_WAYS = {"st_dtype_list", "st_name_escape_clear", "idx_traversal", "pt_zip_bomb", "pt_stride0",
             "pt_int_keys", "pt_evil_os_system_zip"}  # also given as the base


def case(fn: Callable[[Path], Path] | None = None, *, bomb: bool = False):
    def register(f: Callable[[Path], Path]) -> Callable[[Path], Path]:
        name = f.__name__.removeprefix("case_")
        CASES[name] = f
        if bomb:
            BOMBS.add(name)
        return f

    return register(fn) if fn is not None else register


def write_good(d: Path) -> Path:
    from safetensors.torch import save_file

    path = d / "good.safetensors"
    save_file(GOOD, str(path))
    return path


# -- safetensors --------------------------------------------------------------------------------
def st_file(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def st_entry(name: str, dtype="F32", shape=(4, 3), offsets=(0, 48), data=48) -> tuple:
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, bytes(data)


def _st_case(name: str, **entry) -> None:
    def build(d: Path) -> Path:
        header, data = st_entry("a.weight", **entry)
        header["a.bias"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data),
                                                                            len(data) + 16]}
        return st_file(d / f"{name}.safetensors", header, data + bytes(16))

    build.__name__ = f"case_{name}"
    case(build)


for _name, _entry in {
    "st_dtype_list": {"dtype": ["F32"]},
    "st_dtype_unknown": {"dtype": "F33"},
    "st_dtype_lowercase": {"dtype": "f32"},
    "st_dtype_null": {"dtype": None},
    "st_shape_string": {"shape": "43"},
    "st_shape_string_dims": {"shape": ["4", "3"]},
    "st_shape_floats": {"shape": [4.0, 3.0]},
    "st_shape_bools": {"shape": [True, True], "offsets": (0, 4), "data": 4},
    "st_shape_negative": {"shape": [-4, -3]},
    "st_shape_huge_zero": {"shape": [0, 10**30], "offsets": (0, 0), "data": 0},
    "st_shape_huge_zero_2": {"shape": [0, 2**62, 2**62], "offsets": (0, 0), "data": 0},
    "st_shape_huge_numel": {"shape": [2**31, 2**31], "offsets": (0, 2**64), "data": 0},
    "st_shape_rank_100": {"shape": [1] * 100, "offsets": (0, 4), "data": 4},
    "st_shape_nested": {"shape": [[4], [3]]},
    "st_offsets_short": {"offsets": (0, 40)},
    "st_offsets_reversed": {"offsets": (48, 0)},
    "st_offsets_strings": {"offsets": ("0", "48")},
    "st_offsets_three": {"offsets": (0, 24, 48)},
    "st_offsets_floats": {"offsets": (0.0, 48.0)},
    "st_offsets_negative": {"offsets": (-48, 0)},
}.items():
    _st_case(_name, **_entry)


def _named(name: str, tensor_name: str) -> None:
    def build(d: Path) -> Path:
        header = {tensor_name: {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
                  "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}
        return st_file(d / f"{name}.safetensors", json.dumps(header).encode(), bytes(64))

    build.__name__ = f"case_{name}"
    case(build)


_named("st_name_lone_surrogate", "a.\ud800weight")
_named("st_name_escape_clear", "\x1b[2J\x1b[Ha.weight")
_named("st_name_osc_title", "\x1b]0;pwned\x07a.weight")
_named("st_name_nul", "a.weight\x00")
_named("st_name_empty", "")
_named("st_name_too_long", "a" * 5000)
_named("st_name_rich_markup", "[red]a.weight[/red]")  # valid name, must be shown literally
_named("st_name_bidi", "a.weight\u202e")  # valid, a key mismatch; the \u202e is escaped


@case(bomb=True)
def case_st_header_40mb_600k(d: Path) -> Path:
    body = ",".join(f'"model.layers.{i}.self_attn.q_proj.weight":{{"dtype":"F32","shape":[0],'
                    f'"data_offsets":[0,0]}}' for i in range(600_000))
    return st_file(d / "st_header_40mb.safetensors", ("{" + body + "}").encode())


@case(bomb=True)
def case_st_header_150k_entries(d: Path) -> Path:
    body = ",".join(f'"{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
                    for i in range(150_000))
    return st_file(d / "st_150k.safetensors", ("{" + body + "}").encode())


@case
def case_st_header_len_2_64(d: Path) -> Path:
    return st_file(d / "st_len.safetensors", b"{}", n=2**64 - 1)


@case
def case_st_header_len_past_eof(d: Path) -> Path:
    return st_file(d / "st_eof.safetensors", b'{"a":', n=1000)


@case
def case_st_nested_json(d: Path) -> Path:
    return st_file(d / "st_nested.safetensors", b'{"__metadata__":' + b"[" * 100_000 + b"]" *
                   100_000 + b"}")


@case
def case_st_nested_entry(d: Path) -> Path:
    return st_file(d / "st_nested2.safetensors", b'{"a.weight":' + b'{"x":' * 50_000 + b"1" +
                   b"}" * 50_001)


@case
def case_st_duplicate_keys(d: Path) -> Path:
    e = '{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'
    return st_file(d / "st_dup.safetensors", f'{{"a.bias":{e},"a.bias":{e}}}'.encode(), bytes(16))


@case
def case_st_not_utf8(d: Path) -> Path:
    return st_file(d / "st_latin1.safetensors", '{"a.w\xe9":{}}'.encode("latin-1"))


@case
def case_st_utf16(d: Path) -> Path:
    return st_file(d / "st_utf16.safetensors", '{"a":1}'.encode("utf-16"))


@case
def case_st_header_array(d: Path) -> Path:
    return st_file(d / "st_array.safetensors", b"[1, 2]")


@case
def case_st_header_null(d: Path) -> Path:
    return st_file(d / "st_null.safetensors", b"null")


@case
def case_st_metadata_not_string(d: Path) -> Path:
    header, data = st_entry("a.bias", shape=[4], offsets=(0, 16), data=16)
    header["__metadata__"] = {"format": {"nested": [1, 2]}}
    return st_file(d / "st_meta.safetensors", header, data)


@case
def case_st_metadata_surrogate(d: Path) -> Path:
    return st_file(d / "st_meta2.safetensors", b'{"__metadata__":{"k":"\\udc80"}}')


@case
def case_st_extra_field(d: Path) -> Path:
    header, data = st_entry("a.bias", shape=[4], offsets=(0, 16), data=16)
    header["a.bias"]["exec"] = "rm -rf /"
    return st_file(d / "st_extra.safetensors", header, data)


@case
def case_st_overlap(d: Path) -> Path:
    header = {"a.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
              "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}
    return st_file(d / "st_overlap.safetensors", header, bytes(48))


@case
def case_st_gap(d: Path) -> Path:
    header = {"a.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
              "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]}}
    return st_file(d / "st_gap.safetensors", header, bytes(80))


@case
def case_st_truncated(d: Path) -> Path:
    header = {"a.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
              "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}
    return st_file(d / "st_trunc.safetensors", header, bytes(50))


@case
def case_st_trailing(d: Path) -> Path:
    header = {"a.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
              "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}
    return st_file(d / "st_trail.safetensors", header, bytes(64 + 1000))


@case
def case_st_empty_file(d: Path) -> Path:
    (d / "st_empty.safetensors").write_bytes(b"")
    return d / "st_empty.safetensors"


# -- shard indexes ------------------------------------------------------------------------------
def _index(d: Path, name: str, weight_map: object, extra: dict | None = None) -> Path:
    folder = d / name / "model"
    folder.mkdir(parents=True)
    (folder / "model-1.safetensors").write_bytes(write_good(d).read_bytes())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map, **(extra or {})}))
    return index


@case
def case_idx_traversal(d: Path) -> Path:
    # a readable file outside the folder that must not be read
    (d / "x.safetensors").write_bytes(write_good(d).read_bytes())
    return _index(d, "trav", {"a.weight": "../../x.safetensors", "a.bias": "model-1.safetensors"})


@case
def case_idx_absolute(d: Path) -> Path:
    outside = d / "abs.safetensors"
    outside.write_bytes(write_good(d).read_bytes())
    return _index(d, "abs", {"a.weight": str(outside), "a.bias": str(outside)})


@case
def case_idx_symlink_out(d: Path) -> Path:
    outside = d / "sym_target.safetensors"
    outside.write_bytes(write_good(d).read_bytes())
    index = _index(d, "sym", {"a.weight": "link.safetensors", "a.bias": "link.safetensors"})
    (index.parent / "link.safetensors").symlink_to(outside)
    return index


@case
def case_idx_missing_shard(d: Path) -> Path:
    return _index(d, "miss", {"a.weight": "model-2.safetensors", "a.bias": "model-1.safetensors"})


@case
def case_idx_weight_map_list(d: Path) -> Path:
    return _index(d, "list", ["model-1.safetensors"])


@case
def case_idx_shard_not_string(d: Path) -> Path:
    return _index(d, "nonstr", {"a.weight": 1, "a.bias": ["model-1.safetensors"]})


@case
def case_idx_stale(d: Path) -> Path:
    return _index(d, "stale", {"a.weight": "model-1.safetensors", "a.bias": "model-1.safetensors",
                               "b.weight": "model-1.safetensors"})


@case
def case_idx_nested(d: Path) -> Path:
    index = _index(d, "nest", {})
    index.write_text('{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}")
    return index


@case
def case_idx_not_json(d: Path) -> Path:
    index = _index(d, "notjson", {})
    index.write_bytes(b"\xff\xfe{weight_map")
    return index


# -- torch files, crafted without allocating what they declare ----------------------------------
class FakeStorage:
    def __init__(self, key: str, numel: int, cls: type = torch.FloatStorage):
        self.key, self.numel, self.cls = key, numel, cls


class FakeTensor:
    def __init__(self, st: FakeStorage, size: tuple, stride: tuple, offset: int = 0):
        self.st, self.size, self.stride, self.offset = st, size, stride, offset

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.st, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class Evil:
    """Runs `cmd` through `fn` when unpickled."""

    def __init__(self, fn: Callable, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _zip(path: Path, members: list[tuple[str, bytes, int, int | None]]) -> Path:
    """A zip written by hand: (name, data, method, declared size); method 8 means `data` is
    already a raw DEFLATE stream (so a bomb costs nothing to build). CRCs of bombs are 0."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, data, method, size in members:
        raw_name = name.encode()
        usize = len(data) if size is None else size
        crc = zlib.crc32(data) if method == 0 else 0
        off = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data),
                              usize, len(raw_name), 0) + raw_name + data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0,
                                  crc, len(data), usize, len(raw_name), 0, 0, 0, 0, 0, off)
                      + raw_name)
    cd = central.getvalue()
    start = out.tell()
    n = len(members)
    out.write(cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), start, 0))
    path.write_bytes(out.getvalue())
    return path


def write_pt(path: Path, obj: object, records: dict[str, bytes] | None = None,
             deflate: dict[str, tuple[bytes, int]] | None = None) -> Path:
    buf = io.BytesIO()
    if isinstance(obj, bytes):
        buf.write(obj)
    else:
        _Pickler(buf, protocol=2).dump(obj)
    members = [("archive/data.pkl", buf.getvalue(), 0, None), ("archive/byteorder", b"little", 0,
                                                               None)]
    members += [(f"archive/data/{k}", v, 0, None) for k, v in (records or {}).items()]
    members += [(f"archive/data/{k}", s, 8, n) for k, (s, n) in (deflate or {}).items()]
    members.append(("archive/version", b"3\n", 0, None))
    return _zip(path, members)


def _ok_tensors() -> dict:
    w = FakeTensor(FakeStorage("0", 12), (4, 3), (3, 1))
    b = FakeTensor(FakeStorage("1", 4), (4,), (1,))
    return {"a.weight": w, "a.bias": b}


def _ok_records() -> dict[str, bytes]:
    return {"0": GOOD["a.weight"].numpy().tobytes(), "1": GOOD["a.bias"].numpy().tobytes()}


def zeros_deflate(total: int, block: int = 1 << 24) -> bytes:
    """A raw DEFLATE stream of `total` zero bytes, from one compressed block repeated (full
    flushes reset the window, so each copy stands alone)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = co.compress(bytes(block)) + co.flush(zlib.Z_FULL_FLUSH)
    reps, rest = divmod(total, block)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    return one * reps + tail.compress(bytes(rest)) + tail.flush()


@case(bomb=True)
def case_pt_zip_bomb(d: Path) -> Path:
    n = 4_000_000_000  # bytes of zeros from ~4 MB of DEFLATE
    st = FakeStorage("0", n // 4)
    return write_pt(d / "bomb.bin", {"a.weight": FakeTensor(st, (n // 4,), (1,)),
                                     "a.bias": FakeTensor(FakeStorage("1", 4), (4,), (1,))},
                    {"1": bytes(16)}, deflate={"0": (zeros_deflate(n), n)})


@case(bomb=True)
def case_pt_zip_bomb_lying_size(d: Path) -> Path:
    n = 2_000_000_000  # declares 48 bytes, inflates to 2 GB
    return write_pt(d / "bomb_lie.bin", _ok_tensors(), {"1": bytes(16)},
                    deflate={"0": (zeros_deflate(n), 48)})


@case(bomb=True)
def case_pt_stride0(d: Path) -> Path:
    st = FakeStorage("0", 1)
    return write_pt(d / "stride0.pt", {"a.weight": FakeTensor(st, (100_000, 100_000), (0, 0)),
                                       "a.bias": FakeTensor(FakeStorage("1", 4), (4,), (1,))},
                    {"0": bytes(4), "1": bytes(16)})


@case(bomb=True)
def case_pt_overlapping_view(d: Path) -> Path:
    st = FakeStorage("0", 1000)
    return write_pt(d / "overlap.pt", {"a.weight": FakeTensor(st, (50_000, 1000), (1, 1)),
                                       "a.bias": FakeTensor(FakeStorage("1", 4), (4,), (1,))},
                    {"0": bytes(4000), "1": bytes(16)})


@case(bomb=True)
def case_pt_many_views(d: Path) -> Path:
    st = FakeStorage("0", 1 << 18)
    views = {f"v{i}": FakeTensor(st, (1 << 18,), (1,)) for i in range(4000)}
    return write_pt(d / "views.pt", views, {"0": bytes(1 << 20)})


@case
def case_pt_view_past_storage(d: Path) -> Path:
    st = FakeStorage("0", 12)
    return write_pt(d / "past.pt", {"a.weight": FakeTensor(st, (4, 3), (3, 1), offset=6),
                                    "a.bias": FakeTensor(FakeStorage("1", 4), (4,), (1,))},
                    {"0": bytes(48), "1": bytes(16)})


@case
def case_pt_numel_past_record(d: Path) -> Path:
    st = FakeStorage("0", 10**9)
    return write_pt(d / "numel.pt", {"a.weight": FakeTensor(st, (10**9,), (1,))}, {"0": bytes(48)})


@case
def case_pt_int_keys(d: Path) -> Path:
    t = _ok_tensors()
    return write_pt(d / "intkeys.pt", {1: t["a.weight"], 2: t["a.bias"]}, _ok_records())


@case
def case_pt_tuple_keys(d: Path) -> Path:
    t = _ok_tensors()
    return write_pt(d / "tuplekeys.pt", {("a", "weight"): t["a.weight"], "a.bias": t["a.bias"]},
                    _ok_records())


@case
def case_pt_escape_key(d: Path) -> Path:
    t = _ok_tensors()
    return write_pt(d / "esckey.pt", {"\x1b[2Ja.weight": t["a.weight"], "a.bias": t["a.bias"]},
                    _ok_records())


@case
def case_pt_deep_wrappers(d: Path) -> Path:
    obj: object = _ok_tensors()
    for _ in range(200):
        obj = {"state_dict": obj}
    return write_pt(d / "deepwrap.pt", obj, _ok_records())


@case
def case_pt_deep_list(d: Path) -> Path:
    n, key = 100_000, b"a.weight"  # opcodes by hand: pickling this would hit the recursion limit
    raw = b"\x80\x02}X" + struct.pack("<I", len(key)) + key + b"]" * n + b"a" * (n - 1) + b"s."
    return write_pt(d / "deeplist.pt", raw)


@case
def case_pt_not_a_dict(d: Path) -> Path:
    t = _ok_tensors()
    return write_pt(d / "list.pt", [t["a.weight"], t["a.bias"]], _ok_records())


@case
def case_pt_no_tensors(d: Path) -> Path:
    return write_pt(d / "notensors.pt", {"a.weight": 1.5, "a.bias": "x"})


@case
def case_pt_overlapping_members(d: Path) -> Path:
    good = write_pt(d / "_tmp.pt", _ok_tensors(), _ok_records()).read_bytes()
    # point the second member's central-directory entry at the first member's header
    cd = good.rfind(b"PK\x01\x02")
    patched = good[: cd + 42] + struct.pack("<I", 0) + good[cd + 46:]
    (d / "overlap_members.pt").write_bytes(patched)
    return d / "overlap_members.pt"


@case
def case_pt_truncated_zip(d: Path) -> Path:
    good = write_pt(d / "_tmp2.pt", _ok_tensors(), _ok_records()).read_bytes()
    (d / "trunc.pt").write_bytes(good[: len(good) // 2])
    return d / "trunc.pt"


@case
def case_pt_garbage(d: Path) -> Path:
    (d / "garbage.bin").write_bytes(os.urandom(4096))
    return d / "garbage.bin"


def _evil_cases() -> None:
    import builtins
    import posix
    import subprocess

    def canary_cmd(d: Path) -> str:
        return f"touch {d / CANARY}"

    makers: dict[str, Callable[[Path], object]] = {
        "os_system": lambda d: Evil(os.system, canary_cmd(d)),
        "posix_system": lambda d: Evil(posix.system, canary_cmd(d)),
        "subprocess_call": lambda d: Evil(subprocess.call, ["touch", str(d / CANARY)]),
        "builtins_exec": lambda d: Evil(builtins.exec, f"open({str(d / CANARY)!r}, 'w')"),
        "builtins_eval": lambda d: Evil(builtins.eval, f"open({str(d / CANARY)!r}, 'w')"),
        "in_module_state": lambda d: _module_with(Evil(os.system, canary_cmd(d))),
    }
    for kind, make in makers.items():
        for container in ("zip", "legacy"):
            def build(d: Path, make=make, kind=kind, container=container) -> Path:
                path = d / f"evil_{kind}_{container}.pt"
                obj = {"a.weight": GOOD["a.weight"], "a.bias": make(d)}
                if container == "zip":
                    torch.save(obj, path)
                else:
                    torch.save(obj, path, _use_new_zipfile_serialization=False)
                return path

            build.__name__ = f"case_pt_evil_{kind}_{container}"
            case(build)


class _Module:
    pass


def _module_with(payload: object) -> object:
    m = _Module()
    m.__dict__.update(_parameters={"weight": GOOD["a.weight"]}, _modules={}, hook=payload)
    return m


_evil_cases()


# -- runner -------------------------------------------------------------------------------------
def run_case(argv: list[str], log: Path) -> tuple[int, int]:
    """(exit status, peak RSS in bytes) of `tvtool *argv` in a forked child."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            import torch

            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(fd, 1)
            sys.argv = ["tvtool", *argv]
            from tvtool.cli.app import main

            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 98
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, usage.ru_maxrss * 1024


def main(root: Path, names: list[str]) -> dict:
    import tvtool.cli.app  # noqa: F401 - imported once, before the forks
    from tvtool.vectors import extract  # noqa: F401

    root.mkdir(parents=True, exist_ok=True)
    good = write_good(root)
    paths = {}
    for name in names:
        (root / name).mkdir()
        paths[name] = CASES[name](root / name)
    control = root / "control"
    code, baseline = run_case(["extract", str(good), str(good), "--store", str(control)],
                              root / "control.txt")
    assert code == 0, (root / "control.txt").read_text()
    results = {}
    for name in names:
        d, path = root / name, paths[name]
        runs = []
        pairs = [(good, path), (path, good)] if name in BOTH_WAYS else [(good, path)]
        for argv in (["extract", str(a), str(b)] for a, b in pairs):
            log = d / f"log{len(runs)}.txt"
            code, rss = run_case(argv + ["--store", str(d / "store")], log)
            runs.append({"argv": argv, "code": code, "rss": rss, "stderr": log.read_text(
                errors="replace")})
        results[name] = {"runs": runs, "canary": (d / CANARY).exists(), "dir": str(d)}
    return {"control_rss": baseline, "results": results}


if __name__ == "__main__":
    out = main(Path(sys.argv[1]), sys.argv[2:] or list(CASES))
    print(json.dumps(out))
