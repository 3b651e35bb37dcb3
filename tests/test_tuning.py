"""Tuning (issue 12): MetaSchedule database written, resumed, applied bit-exactly; RPC farm path.

One small graph is tuned once per module (2 trials per task); the other tests reuse its database.
No mocks: real MetaSchedule searches, builders, runners and a loopback RPC tracker."""
import json
import os
import socket
import warnings

import numpy as np
import pytest

import flexiq_tvm as fq
from flexiq_tvm.errors import FlexiQError
from flexiq_tvm.quant.plan import PlanError

from conftest import GRAPHS

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, graph):
    d = tmp_path_factory.mktemp("tune")
    shape, steps = GRAPHS["conv_stack"]
    g = graph(shape, seed=3)
    steps(g)
    path = g.save(d / "conv_stack.onnx")
    model = fq.load_model(path)
    calib = np.random.default_rng(0).standard_normal((16,) + shape).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=8, search="range", recover=False, progress=False)
    plan_path = str(d / "plan.json")
    plan.save(plan_path)
    return {"dir": d, "path": path, "model": model, "plan": plan, "plan_path": plan_path, "shape": shape}


@pytest.fixture(scope="module")
def tuned(tiny):
    db = str(tiny["dir"] / "db")
    report = fq.tune(tiny["model"], tiny["plan"], target="llvm", trials=2, db=db, seed=0, progress=False)
    return {"db": db, "report": report}


@pytest.fixture(scope="module")
def graph():
    from conftest import GraphBuilder

    return GraphBuilder


def _records(db_dir):
    sub = [d for d in os.listdir(db_dir) if d.startswith("llvm")]
    assert len(sub) == 1, os.listdir(db_dir)
    with open(os.path.join(db_dir, sub[0], "database_tuning_record.json")) as f:
        return sub[0], [json.loads(line) for line in f if line.strip()]


def test_tune_writes_database_and_resumes(tiny, tuned):
    rep = tuned["report"]
    assert rep.trials >= 1 and rep.tasks
    kinds = {t.kind for t in rep.tasks}
    assert kinds == {"flexiq", "fused"}, kinds
    assert "run-time input" in rep.ratio_note            # llvm: tuned once, and the report says so
    assert "ratios" in rep.format()
    key, recs = _records(tuned["db"])
    assert key == rep.target_key and len(recs) >= 1
    # MetaSchedule reads its own database back
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=os.path.join(tuned["db"], key), allow_missing=False)
    assert len(db.get_all_tuning_records()) == len(recs)
    # a second call finds every task tuned to budget: nothing is measured again
    again = fq.tune(tiny["model"], tiny["plan"], target="llvm", trials=2, db=tuned["db"], seed=0, progress=False)
    assert again.trials == 0, again.format()
    assert all(t.status in ("done before", "space exhausted", "not tunable") for t in again.tasks), again.format()
    assert len(_records(tuned["db"])[1]) == len(recs)


def test_tuned_build_bit_exact_at_every_ratio(tiny, tuned):
    model, plan = tiny["model"], tiny["plan"]
    x = np.random.default_rng(5).standard_normal((1,) + tiny["shape"]).astype(np.float32) * 1.5
    plain = fq.compile(model, plan)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tuned_cm = fq.compile(model, plan, tuning_db=tuned["db"])
    from flexiq_tvm.tuning.apply import UntunedWarning

    untuned = [w for w in rec if issubclass(w.category, UntunedWarning)]
    assert len(untuned) <= 1
    for r in RATIOS:
        plain.set_ratio(r)
        tuned_cm.set_ratio(r)
        a, b = plain(x), tuned_cm(x)
        assert np.array_equal(a, b), (r, float(np.abs(a - b).max()))


def test_missing_records_one_warning(tiny, tuned):
    """Another batch size: other workloads, none in the database: one warning names them."""
    from flexiq_tvm.tuning.apply import UntunedWarning

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cm = fq.compile(tiny["model"], tiny["plan"], batch_size=3, tuning_db=tuned["db"])
    msgs = [str(w.message) for w in rec if issubclass(w.category, UntunedWarning)]
    assert len(msgs) == 1, msgs
    assert "flexiq_quantize_0" in msgs[0] and "no record" in msgs[0]
    x = np.random.default_rng(2).standard_normal((3,) + tiny["shape"]).astype(np.float32)
    ref = fq.compile(tiny["model"], tiny["plan"], batch_size=3)
    cm.set_ratio(0.5)
    ref.set_ratio(0.5)
    assert np.array_equal(cm(x), ref(x))


def test_record_that_does_not_replay_is_left_out(tiny, tuned, tmp_path):
    """MetaSchedule opens a JSON database by replaying every record and fails as a whole on one bad
    record (TVM 0.27 wrote such records for a float mean reduction of MobileNetV2): the loader
    leaves that record out with one warning, the build still applies the others, and `repair`
    rewrites the file so that MetaSchedule itself opens it again."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from flexiq_tvm.targets.llvm import host_target
    from flexiq_tvm.tuning.database import TuningDB

    db = str(tmp_path / "db")
    shutil.copytree(tuned["db"], db)
    sub, recs = _records(db)
    path = os.path.join(db, sub, "database_tuning_record.json")
    idx, rec = recs[0]
    broken = [idx, [[[["GetSBlock", [], ["no_such_block", "main"], ["b0"]]], []]] + rec[1:]]
    with open(path, "a") as f:
        f.write(json.dumps(broken) + "\n")
    with pytest.raises(Exception):
        ms.database.JSONDatabase(work_dir=os.path.join(db, sub), module_equality="structural")
    x = np.random.default_rng(4).standard_normal((1,) + tiny["shape"]).astype(np.float32)
    with warnings.catch_warnings(record=True) as rec_w:
        warnings.simplefilter("always")
        cm = fq.compile(tiny["model"], tiny["plan"], tuning_db=db)
    left_out = [str(w.message) for w in rec_w if "no longer replays" in str(w.message)]
    assert len(left_out) == 1 and "1 record(s)" in left_out[0], left_out
    ref = fq.compile(tiny["model"], tiny["plan"])
    cm.set_ratio(0.5), ref.set_ratio(0.5)
    assert np.array_equal(cm(x), ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert TuningDB(db, host_target()).repair() == 1
    assert len(_records(db)[1]) == len(recs)
    ms.database.JSONDatabase(work_dir=os.path.join(db, sub), module_equality="structural")


def test_tune_errors(tiny, tmp_path):
    model, plan = tiny["model"], tiny["plan"]
    with pytest.raises(ValueError, match="unknown tuning target"):
        fq.tune(model, plan, target="tpu", db=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="trials"):
        fq.tune(model, plan, trials=0, db=str(tmp_path / "a"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FlexiQError, match="not writable|not a directory"):
        fq.tune(model, plan, trials=1, db=str(blocker / "db"))
    with pytest.raises(FlexiQError, match="GPU"):
        fq.tune(model, plan, target="cuda", trials=1, db=str(tmp_path / "a"))
    with pytest.raises(FlexiQError, match="HOST:PORT"):
        fq.tune(model, plan, trials=1, db=str(tmp_path / "a"), rpc_tracker="nohostport", rpc_key="k")
    with pytest.raises(FileNotFoundError):
        fq.compile(model, plan, tuning_db=str(tmp_path / "missing"))
    g_shape, steps = GRAPHS["depthwise"]
    from conftest import GraphBuilder

    g = GraphBuilder(g_shape, seed=1)
    steps(g)
    wrong = fq.load_model(g.save(tmp_path / "other.onnx"))
    with pytest.raises(PlanError):
        fq.tune(wrong, plan, trials=1, db=str(tmp_path / "a"))


def test_cli_tune_and_compile_with_db(tiny, tuned, tmp_path, capsys):
    from flexiq_tvm.cli import main

    out = str(tmp_path / "report.json")
    rc = main(["tune", tiny["path"], "--plan", tiny["plan_path"], "--db", tuned["db"], "--trials", "2", "--quiet",
               "--json", out])
    assert rc == 0
    text = capsys.readouterr().out
    assert "already tuned to budget" in text and "run-time input" in text
    with open(out) as f:
        rep = json.load(f)
    assert rep["trials"] == 0 and rep["target"] == "llvm"
    art = str(tmp_path / "tuned.so")
    assert main(["compile", tiny["path"], "--plan", tiny["plan_path"], "--db", tuned["db"], "-o", art,
                 "--quiet"]) == 0
    assert os.path.getsize(art) > 0
    assert main(["tune", tiny["path"], "--plan", tiny["plan_path"], "--target", "tpu", "--db",
                 str(tmp_path / "d")]) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_tracker_loopback(tmp_path, graph):
    """A tracker and two RPC servers on this machine: a one-layer model is tuned through them and
    the database has the local format (same files, same record layout, same target)."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    g = graph((4, 6, 6), seed=2)
    g.conv(4, 8, 3, 1, 1)
    model = fq.load_model(g.save(tmp_path / "one.onnx"))
    calib = np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32)
    plan = fq.quantize(model, calib, group_size=4, search="range", recover=False, progress=False)
    port = _free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 50, silent=True)
    servers = []
    try:
        for _ in range(2):
            p = _free_port()
            servers.append(rpc.Server("127.0.0.1", port=p, port_end=p + 50, key="flexiq-test",
                                      tracker_addr=("127.0.0.1", tracker.port), silent=True))
        import time

        for _ in range(50):   # the servers register with the tracker
            summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            if len(summary.get("server_info", [])) >= 2:
                break
            time.sleep(0.2)
        remote_db, local_db = str(tmp_path / "remote"), str(tmp_path / "local")
        rep = fq.tune(model, plan, trials=1, db=remote_db, progress=False,
                      rpc_tracker=f"127.0.0.1:{tracker.port}", rpc_key="flexiq-test")
        assert rep.rpc and rep.trials >= 1
        fq.tune(model, plan, trials=1, db=local_db, progress=False)
        (rkey, rrecs), (lkey, lrecs) = _records(remote_db), _records(local_db)
        assert rkey == lkey
        assert sorted(os.listdir(os.path.join(remote_db, rkey))) == sorted(os.listdir(os.path.join(local_db, lkey)))
        assert rrecs and lrecs
        shape = lambda r: (type(r[0]).__name__, len(r[1]), tuple(type(v).__name__ for v in r[1]))  # noqa: E731
        assert {shape(r) for r in rrecs} == {shape(r) for r in lrecs}
        assert {json.dumps(r[1][2], sort_keys=True) for r in rrecs} == {json.dumps(r[1][2], sort_keys=True)
                                                                        for r in lrecs}
        # and a build applies it
        x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
        a, b = fq.compile(model, plan, tuning_db=remote_db), fq.compile(model, plan)
        a.set_ratio(0.5)
        b.set_ratio(0.5)
        assert np.array_equal(a(x), b(x))
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()


def test_tune_npu_dispatch(tiny, tmp_path):
    """target="npu" hands over to the NPU's own tuner (flexiq_tvm.targets.npu.tune.tune_npu)."""
    try:
        from flexiq_tvm.targets.npu.tune import tune_npu  # noqa: F401
    except ImportError:
        with pytest.raises(FlexiQError, match="npu"):
            fq.tune(tiny["model"], tiny["plan"], target="npu", trials=1, db=str(tmp_path / "db"))
        return
    out = fq.tune(tiny["model"], tiny["plan"], target="npu", trials=1, db=str(tmp_path / "db"), progress=False)
    assert os.path.isdir(tmp_path / "db" / "npu")
    assert out is not None


def test_tensor_intrinsics_import_without_the_stack_scans():
    """`import_tensor_intrinsics` (run before MetaSchedule's TuneContext would import them) gives
    TVMScript the same stack records `inspect.stack` would, and registers every intrinsic the
    module names. Run in a fresh interpreter: in this one they may be imported already."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import inspect, sys, time
        from flexiq_tvm.tuning.fast_import import _frame_stack, import_tensor_intrinsics

        def inner(context):
            return inspect.stack(context), _frame_stack(context)

        def outer(context):
            return inner(context)

        for context in (0, 1, 3):
            ref, got = outer(context)
            assert len(ref) == len(got), (len(ref), len(got))
            for r, g in zip(ref, got):
                assert (r.frame, r.filename, r.lineno, r.function) == (g.frame, g.filename, g.lineno, g.function)
                assert (r.code_context, r.index) == (g.code_context, g.index), (r, g)
        saved = inspect.stack
        assert "tvm.s_tir.tensor_intrin" not in sys.modules
        t = time.perf_counter()
        import_tensor_intrinsics()
        took = time.perf_counter() - t
        assert inspect.stack is saved                                  # the patch is undone
        import tvm.s_tir.tensor_intrin as ti
        from tvm.s_tir import TensorIntrin
        names = [v for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith(ti.__name__)
                 for k, v in vars(m).items() if k.endswith("_INTRIN") and isinstance(v, str)]
        assert len(set(names)) > 100, len(set(names))
        missing = [n for n in set(names) if TensorIntrin.get(n, allow_missing=True) is None]
        assert not missing, missing[:5]
        print(f"OK {len(set(names))} intrinsics in {took:.1f} s")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
