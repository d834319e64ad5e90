"""The `twobp` command: run, train, compare, simulate and bench.

    twobp run                  the embedded default: 1F1B vs 1F1B+2BP vs auto on a small LLaMa
    twobp train ...            one pipelined training job (runs under torchrun too)
    twobp compare ...          several schedules, one table, one picture
    twobp simulate ...         schedules on a cost model, no processes
    twobp bench kernels        dX vs dW kernel microbenchmarks against torch
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="twobp",
        description="2-stage backpropagation: split dX/dW kernels and a pipeline runtime that runs the "
                    "deferred weight gradients (p2) in the pipeline's idle time.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for name, helptext in (("run", "the embedded default job: small LLaMa, 2 stages, 1F1B vs 1F1B+2BP vs auto"),
                           ("train", "one pipelined training job (also under torchrun)"),
                           ("compare", "several schedules on the same model and data: one table, one picture")):
        sp = sub.add_parser(name, help=helptext, description=_JOB_DESCRIPTIONS[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_job_arguments(sp, name)
        sp.set_defaults(func=_job_main, job=name)

    sim = sub.add_parser("simulate", help="compare schedules on a cost model (no processes)", add_help=False)
    sim.set_defaults(func=None, simulate=True)

    bench = sub.add_parser("bench", help="microbenchmarks", description="Microbenchmarks.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    from .benchmarks import kernels

    k = bench_sub.add_parser("kernels", help="fwd / dX (p1) / dW (p2) / batched dW of every op vs torch",
                             description=kernels.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels.add_arguments(k)
    k.set_defaults(func=kernels.main)
    return p


_JOB_DESCRIPTIONS = {
    "run": "The embedded default job. On a CPU-only machine: 2 pipeline ranks on gloo (one thread each, "
           "so a bubble is real idle time), the small LLaMa-like model (23 M parameters: compute, not "
           "overhead, fills a step), trained on the bytes of Python's standard library; 1F1B, 1F1B with 2BP "
           "and the cost-placed auto schedule (with carried P2) side by side from the same weights, "
           "alternating step by step, the speedup over 1F1B a median over those paired steps with its spread, "
           "and the table says when a difference is within noise. About two minutes on 2 CPU cores. With 2+ "
           "GPUs: NCCL and the Triton kernels. Writes timelines (trace JSON and PNG) and results.json under --out.",
    "train": "Train one model with one schedule. Under torchrun (RANK/WORLD_SIZE set) each process is one "
             "rank: torchrun --nproc_per_node 4 -m twobp.cli train --stages 4 ...; otherwise the ranks are "
             "spawned on this machine.",
    "compare": "Run several schedules on the same model, data and initial weights, one after another, "
               "and print one table and one stacked timeline picture. The first schedule is the baseline "
               "of the ratios.",
}

_SCHEDULE_HELP = ("comma-separated schedules; each is a name (gpipe, 1f1b, interleaved-1f1b, zb-h1, auto) "
                  "with '-2bp' appended for the split backward, e.g. 1f1b,1f1b-2bp,auto-2bp; auto@N holds "
                  "auto to N micro-batch chunks per rank from F to P2 (a memory cap), e.g. auto@4-2bp")


def _parse_variants(text: str):
    from .pipeline import SCHEDULE_NAMES
    from .train import Variant

    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        twobp = item.endswith("-2bp")
        try:
            variant = Variant.parse(item[:-4] if twobp else item, twobp)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        name = variant.schedule
        if name not in SCHEDULE_NAMES:
            raise argparse.ArgumentTypeError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULE_NAMES)}")
        if name in ("zb-h1", "auto") and not twobp:
            raise argparse.ArgumentTypeError(f"{name} places the P2 (weight-gradient) actions, so it needs 2BP: "
                                             f"write {item}-2bp")
        out.append(variant)
    if not out:
        raise argparse.ArgumentTypeError("no schedule given")
    return tuple(out)


def _add_job_arguments(p: argparse.ArgumentParser, job: str) -> None:
    from .pipeline.actions import LAYOUTS
    from .train import JobConfig

    d = JobConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, choices=["llama", "bert", "resnet", "mamba"],
                   help="llama and mamba train on the stdlib byte corpus; bert/resnet use labelled synthetic inputs")
    g.add_argument("--preset", default="small" if job == "run" else d.preset,
                   help="size preset, e.g. tiny, small, 7b (llama), large (bert), 152 (resnet); run's default, "
                        "llama small (23 M parameters), is where compute, not overhead, fills a CPU step")
    g.add_argument("--tie-embeddings", action="store_true", help="tie the LM head to the embedding")
    g.add_argument("--hf-config", default=None, metavar="PATH_OR_NAME",
                   help="train a Hugging Face model from a config instead of --model/--preset: a config.json (or "
                        "its folder), or a transformers model type with overrides, e.g. "
                        "llama:hidden_size=64,intermediate_size=128,num_hidden_layers=4,num_attention_heads=4; "
                        "random weights, nothing downloaded (needs transformers)")
    g.add_argument("--batch-size", type=int, default=4 if job == "run" else d.batch_size,
                   help="sequences/images per step")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights and data order")
    g = p.add_argument_group("pipeline")
    g.add_argument("--stages", type=int, default=d.stages, help="pipeline ranks (processes)")
    g.add_argument("--chunks", type=int, default=d.chunks, help="model chunks per rank (interleaved, auto, gpipe)")
    g.add_argument("--layout", choices=LAYOUTS, default=d.layout,
                   help="chunk placement with --chunks > 1: loop (stage c*p + r, Megatron's) or v (ZB-V's: rank r "
                        "runs stages r and 2p-1-r, so rank 0 holds the first and the last; auto and gpipe only)")
    g.add_argument("--microbatches", type=int, default=d.microbatches, help="micro-batches per step")
    g.add_argument("--dp", type=int, default=d.dp,
                   help="data-parallel replicas of the pipeline: --stages x --dp processes, gradients averaged "
                        "over replicas, overlapped with the schedule (default 1)")
    g.add_argument("--bucket-mb", type=float, default=d.bucket_mb, help="size of the replica all-reduce buckets")
    g.add_argument("--overlap-steps", dest="overlap_steps", action=argparse.BooleanOptionalAction,
                   default=d.overlap_steps,
                   help="2BP schedules carry trailing P2 and the rank's optimizer step into the next step's "
                        "fill where the measured costs say it helps (default: on)")
    if job == "train":
        g.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved-1f1b, zb-h1 or auto; auto@N "
                                                          "holds at most N micro-batch chunks per rank (memory cap)")
        g.add_argument("--2bp", dest="twobp", action=argparse.BooleanOptionalAction, default=True,
                       help="split the backward into p1 and deferred p2 (default: on)")
    else:
        g.add_argument("--schedules", type=_parse_variants,
                       default="1f1b,1f1b-2bp,auto-2bp" if job == "run" else "1f1b,1f1b-2bp,zb-h1-2bp,auto-2bp",
                       help=_SCHEDULE_HELP)
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=12 if job == "run" else d.steps,
                   help="optimizer steps per schedule (they alternate step by step)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="steps left out of the throughput")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"],
                   help="parameter dtype; bf16/fp16 keep fp32 gradients, master weights and AdamW state "
                        "(twobp.MasterWeights), fp16 adds a loss scaler")
    g.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                   help="clip the whole model's gradient norm (over every rank) to MAX before each step")
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"],
                   help="auto: cuda (NCCL, Triton) when there are enough GPUs, else cpu (gloo, torch reference)")
    g.add_argument("--threads", type=int, default=d.threads, help="torch threads per rank on CPU")
    g.add_argument("--timeout", type=float, default=d.timeout, help="seconds to wait for a silent peer")
    g.add_argument("--out", default=d.out, help="folder for timelines and results.json")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the results table as JSON here")
    g.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="save per-stage state dicts, the optimizer state and the data position here at the end "
                        "(with several schedules: the last one's; each trained the same model on the same data, "
                        "and their losses are checked to agree)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a --checkpoint folder (any stage count): weights, optimizer state, loss "
                        "scale and the data position")
    g.add_argument("--quiet", action="store_true", help="no per-step progress")


def _job_main(args: argparse.Namespace) -> int:
    from .benchmarks.timing import machine_name
    from .train import JobConfig, Variant, format_results, losses_agree, results_to_json, run_job, save_json, \
        write_timelines

    try:
        variants = (Variant.parse(args.schedule, args.twobp),) if args.job == "train" else args.schedules
    except ValueError as e:
        print(f"twobp train: --schedule {e}", file=sys.stderr)
        return 2
    if isinstance(variants, str):
        variants = _parse_variants(variants)
    try:
        cfg = JobConfig(model=args.model, preset=args.preset, stages=args.stages, chunks=args.chunks, layout=args.layout,
                        microbatches=args.microbatches, batch_size=args.batch_size, variants=variants,
                        steps=args.steps, warmup=args.warmup, lr=args.lr, seed=args.seed, device=args.device,
                        threads=args.threads, timeout=args.timeout, tie_embeddings=args.tie_embeddings,
                        overlap_steps=args.overlap_steps, dp=args.dp, dtype=args.dtype,
                        clip_grad_norm=args.clip_grad_norm, bucket_mb=args.bucket_mb,
                        out=args.out, checkpoint=args.checkpoint, resume=args.resume, quiet=args.quiet,
                        hf_config=args.hf_config)
        cfg.preflight()
        if args.json:
            from .train import _check_writable
            json_path = __import__("pathlib").Path(args.json)
            if json_path.is_dir():
                raise ValueError(f"--json {args.json} is a folder; give a file name (e.g. {json_path / 'results.json'})")
            _check_writable("--json", json_path.resolve().parent)
    except ValueError as e:
        raise SystemExit(f"twobp {args.job}: {e}")
    import torch

    device = torch.device("cuda" if cfg.resolved_device() == "cuda" else "cpu")
    machine = machine_name(device) if device.type == "cuda" else f"{machine_name(device).split(' (')[0]}"
    is_rank0 = int(__import__("os").environ.get("RANK", "0")) == 0
    if is_rank0:
        what = f"hf:{cfg.hf_config}" if cfg.hf_config else f"{cfg.model}/{cfg.preset}"
        print(f"twobp {args.job}: {what}, {cfg.stages} stages x {cfg.chunks} chunks"
              f"{f' x {cfg.dp} replicas' if cfg.dp > 1 else ''}, {cfg.dtype}, "
              f"{cfg.microbatches} micro-batches of {cfg.batch_size // cfg.dp // cfg.microbatches}+ rows"
              f"{' per replica' if cfg.dp > 1 else ''}, {cfg.steps} steps, "
              f"{'NCCL + Triton' if device.type == 'cuda' else f'gloo, {cfg.threads} thread(s)/rank'} on "
              f"{machine}; schedules: {', '.join(v.label for v in cfg.variants)}", flush=True)
    results = run_job(cfg)
    if not results:
        return 0
    print()
    print(format_results(results))
    from .train import realised_gain

    gain = realised_gain(results, cfg)
    if gain:
        print("\n" + gain)
    from .train import _meta_model, dropout_in

    agreement = losses_agree(results, cfg.dtype, dropout_in(_meta_model(cfg)))
    agree = agreement.ok
    if len(results) > 1:
        print(f"\nlosses agree across schedules: {agreement.text}")
    elif not agree:
        print(f"\nlosses: {agreement.text}")  # one schedule: only a diverged run fails
    print(f"activation store empty after every step: {'yes' if all(r.store_empty for r in results) else 'NO'}")
    payload = results_to_json(results, cfg, machine)
    if cfg.out:
        out = __import__("pathlib").Path(cfg.out)
        written = write_timelines(results, out)
        save_json(payload, out / "results.json")
        (out / "results.md").write_text(format_results(results) + "\n")
        print(f"wrote {out}/results.json, results.md and {len(written)} timeline files "
              f"(open the .json traces in ui.perfetto.dev or chrome://tracing)")
    if args.json:
        save_json(payload, args.json)
    return 0 if agree else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        from .pipeline.cli_simulate import simulate_main

        return int(simulate_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
