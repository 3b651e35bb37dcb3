"""The `flexiq` command: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

from .errors import FlexiQError
from .quant.plan import PlanError

DEMO_MODEL = "fashion_cnn.onnx"
DEMO_CALIB = "fashion_calib.npz"
DEMO_TEST = "fashion_test.npz"


PREPROCESS_HELP = ("for an image folder: a preset (imagenet, fashion, unit) and/or key=value items, e.g. "
                   "'resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW,mode=RGB' "
                   "or a .json file; default: the folder's preprocess.json, else a guess from the model input")


def asset(name: str) -> str:
    return str(resources.files("flexiq_tvm").joinpath("assets", name))


def _ratios(text: str):
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios: expected numbers separated by commas, got {text!r}") from None
    for v in vals:
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"--ratios: {v} is outside [0, 1]")
    return vals


def _shape(text: str):
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape: expected integers separated by commas, e.g. 3,640,640; "
                                         f"got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-shape: expected positive dims, e.g. 3,640,640; got {text!r}")
    return dims


def _load(args, plan=None):
    """The model at --input-shape, else at the shape the plan records (dynamic-shape ONNX files)."""
    from .api import _as_model

    return _as_model(args.model, plan, args.input_shape)


def _write_json(path, obj):
    from .quant.atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _data_source(path, args):
    """An .npz path as is; a folder of images with the --preprocess spec (or its preprocess.json)."""
    spec = getattr(args, "preprocess", None)
    if os.path.isdir(path):
        from .calibrate.images import ImageFolder

        return ImageFolder(path, spec)
    if spec is not None:
        raise FlexiQError(f"--preprocess applies to image folders; {path} is not a folder")
    return path


def _finetune_config(args):
    """quantize's finetune argument from --finetune [--finetune-method --finetune-rounding --steps
    --epochs --lr]."""
    if not getattr(args, "finetune", False):
        if any(v is not None for v in (args.epochs, args.lr, args.finetune_method, args.finetune_rounding,
                                       args.steps)):
            raise SystemExit("flexiq quantize: --epochs / --lr / --steps / --finetune-method / --finetune-rounding "
                             "need --finetune")
        return False
    from dataclasses import replace

    from .search.finetune.config import FinetuneConfig

    kw = {k: v for k, v in (("epochs", args.epochs), ("method", args.finetune_method),
                            ("rounding", args.finetune_rounding), ("round_steps", args.steps)) if v is not None}
    try:
        cfg = FinetuneConfig(seed=args.seed, **kw)
        if args.lr is not None:
            # --lr is the step size of whatever the rounding trains: the rounding variables or the INT8 codes
            cfg = replace(cfg, **{"round_lr" if cfg.rounding == "learned" else "lr": args.lr})
        return cfg
    except ValueError as e:
        raise SystemExit(f"flexiq quantize: {e}") from None


def cmd_quantize(args):
    import flexiq_tvm as fq

    model = _load(args)
    plan = fq.quantize(model, _data_source(args.calib, args), ratios=args.ratios, group_size=args.group_size,
                       calibrator=args.calibrator, search=args.search, seed=args.seed, metric=args.metric,
                       population=args.population, generations=args.generations, recover=args.recover,
                       percentile=args.percentile, search_samples=args.search_samples, rounding=args.rounding,
                       progress=not args.quiet, finetune=_finetune_config(args))
    plan.save(args.output)
    share = {r: round(float(plan.mac_share[p]), 3) for r, p in plan.levels.items()}
    print(f"wrote {args.output}: {plan.num_layers} FlexiQ layers, group size {plan.group_size}, "
          f"levels (4-bit MAC share) {share}")


def cmd_compile(args):
    import flexiq_tvm as fq

    opts = {}
    if getattr(args, "npu_config", None) is not None:
        if args.target != "npu":
            raise SystemExit("flexiq compile: --npu-config needs --target npu")
        opts["npu_config"] = args.npu_config
    if getattr(args, "arch", None) is not None:
        if args.target != "cuda":
            raise SystemExit("flexiq compile: --arch needs --target cuda")
        opts["arch"] = args.arch
    plan = fq.Plan.load(args.plan)
    if getattr(args, "db", None) is not None:
        opts["tuning_db"] = args.db
    cm = fq.compile(_load(args, plan), plan, target=args.target, batch_size=args.batch_size, **opts)
    cm.export(args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB): target {cm.target}, "
          f"batch {cm.batch_size}, {cm.plan.num_layers} layers, ratio set at run time with set_ratio(r)")


def cmd_tune(args):
    import flexiq_tvm as fq

    opts = {}
    if args.arch is not None:
        if args.target != "cuda":
            raise SystemExit("flexiq tune: --arch needs --target cuda")
        opts["arch"] = args.arch
    if getattr(args, "npu_config", None) is not None:
        if args.target != "npu":
            raise SystemExit("flexiq tune: --npu-config needs --target npu")
        opts["npu_config"] = args.npu_config
    if args.trials_per_iter is not None:
        opts["trials_per_iter"] = args.trials_per_iter
    plan = fq.Plan.load(args.plan)
    rep = fq.tune(_load(args, plan), plan, target=args.target, trials=args.trials, db=args.db, ratios=args.ratios,
                  batch_size=args.batch_size, seed=args.seed, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                  progress=not args.quiet, **opts)
    if hasattr(rep, "format"):
        print(rep.format())
    else:   # the NPU tuner's summary dict
        print(json.dumps({k: v for k, v in rep.items() if k != "layers"}, indent=1, default=str))
    if args.json:
        _write_json(args.json, rep.to_dict() if hasattr(rep, "to_dict") else rep)
        print(f"wrote {args.json}")


def _eval_and_print(model, plan, data, args):
    from .report.evaluate import evaluate, format_report

    report = evaluate(model, plan, data, ratios=args.ratios, batch_size=args.batch_size,
                      progress=not args.quiet)
    print(format_report(report))
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    if getattr(args, "plot", None):
        from .report.plot import plot_report

        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return report


def cmd_eval(args):
    import flexiq_tvm as fq

    plan = fq.Plan.load(args.plan)
    _eval_and_print(_load(args, plan), plan, _data_source(args.data, args), args)


def cmd_demo(args):
    import flexiq_tvm as fq

    print(f"demo: {DEMO_MODEL} (residual CNN, Fashion-MNIST) shipped with flexiq-tvm")
    model = fq.load_model(asset(DEMO_MODEL))
    plan = fq.quantize(model, asset(DEMO_CALIB), ratios=args.ratios, group_size=args.group_size,
                       seed=args.seed, progress=not args.quiet)
    print(f"quantized {plan.num_layers} layers in {plan.timings['quantize']:.1f} s")
    _eval_and_print(model, plan, asset(DEMO_TEST), args)


def cmd_report(args):
    from .quant.plan import Plan
    from .report.sensitivity import format_sensitivity, sensitivity_report

    rep = sensitivity_report(Plan.load(args.plan))
    print(format_sensitivity(rep))
    if args.json:
        _write_json(args.json, rep)
        print(f"wrote {args.json}")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="flexiq", description="FlexiQ adaptive mixed-precision quantization for TVM")
    p.add_argument("--version", action="version", version=f"flexiq-tvm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def input_shape(sp):
        sp.add_argument("--input-shape", type=_shape, default=None, metavar="DIMS",
                        help="per-sample input shape without the batch axis, e.g. 3,640,640: required for ONNX "
                        "files with dynamic spatial/sequence dims (default: the file's, or the plan's)")

    def quant_opts(sp):
        sp.add_argument("--ratios", type=_ratios, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="comma-separated 4-bit MAC shares in [0, 1] (default 0,0.25,0.5,0.75,1)")
        sp.add_argument("--group-size", type=int, default=16, help="input channels per 4-bit group (default 16)")
        sp.add_argument("--seed", type=int, default=0)

    q = sub.add_parser("quantize", help="calibrate a model and write its FlexiQ plan")
    q.add_argument("model", help="ONNX file")
    q.add_argument("--calib", required=True, help=".npz with 'inputs' (N, ...) already preprocessed, or a folder "
                   "of images (see --preprocess)")
    q.add_argument("--preprocess", metavar="SPEC", help=PREPROCESS_HELP)
    q.add_argument("-o", "--output", required=True, help="plan file to write")
    q.add_argument("--calibrator", choices=["max", "percentile", "mse"], default="percentile")
    q.add_argument("--percentile", type=float, default=99.99)
    q.add_argument("--search", choices=["range", "sensitivity", "greedy", "evolutionary"], default="evolutionary",
                   help="channel selection across layers (default evolutionary)")
    q.add_argument("--metric", choices=["mse", "kl"], default="kl", help="search fitness vs the INT8 output")
    q.add_argument("--population", type=int, default=16)
    q.add_argument("--generations", type=int, default=20)
    q.add_argument("--search-samples", type=int, help="calibration inputs each search candidate is scored on "
                   "(default: 512, fewer for large models: 16 for MobileNetV2)")
    q.add_argument("--no-recover", dest="recover", action="store_false",
                   help="skip the per-ratio bias correction after the search")
    q.add_argument("--rounding", choices=["compensated", "nearest"], default="compensated",
                   help="INT8 weight codes: chosen to keep each layer's output on the calibration data "
                   "(default), or each weight rounded to nearest")
    q.add_argument("--finetune", action="store_true",
                   help="after the search, train one set of INT8 codes for all ratio levels against the FP32 "
                   "model on the calibration inputs (needs torch: pip install 'flexiq-tvm[torch]')")
    q.add_argument("--finetune-method", choices=["block", "model"], default=None,
                   help="block-wise reconstruction (default) or end-to-end distillation")
    q.add_argument("--finetune-rounding", choices=["learned", "ste"], default=None,
                   help="block method: learn each weight's 4-bit rounding (AdaRound; default) or move the INT8 "
                   "codes by straight-through steps")
    q.add_argument("--steps", type=int, default=None, help="learned rounding: optimiser steps per block (default 100)")
    q.add_argument("--epochs", type=int, default=None, help="finetuning epochs (with --finetune; ste and model)")
    q.add_argument("--lr", type=float, default=None,
                   help="finetuning step size (with --finetune): of the rounding variables, or of the INT8 codes for ste")
    quant_opts(q)
    input_shape(q)
    common(q)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("compile", help="compile a model and plan into one artifact for all ratios")
    c.add_argument("model")
    c.add_argument("--plan", required=True)
    c.add_argument("--target", default="llvm", choices=["llvm", "npu", "cuda"])
    c.add_argument("--arch", default=None, choices=["sm_80", "sm_86", "sm_89", "sm_90"],
                   help="GPU architecture for --target cuda (default sm_80; sm_90 gains no speed from the ratio)")
    c.add_argument("--npu-config", default=None, metavar="JSON",
                   help='NPU configuration for --target npu, e.g. \'{"rows": 16, "cols": 16}\' (docs/npu.md)')
    c.add_argument("--batch-size", type=int, default=None,
                   help="samples per call (default 1, or the batch a fixed-batch graph pins)")
    c.add_argument("--db", default=None, metavar="DIR",
                   help="tuning database written by `flexiq tune`: apply its schedules (untuned tasks keep the "
                   "default ones, listed in one warning)")
    c.add_argument("-o", "--output", required=True, help="artifact (.so) to write")
    input_shape(c)
    common(c)
    c.set_defaults(func=cmd_compile)

    t = sub.add_parser("tune", help="tune the model's kernels with MetaSchedule into a database (docs/tuning.md)")
    t.add_argument("model")
    t.add_argument("--plan", required=True)
    t.add_argument("--target", default="llvm", help="llvm, cuda (measured through --rpc-tracker) or npu")
    t.add_argument("--arch", default=None, choices=["sm_80", "sm_86", "sm_89", "sm_90"],
                   help="GPU architecture for --target cuda (default sm_80)")
    t.add_argument("--npu-config", default=None, metavar="JSON", help="NPU configuration for --target npu")
    t.add_argument("--trials", type=int, default=64, help="measured candidates per task (default 64)")
    t.add_argument("--trials-per-iter", type=int, default=None, help="candidates per search round (default "
                   "min(trials, 64))")
    t.add_argument("--db", default="flexiq_tuning_db", metavar="DIR",
                   help="tuning database directory (created; resumed when it exists; default ./flexiq_tuning_db)")
    t.add_argument("--ratios", type=_ratios, default=None, help="ratios to tune for (default: the plan's levels)")
    t.add_argument("--batch-size", type=int, default=None, help="samples per call of the compiled model (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                   help="measure on the devices of a TVM RPC tracker (device farms; needed for --target cuda here)")
    t.add_argument("--rpc-key", default=None, metavar="KEY", help="device key registered with the tracker")
    t.add_argument("--json", help="write the tune report as JSON")
    input_shape(t)
    common(t)
    t.set_defaults(func=cmd_tune)

    e = sub.add_parser("eval", help="accuracy and latency per ratio vs FP32")
    e.add_argument("model")
    e.add_argument("--plan", required=True)
    e.add_argument("--data", required=True, help=".npz with 'inputs' and optional 'labels', or a folder of images "
                   "(class sub-folders give labels; see --preprocess)")
    e.add_argument("--preprocess", metavar="SPEC", help=PREPROCESS_HELP)
    e.add_argument("--plot", metavar="PNG", help="write accuracy (or agreement) vs latency per ratio (needs matplotlib)")
    e.add_argument("--ratios", type=_ratios, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", help="write the report as JSON")
    input_shape(e)
    common(e)
    e.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="per-layer sensitivity of a plan: which layers should stay 8-bit")
    rp.add_argument("plan")
    rp.add_argument("--json", help="write the report as JSON")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="quantize, compile and evaluate the model shipped with flexiq-tvm")
    quant_opts(d)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--json", help="write the report as JSON")
    d.add_argument("--plot", metavar="PNG", help="write accuracy vs latency per ratio (needs matplotlib)")
    common(d)
    d.set_defaults(func=cmd_demo)

    from .serving.cli import add_parser as add_serve_parser   # `flexiq serve` (flexiq_tvm/serving/cli.py)

    add_serve_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FlexiQError, PlanError, ValueError, OSError) as e:
        print(f"flexiq {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
