"""Vetting pickled model files: no side effects, linear cost, research checkpoints load, corrupt and
malicious files refused (DESIGN §5). Malicious files come from other people's corpora: payloads injected
with fickling into real torch.save files, and picklescan's and modelscan's own samples, re-created."""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import io
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import types
import zipfile

import pytest
import torch
from torch import nn

from graphsparse.errors import ModelSourceError, UnsafePickleError
from graphsparse.sources import pickle_scan, safe_pickle
from graphsparse.sources.safe_pickle import read_pickle, scan_file

np = pytest.importorskip("numpy")


def run_fresh(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet), as a user's first command would."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def suggested(message: str) -> list[str]:
    """The allow_modules a refusal tells the user to pass."""
    found = re.search(r"\(Python: allow_modules=(\[.*?\])\)", message)
    assert found, message
    return ast.literal_eval(found[1])


# ------------------------------------------------------------------------------------------ robustbench alias


@pytest.mark.slow
def test_autoattack_alias_lets_robustbench_import_in_a_fresh_process():
    done = run_fresh(
        """
        from graphsparse._compat import ensure_autoattack_alias
        assert ensure_autoattack_alias() and ensure_autoattack_alias()  # safe to call twice
        import autoattack, autoattack.state, pyautoattack.state
        assert autoattack.state is pyautoattack.state  # one module under both names
        import robustbench.eval
        from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_whole_robustbench_module_loads_in_a_fresh_process(tmp_path, robustbench_archs):
    dm_wide_resnet, _ = robustbench_archs
    torch.manual_seed(0)
    model = dm_wide_resnet.DMWideResNet(num_classes=10, depth=10, width=1).eval()
    torch.save(model, tmp_path / "dm.pt")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    torch.save(x, tmp_path / "x.pt")
    done = run_fresh(
        f"""
        import sys, torch
        from graphsparse.sources.safe_pickle import read_pickle
        model = read_pickle({str(tmp_path / "dm.pt")!r}, [])  # no flag: robustbench is trusted
        x, y = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "y.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(x), y)
        print(type(model).__module__, type(model).__name__)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["robustbench.model_zoo.architectures.dm_wide_resnet", "DMWideResNet"]


# ------------------------------------------------------------------------------------------ no side effects


# GLOBAL <module> main, called with one argument: vetting must decide without importing the module
_PROGRAMS = ["graphsparse.__main__", "torch.utils.model_dump.__main__", "timm.__main__"]


@pytest.mark.slow
@pytest.mark.parametrize("allow", [[], ["graphsparse.__main__.main", "torch.utils.model_dump"]])
def test_a_pickle_naming_a_program_is_refused_without_importing_it(tmp_path, allow):
    files = []
    for i, module in enumerate(_PROGRAMS):
        files.append(tmp_path / f"main{i}.pt")
        files[-1].write_bytes(b"\x80\x02c" + module.encode() + b"\nmain\nX\x01\x00\x00\x00a\x85R.")
    # in a fresh process: importing graphsparse.__main__ runs the CLI, which ends the process (SystemExit)
    done = run_fresh(
        f"""
        import sys
        from graphsparse.errors import UnsafePickleError
        from graphsparse.sources.safe_pickle import read_pickle
        for path in {[str(f) for f in files]!r}:
            try:
                read_pickle(path, {allow!r})
            except UnsafePickleError as e:
                assert "never imported" in str(e) and "allow them with" not in str(e), str(e)
                print("refused")
        print(sorted(m for m in sys.modules if m.endswith("__main__") and m != "__main__"))
        """
    )
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    assert done.stdout.split("\n")[:4] == ["refused"] * 3 + ["[]"]


def test_scan_imports_nothing_the_file_names(tmp_path, monkeypatch):
    # a trusted-looking name whose module exists but is not imported yet, a callee and an argument
    raw = b"\x80\x02ctorch.utils.bottleneck.__main__\nmain\nctimm.layers\nFormat\n\x85R."
    (tmp_path / "b.pt").write_bytes(raw)
    imported = []
    real = safe_pickle.importlib.import_module
    monkeypatch.setattr(
        safe_pickle.importlib, "import_module", lambda n, *a, **k: imported.append(n) or real(n, *a, **k)
    )
    with pytest.raises(UnsafePickleError, match="torch.utils.bottleneck.__main__ is a program"):
        read_pickle(tmp_path / "b.pt", [])
    assert not any("__main__" in name for name in imported)


def test_resolve_global_finds_classes_statically_and_refuses_programs():
    assert safe_pickle.resolve_global("torch.nn.modules.linear.Linear") is nn.Linear
    assert safe_pickle.resolve_global("timm.layers.Format").__name__ == "Format"  # via a package's attribute
    for name, why in [
        ("graphsparse.__main__.main", "is a program"),
        ("torch.nn.functional.torch.hub.load", "through a module"),
        ("torch.nn", "names a module"),
        ("torch.nn.modules.linear.NoSuchThing", "no attribute path"),
    ]:
        with pytest.raises(LookupError, match=why):
            safe_pickle.resolve_global(name)
    assert "graphsparse.__main__" not in sys.modules


def test_functions_living_in_extension_modules_resolve(tmp_path):
    # F.gelu and F.hardtanh_ are torch._C._nn's: the module chain passes through torch._C, a plain
    # (extension) module whose submodule is already imported
    model = nn.Sequential(nn.Linear(2, 2))
    model.gate, model.clip = torch.nn.functional.gelu, torch.nn.functional.hardtanh_
    assert model.gate.__module__ == "torch._C._nn"
    torch.save(model, tmp_path / "gelu.pt")
    loaded = read_pickle(tmp_path / "gelu.pt", [])
    assert loaded.gate is torch.nn.functional.gelu and loaded.clip is torch.nn.functional.hardtanh_


# ------------------------------------------------------------------------------------------ linear cost


def opcode_bomb(n_globals: int, n_tuple1: int) -> bytes:
    """A list of ``n_globals`` distinct globals wrapped in ``n_tuple1`` one-tuples: a value holding many
    globals, rebuilt at every opcode (the scan copied its set of globals each time: quadratic)."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for i in range(n_globals):
        out += b"cgs_bomb_mod\nf%d\n" % i
    out += b"e" + b"\x85" * n_tuple1 + b"."  # APPENDS, TUPLE1 x n, STOP
    return bytes(out)


@pytest.mark.slow
def test_the_tuple1_bomb_is_scanned_in_linear_time(tmp_path):
    # 0.8 MB, 20,000 globals and 400,000 TUPLE1: the quadratic scan ran for tens of minutes
    (tmp_path / "bomb.pkl").write_bytes(opcode_bomb(20_000, 400_000))
    done = run_fresh(
        f"""
        from graphsparse.errors import UnsafePickleError
        from graphsparse.sources.safe_pickle import read_pickle, scan_file
        scan = scan_file({str(tmp_path / "bomb.pkl")!r})
        print(scan.opcodes, len(scan.imports))
        try:
            read_pickle({str(tmp_path / "bomb.pkl")!r}, [])
        except UnsafePickleError as e:
            print(str(e).splitlines()[-2])
        """,
        timeout=300,  # generous: about a second here
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts, listed = done.stdout.splitlines()[:2]
    assert counts == f"{1 + 1 + 1 + 1 + 20_000 + 1 + 400_000 + 1} 20000"
    assert listed == "  ... and 19980 more"  # the refusal lists 20 globals, not 20,000


def test_values_are_shared_not_copied(tmp_path):
    # the structure that makes the scan linear: wrapping a value holding many globals adds one small node
    # per opcode and copies no set of globals
    stream = io.BytesIO(opcode_bomb(50, 1000))
    scan = pickle_scan._scan_pickles(stream, tmp_path / "x", limit=1, legacy=False)
    assert scan.opcodes == 1 + 1 + 1 + 1 + 50 + 1 + 1000 + 1 and len(scan.imports) == 50
    value = pickle_scan._Slot
    created = []
    real_init = value.__init__

    def counting(self, kids=None, name=None):
        created.append(len(kids or ()))
        real_init(self, kids, name)

    value.__init__ = counting
    try:
        pickle_scan._scan_pickles(io.BytesIO(opcode_bomb(50, 1000)), tmp_path / "x", limit=1, legacy=False)
    finally:
        value.__init__ = real_init
    assert len(created) <= 50 + 1000 + 10 and max(created) <= 50  # one node per opcode, kids never grow


def test_more_opcodes_than_the_cap_is_a_clear_refusal(tmp_path, monkeypatch):
    (tmp_path / "long.pkl").write_bytes(opcode_bomb(3, 100))
    monkeypatch.setattr(pickle_scan, "MAX_PICKLE_OPCODES", 50)
    with pytest.raises(ModelSourceError, match=r"more than 50 opcodes.*\.safetensors"):
        scan_file(tmp_path / "long.pkl")


# ------------------------------------------------------------------------------------------ research checkpoints


def research_checkpoint() -> dict:
    """What training scripts really save beside the weights."""
    rng = np.random.default_rng(0)
    return {
        "state_dict": nn.Linear(2, 2).state_dict(),
        "best_acc": np.float64(0.9375),
        "epoch_int": np.int64(7),
        "flag": np.bool_(True),
        "confusion": np.arange(6, dtype=np.int32).reshape(2, 3),
        "dtype": np.dtype("float64"),
        "dtype_class": type(np.dtype("float64")),  # numpy.dtypes.Float64DType
        "np_rng_state": np.random.get_state(),
        "generator": rng,
        "bit_generator_state": rng.bit_generator.state,
        "random_state": np.random.RandomState(3),
        "args": argparse.Namespace(lr=0.1, arch="wrn-28-10", milestones=[100, 150]),
        "config": types.SimpleNamespace(eps=8 / 255, steps=10),
        "ordered": collections.OrderedDict(a=1),
        "counts": collections.Counter("aab"),
        "per_class": collections.defaultdict(list, {"cat": [1, 2]}),
        "out_dir": pathlib.PurePosixPath("/runs/wrn"),
        "log_dir": pathlib.Path("runs/wrn"),
        "started": datetime.datetime(2024, 5, 1, 12, 30),
        "took": datetime.timedelta(hours=3),
    }


def assert_same_checkpoint(loaded: dict, saved: dict) -> None:
    assert set(loaded) == set(saved)
    for key in ("best_acc", "epoch_int", "flag", "dtype", "dtype_class", "args", "config", "ordered", "counts"):
        assert loaded[key] == saved[key] and type(loaded[key]) is type(saved[key]), key
    assert np.array_equal(loaded["confusion"], saved["confusion"]) and loaded["confusion"].dtype == np.int32
    name, keys, pos, gauss, cached = loaded["np_rng_state"]
    assert name == "MT19937" and np.array_equal(keys, saved["np_rng_state"][1]) and pos == saved["np_rng_state"][2]
    assert loaded["generator"].bit_generator.state == saved["generator"].bit_generator.state
    assert loaded["generator"].random() == np.random.default_rng(0).random()  # the stream continues
    assert loaded["bit_generator_state"] == saved["bit_generator_state"]
    assert loaded["random_state"].randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)
    assert loaded["per_class"] == {"cat": [1, 2]}  # a dict: torch's weights-only loader fills only dicts
    for key in ("out_dir", "log_dir", "started", "took"):
        assert loaded[key] == saved[key], key
    assert torch.equal(loaded["state_dict"]["weight"], saved["state_dict"]["weight"])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_research_checkpoint_data_loads_with_no_flag(tmp_path, legacy):
    saved = research_checkpoint()
    torch.save(saved, tmp_path / "ck.pt", _use_new_zipfile_serialization=not legacy)
    assert_same_checkpoint(read_pickle(tmp_path / "ck.pt", []), saved)


def test_numpy_1x_names_load_too(tmp_path):
    # numpy 1.x pickles name numpy.core.multiarray; numpy 2 names numpy._core.multiarray
    torch.save({"acc": np.float64(0.5), "a": np.ones(3)}, tmp_path / "np2.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "np2.pt").read_bytes()
    assert b"numpy._core.multiarray" in data
    (tmp_path / "np1.pt").write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded = read_pickle(tmp_path / "np1.pt", [])
    assert loaded["acc"] == 0.5 and np.array_equal(loaded["a"], np.ones(3))


def test_numpy_functions_that_run_code_are_refused(tmp_path):
    class Payload:
        def __init__(self, func, *args):
            self.func, self.args = func, args

        def __reduce__(self):
            return self.func, self.args

    sentinel = tmp_path / "pwned.npy"
    cases = {
        "load.pt": Payload(np.load, str(sentinel), None, True),  # allow_pickle: unpickles another file
        "save.pt": Payload(np.save, str(sentinel), np.zeros(1)),
        # a bit generator constructor handed a module class: the class's constructor would run
        "ctor.pt": Payload(np.random._pickle.__bit_generator_ctor, nn.Linear),
    }
    for name, payload in cases.items():
        torch.save({"state_dict": {}, "x": payload}, tmp_path / name)
        with pytest.raises(UnsafePickleError) as info:
            read_pickle(tmp_path / name, [])
        assert "Nothing in the file was executed" in str(info.value)
    assert not sentinel.exists()
    assert "torch.nn.modules.linear.Linear: the file has its constructor run" in str(info.value)


# ------------------------------------------------------------------------------------------ one flag, first time


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """An installed package nobody trusts yet: a module class, a class built by a reduce, a function."""
    pkg = tmp_path / "site" / "gs_user_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(2, 2)

                def forward(self, x):
                    return self.fc(x)

            class Settings:
                def __init__(self, depth):
                    self.depth = depth

                def __reduce__(self):
                    return Settings, (self.depth,)

            def scaled(x):
                return x * 2

            def rebuild(depth):
                return {"depth": depth}

            class Rebuilt:
                def __init__(self, depth):
                    self.depth = depth

                def __reduce__(self):
                    return rebuild, (self.depth,)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import gs_user_pkg.models

    yield gs_user_pkg.models
    for name in [m for m in sys.modules if m.startswith("gs_user_pkg")]:
        del sys.modules[name]


def test_the_suggested_flags_work_the_first_time(tmp_path, user_package):
    net = user_package.Net()
    net.act = user_package.scaled  # a function stored as a value
    files = {
        "module.pt": net,
        "settings.pt": {"state_dict": {}, "cfg": user_package.Settings(3)},  # a class called with its args
        "rebuilt.pt": {"state_dict": {}, "cfg": user_package.Rebuilt(4)},  # a function called while loading
        "mixed.pt": {"model": net, "cfg": user_package.Rebuilt(4), "acc": np.float64(1.0)},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(UnsafePickleError) as info:
            read_pickle(tmp_path / name, [])
        flags = suggested(str(info.value))
        read_pickle(tmp_path / name, flags)  # the one thing to do works
        if name == "rebuilt.pt":
            assert flags == ["gs_user_pkg.models.rebuild"]  # a function called needs its exact name
        if name == "module.pt":
            assert flags == ["gs_user_pkg"]


def test_a_refusal_no_flag_can_fix_says_what_to_do_instead(tmp_path):
    # a computed global name (STACK_GLOBAL of a call's result), a package that is not installed
    raw_computed = b"\x80\x04\x8c\x02osN\x85R\x8c\x06system\x93\x8c\x02id\x85R."
    (tmp_path / "computed.pkl").write_bytes(raw_computed)
    (tmp_path / "missing.pkl").write_bytes(b"\x80\x02cgs_not_installed_pkg\nThing\n)\x81.")
    for name in ("computed.pkl", "missing.pkl"):
        with pytest.raises(UnsafePickleError) as info:
            read_pickle(tmp_path / name, [])
        message = str(info.value)
        assert "allow them with" not in message and "allow_modules=[]" not in message
        assert "No --allow-module can admit" in message and "--arch" in message
    assert "install gs_not_installed_pkg" in message


# ------------------------------------------------------------------------------------------ legacy, corrupt


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_whole_modules_load_from_both_formats(tmp_path, legacy):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    model.extra = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())  # a container class saved once, reused
    torch.save(model, tmp_path / "m.pt", _use_new_zipfile_serialization=not legacy)
    loaded = read_pickle(tmp_path / "m.pt", [])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert type(loaded.extra[0]) is nn.Conv2d


def test_the_legacy_loaders_stand_in_is_named_by_its_real_path():
    # a legacy file's module ids are rewritten to call the function this string names: it must resolve
    # to that function wherever the function lives
    found = safe_pickle.resolve_global(safe_pickle._MODULE_ID_CLASS)
    assert found is safe_pickle._module_id_class and found(("module", nn.Linear, "", "")) is nn.Linear


def test_the_public_names_import_from_safe_pickle_and_their_home_module():
    from graphsparse.sources import pickle_policy

    for name in safe_pickle.__all__:
        home = pickle_scan if name in pickle_scan.__all__ else pickle_policy if name in pickle_policy.__all__ else None
        assert home is None or getattr(safe_pickle, name) is getattr(home, name), name
    assert {"scan_file", "verify_zip", "PickleScan", "MAX_PICKLE_OPCODES"} <= set(pickle_scan.__all__)
    assert {"class_problem", "data_global", "resolve_global", "user_allowed", "TRUSTED_PACKAGES"} <= set(
        pickle_policy.__all__
    )


def zip_member_offset(path: pathlib.Path, suffix: str) -> int:
    """Where the bytes of the zip member ending in ``suffix`` start."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    data = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def test_a_zip_member_damaged_inside_a_weight_is_named(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "ok.pt")
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    start = zip_member_offset(tmp_path / "ok.pt", "/data/0")
    data[start + 400 : start + 440] = bytes(40)  # zeroes inside the tensor's bytes
    (tmp_path / "bad.pt").write_bytes(data)
    assert torch.load(tmp_path / "bad.pt", weights_only=True)["w"][100:110].eq(0).all()  # torch does not notice
    with pytest.raises(ModelSourceError, match=r"bad\.pt is corrupt: its member 'ok/data/0' does not match"):
        read_pickle(tmp_path / "bad.pt", [])


def test_a_zip_written_without_crcs_still_loads(tmp_path):
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(10.0)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(before)
    assert torch.equal(read_pickle(tmp_path / "nocrc.pt", [])["w"], torch.arange(10.0))


# ------------------------------------------------------------------------------------------ other people's corpora

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_scan.py"


@pytest.fixture(scope="module")
def bench_scan():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scan", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scan"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_scan"]


@pytest.mark.slow
def test_malicious_corpora_are_refused_without_running_and_benign_files_load(tmp_path, bench_scan):
    pytest.importorskip("fickling")
    corpus = bench_scan.build_corpus(tmp_path / "corpus")
    sources = {s.source for s in corpus if s.malicious}
    assert sources == {"fickling", "picklescan", "modelscan"} and sum(s.malicious for s in corpus) > 80
    # every file in one fresh process, each verdict printed as it comes: a payload that ends the process
    # (sys.exit), hangs or runs shows as a missing verdict, a timeout or a sentinel file
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import json, sys
                from graphsparse.errors import GraphsparseError
                from graphsparse.sources.safe_pickle import read_pickle
                for path in sys.argv[1:]:
                    try:
                        read_pickle(path, [])
                        verdict = "loaded"
                    except GraphsparseError as e:
                        verdict = type(e).__name__
                    print(json.dumps([path, verdict]), flush=True)
                print("done")
                """
            ),
            *[str(s.path) for s in corpus],
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BROWSER": f"touch {tmp_path / 'corpus' / 'sentinels' / 'browser'}"},
    )
    assert done.returncode == 0 and done.stdout.rstrip().endswith("done"), done.stderr[-3000:]
    verdicts = dict(json.loads(line) for line in done.stdout.splitlines()[:-1])
    ran = sorted(p.name for p in (tmp_path / "corpus" / "sentinels").iterdir() if not p.name.endswith(".py"))
    assert ran == []
    for sample in corpus:
        verdict = verdicts[str(sample.path)]
        if sample.malicious:
            assert verdict in ("UnsafePickleError", "ModelSourceError"), sample.name
        elif sample.name.endswith(".pt"):  # torch.save files; picklescan's benign lists are not checkpoints
            assert verdict == "loaded", sample.name
    refused = [s for s in corpus if s.malicious and verdicts[str(s.path)] == "UnsafePickleError"]
    assert len(refused) >= sum(s.malicious for s in corpus) - 2  # not merely unreadable
