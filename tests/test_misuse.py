"""What a new user gets wrong, case by case: each misuse of the public API or the CLI must
give a clear error that names the fix (checked by a pattern on the message), never a hang,
a traceback from deep inside, or a silent wrong answer; a handful of legal-but-unusual
uses must give exactly what plain torch gives."""

import math
import re
import warnings

from pathlib import Path

import pytest
import torch
from torch import nn

import twobp
from twobp import models
from twobp.cli import main as cli
from twobp.nn.attention import TwoBPAttention
from twobp.ops.attention import AttentionCoreOp
from twobp.ops.conv import Conv2dOp
from twobp.ops.norm import LayerNormOp
from twobp.pipeline import Costs, Schedule, ScheduleError, make_schedule, simulate, validate
from twobp.pipeline.actions import F, P1, P2
from twobp.pipeline.cli_simulate import simulate_main


def _lin():
    return twobp.TwoBPLinear(4, 3)


def _split_y(m=None, x=None, mb=0):
    m = m or _lin()
    x = x if x is not None else torch.randn(2, 4, requires_grad=True)
    with twobp.split_backward(microbatch=mb):
        y = m(x)
    return m, x, y


def _attn(**kw):
    return TwoBPAttention(8, 2, **kw)


def _x8():
    return torch.randn(2, 5, 8)


def _backward_twice():
    m, x, y = _split_y()
    y.sum().backward(retain_graph=True)
    y.sum().backward()


def _p2_after_step():
    m, x, y = _split_y()
    y.sum().backward()
    with torch.no_grad():
        m.weight.add_(1.0)
    twobp.backward_p2(m)


def _edit_before_p1():
    m, x, y = _split_y()
    with torch.no_grad():
        m.weight.mul_(2)
    y.sum().backward()


def _edit_saved_input():
    m = _lin()
    x = torch.randn(2, 4)
    with twobp.split_backward(microbatch=0):
        y = m(x)
    y.sum().backward()
    x.add_(1)
    twobp.backward_p2(m)


def _leak():
    m, _, y = _split_y()
    y.sum().backward()
    twobp.default_store().begin_step()


def _double_backward_split():
    _, x, y = _split_y()
    torch.autograd.grad(y.sum(), x, create_graph=True)


def _p2_named_nothing():
    twobp.backward_p2(_lin(), microbatches=[3])


def _p2_before_p1():
    m, _, _y = _split_y()
    twobp.backward_p2(m, microbatches=0)


def _sched(ranks, carry=()):
    return Schedule(ranks=ranks, stages=len(ranks), microbatches=1, carry=carry)


def _on_triton(fn):
    with twobp.use_backend("triton"):
        return fn()


def _cli(*argv):
    return cli(list(argv))


def _foreign_checkpoint() -> str:
    """A checkpoint folder whose one tensor belongs to no twobp model."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="twobp-foreign-ck-"))
    torch.save({"0.other.weight": torch.zeros(2)}, folder / "stage-0.pt")
    return str(folder)


def _untied_checkpoint() -> str:
    """llama/tiny's blocks saved with the embedding and the head apart (as an untied run saves them)."""
    import tempfile

    from torch import nn

    folder = Path(tempfile.mkdtemp(prefix="twobp-untied-ck-"))
    blocks = nn.Sequential(*models.build("llama", "tiny", tie_embeddings=False).blocks())
    torch.save({k: v.detach().clone() for k, v in blocks.state_dict().items()}, folder / "stage-0.pt")
    return str(folder)


def _sim(*argv):
    rc = simulate_main(list(argv))
    if rc:
        raise SystemExit(rc)


# (id, call, exception type, pattern that names the fix or the offending value)
CASES = [
    # ---- modules -----------------------------------------------------------------------------------
    ("linear-in-features", lambda: _lin()(torch.randn(2, 5)), ValueError, r"last dim must be in_features=4"),
    ("linear-dtype", lambda: _lin()(torch.randn(2, 4, dtype=torch.float64)), TypeError, r"cast the input"),
    ("linear-device", lambda: _lin()(torch.randn(2, 4, device="meta")), ValueError, r"move the module"),
    ("linear-scalar", lambda: _lin()(torch.tensor(1.0)), ValueError, r"in_features=4"),
    ("layernorm-2d-shape", lambda: twobp.TwoBPLayerNorm((3, 4)), NotImplementedError, r"flatten those dims"),
    ("layernorm-wrong-dim", lambda: twobp.TwoBPLayerNorm(4)(torch.randn(2, 5)), ValueError,
     r"normalized size 4"),
    ("layernorm-dtype", lambda: twobp.TwoBPLayerNorm(4)(torch.randn(2, 4).double()), TypeError, r"cast"),
    ("rmsnorm-2d-shape", lambda: twobp.TwoBPRMSNorm((3, 4)), NotImplementedError, r"normalizes over the last dim"),
    ("rmsnorm-wrong-dim", lambda: twobp.TwoBPRMSNorm(4)(torch.randn(2, 6)), ValueError, r"normalized size 4"),
    ("conv-groups", lambda: twobp.TwoBPConv2d(4, 4, 3, groups=2), NotImplementedError, r"plain nn.Conv2d"),
    ("conv-padding-mode", lambda: twobp.TwoBPConv2d(2, 2, 3, padding_mode="reflect"), NotImplementedError,
     r"pad the input yourself"),
    ("conv-5d-input", lambda: twobp.TwoBPConv2d(2, 2, 3)(torch.randn(1, 2, 3, 4, 4)), ValueError,
     r"3-D \(unbatched\) or 4-D"),
    ("conv-channels", lambda: twobp.TwoBPConv2d(3, 2, 3)(torch.randn(1, 2, 5, 5)), ValueError,
     r"expected weight \[O, 2, KH, KW\]"),
    ("conv-too-small", lambda: twobp.TwoBPConv2d(2, 2, 5)(torch.randn(1, 2, 3, 3)), ValueError,
     r"pad more or use a smaller kernel"),
    ("conv-same-strided", lambda: Conv2dOp(stride=2, padding="same"), ValueError, r"give explicit padding"),
    ("attn-divisible", lambda: TwoBPAttention(10, 3), ValueError, r"divisible by num_heads=3"),
    ("attn-kv-heads", lambda: TwoBPAttention(8, 4, num_kv_heads=3), ValueError, r"num_kv_heads must be"),
    ("attn-bias-kv", lambda: TwoBPAttention(8, 2, add_bias_kv=True), NotImplementedError, r"use add_bias_kv=False"),
    ("attn-zero-attn", lambda: TwoBPAttention(8, 2, add_zero_attn=True), NotImplementedError,
     r"use add_zero_attn=False"),
    ("attn-kdim-extension", lambda: TwoBPAttention(8, 2, kdim=4, causal=True), NotImplementedError,
     r"use kdim = vdim = embed_dim"),
    ("attn-dropout-range", lambda: TwoBPAttention(8, 2, dropout=1.5), ValueError, r"dropout must be in \[0, 1\]"),
    ("attn-rotary-odd", lambda: TwoBPAttention(6, 2, rotary=True), ValueError, r"even head dim"),
    ("attn-rope-theta", lambda: TwoBPAttention(8, 2, rope_theta=-1.0), ValueError, r"positive number"),
    ("attn-causal-type", lambda: TwoBPAttention(8, 2, causal="yes"), TypeError, r"must be bools"),
    ("attn-need-weights", lambda: (lambda m, x: m(x, x, x, need_weights=True))(_attn(), _x8()), NotImplementedError,
     r"pass need_weights=False"),
    ("attn-cross-width", lambda: (lambda m, x: m(x, torch.randn(2, 5, 4), torch.randn(2, 5, 4)))(_attn(), _x8()),
     ValueError, r"key must have last dim 8"),
    ("attn-padding-mask-shape", lambda: (lambda m, x: m(x, x, x, key_padding_mask=torch.ones(3, 5, dtype=torch.bool)))(
        _attn(), _x8()), ValueError, r"key_padding_mask must be \(B, S\)"),
    ("attn-mask-shape", lambda: (lambda m, x: m(x, x, x, attn_mask=torch.randn(4, 5)))(_attn(), _x8()),
     ValueError, r"attn_mask must be \(L, S\)"),
    ("attn-causal-vs-mask", lambda: (lambda m, x: m(x, x, x, is_causal=True, attn_mask=torch.zeros(5, 5)))(
        _attn(), _x8()), ValueError, r"is_causal=True but attn_mask is not the causal mask"),
    ("attn-kdim-type", lambda: TwoBPAttention(8, 2, kdim=0), ValueError, r"kdim must be a positive int"),
    ("attn-input-dims", lambda: _attn().self_attention(torch.randn(2, 3, 4, 8)), ValueError, r"\[B, S, E=8\]"),
    # ---- ops ------------------------------------------------------------------------------------------
    ("core-causal-type", lambda: AttentionCoreOp(causal=1), TypeError, r"causal must be a bool"),
    ("core-scale", lambda: AttentionCoreOp(sm_scale=-1.0), ValueError, r"positive finite float"),
    ("core-3d", lambda: AttentionCoreOp().forward((torch.randn(2, 3, 4),) * 3, (), save_p1=False, save_p2=False),
     ValueError, r"4-D \[batch, seq, heads, head_dim\]"),
    ("core-dtype", lambda: AttentionCoreOp().forward(
        (torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4).double(), torch.randn(1, 3, 2, 4)), (),
        save_p1=False, save_p2=False), TypeError, r"cast it with"),
    ("core-gqa", lambda: AttentionCoreOp().forward(
        (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4)), (),
        save_p1=False, save_p2=False), ValueError, r"choose num_kv_heads dividing num_heads"),
    ("core-params", lambda: AttentionCoreOp().forward((torch.randn(1, 3, 2, 4),) * 3, (torch.ones(1),),
                                                      save_p1=False, save_p2=False), ValueError, r"no params"),
    ("convop-groups", lambda: Conv2dOp(groups=2), NotImplementedError, r"twobp.convert leaves them"),
    ("convop-padding-string", lambda: Conv2dOp(padding="full"), ValueError, r"'same' or 'valid'"),
    ("convop-stride-zero", lambda: Conv2dOp(stride=0), ValueError, r"stride must be >= 1"),
    ("convop-stride-type", lambda: Conv2dOp(stride="2"), TypeError, r"int or a pair of ints"),
    ("layernormop-scalar", lambda: LayerNormOp(eps=1e-5).forward((torch.tensor(1.0),), (None, None),
                                                                 save_p1=False, save_p2=False),
     ValueError, r"at least 1 dim"),
    # ---- split, p2, store ------------------------------------------------------------------------
    ("split-mb-str", lambda: twobp.split_backward(microbatch="0").__enter__(), TypeError, r"microbatch must be an int"),
    ("split-mb-bool", lambda: twobp.split_backward(microbatch=True).__enter__(), TypeError, r"must be an int"),
    ("split-store", lambda: twobp.split_backward(microbatch=0, store={}).__enter__(), TypeError,
     r"twobp.ActivationStore"),
    ("p2-not-module", lambda: twobp.backward_p2("model"), TypeError, r"takes an nn.Module"),
    ("p2-float-mb", lambda: twobp.backward_p2(_lin(), microbatches=1.5), TypeError, r"int, an iterable of ints"),
    ("p2-str-mbs", lambda: twobp.backward_p2(_lin(), microbatches=["0"]), TypeError, r"ids must be ints"),
    ("p2-named-nothing", _p2_named_nothing, RuntimeError, r"inside twobp.split_backward\(microbatch=...\)"),
    ("p2-before-p1", _p2_before_p1, RuntimeError, r"run the backward of that micro-batch's loss"),
    ("backward-twice", _backward_twice, RuntimeError, r"Run such a forward outside split_backward"),
    ("double-backward-split", _double_backward_split, RuntimeError, r"Run this forward outside split_backward"),
    ("edit-weight-before-p1", _edit_before_p1, RuntimeError, r"modified by an inplace operation"),
    ("edit-weight-before-p2", _p2_after_step, RuntimeError, r"Run backward_p2 before stepping"),
    ("edit-saved-input", _edit_saved_input, RuntimeError, r"clone it before editing it in place"),
    ("leak", _leak, twobp.LeakError, r"clear\(\)"),
    ("convert-not-module", lambda: twobp.convert([nn.Linear(2, 2)]), TypeError, r"convert takes an nn.Module"),
    ("revert-not-module", lambda: twobp.revert(None), TypeError, r"revert takes an nn.Module"),
    ("backend-name", lambda: twobp.use_backend("cuda").__enter__(), ValueError, r"one of \('torch', 'triton'\)"),
    ("interpreter-bf16-linear", lambda: _on_triton(lambda: twobp.TwoBPLinear(4, 3, dtype=torch.bfloat16)(
        torch.randn(2, 4, dtype=torch.bfloat16))), RuntimeError, r"float16 with the interpreter, or the torch backend"),
    ("interpreter-bf16-attention", lambda: _on_triton(lambda: (lambda m, x: m(x, x, x))(
        TwoBPAttention(8, 2, dtype=torch.bfloat16), torch.randn(1, 3, 8, dtype=torch.bfloat16))), RuntimeError,
     r"interpreter's tl.dot computes bf16 wrongly"),
    ("interpreter-bf16-conv", lambda: _on_triton(lambda: twobp.TwoBPConv2d(2, 2, 3, dtype=torch.bfloat16)(
        torch.randn(1, 2, 4, 4, dtype=torch.bfloat16))), RuntimeError, r"bfloat16 on Triton's CPU interpreter"),
    # ---- schedules, costs, simulator --------------------------------------------------------------
    ("sched-name", lambda: make_schedule("fancy", stages=2, microbatches=4, twobp=True), ValueError,
     r"choose one of gpipe"),
    ("sched-stages", lambda: make_schedule("1f1b", stages=0, microbatches=4, twobp=True), ValueError,
     r"stages must be an int >= 1"),
    ("sched-mbs", lambda: make_schedule("1f1b", stages=2, microbatches=0, twobp=True), ValueError,
     r"microbatches must be an int >= 1"),
    ("sched-chunks-type", lambda: make_schedule("gpipe", stages=2, microbatches=4, twobp=True, chunks=1.5),
     ValueError, r"chunks must be an int"),
    ("sched-1f1b-chunks", lambda: make_schedule("1f1b", stages=2, microbatches=4, twobp=True, chunks=2),
     ValueError, r"use 'interleaved-1f1b' or 'auto'"),
    ("sched-interleaved-m", lambda: make_schedule("interleaved-1f1b", stages=2, microbatches=3, twobp=True,
                                                  chunks=2), ValueError, r"use microbatches=4"),
    ("sched-twobp-type", lambda: make_schedule("1f1b", stages=2, microbatches=4, twobp="yes"), ValueError,
     r"twobp must be True or False"),
    ("sched-zbh1-fused", lambda: make_schedule("zb-h1", stages=2, microbatches=4, twobp=False), ValueError,
     r"needs twobp=True"),
    ("sched-auto-fused", lambda: make_schedule("auto", stages=2, microbatches=4, twobp=False), ValueError,
     r"needs twobp=True"),
    ("sched-memory-limit", lambda: make_schedule("auto", stages=2, microbatches=4, twobp=True, memory_limit=0),
     ValueError, r"memory_limit must be an int >= 1"),
    ("sched-costs-len", lambda: make_schedule("auto", stages=2, microbatches=4, twobp=True,
                                              costs={"F": [1, 1, 1], "P1": 1, "P2": 1}), ValueError,
     r"one entry per virtual stage|3 entries for 2 virtual stages"),
    ("costs-negative", lambda: Costs(F=1, P1=-1, P2=1), ValueError, r"finite number >= 0"),
    ("costs-inf", lambda: Costs(F=math.inf, P1=1, P2=1), ValueError, r"finite number >= 0"),
    ("costs-nan", lambda: Costs(F=math.nan, P1=1, P2=1), ValueError, r"finite number >= 0"),
    ("costs-zero", lambda: Costs(F=0, P1=0, P2=0), ValueError, r"give at least one of them a positive time"),
    ("costs-type", lambda: Costs(F="1", P1=1, P2=1), ValueError, r"must be a number"),
    ("costs-empty", lambda: Costs(F=[], P1=1, P2=1), ValueError, r"give a number or one per stage"),
    ("costs-key", lambda: Costs.from_mapping({"F": 1, "P1": 1, "P2": 1, "W": 1}), ValueError,
     r"expected F, P1, P2, B, comm"),
    ("costs-missing", lambda: Costs.from_mapping({"F": 1, "P1": 1}), ValueError, r"measure them with a 2BP"),
    ("simulate-costs-type", lambda: simulate(make_schedule("1f1b", stages=2, microbatches=2, twobp=True), costs=3),
     TypeError, r"a Costs, a mapping or None"),
    ("parse-header", lambda: Schedule.parse("rank 0: F0.0"), ValueError, r"must start with 'schedule name="),
    ("parse-action", lambda: Schedule.parse("schedule name=x stages=1 chunks=1 microbatches=1\nrank 0: X0.0"),
     ValueError, r"expected F<mb>.<chunk>"),
    ("parse-p1-two", lambda: Schedule.parse("schedule name=x stages=1 chunks=1 microbatches=2\nrank 0: P1[0,1].0"),
     ValueError, r"P1 takes exactly one micro-batch"),
    ("parse-range", lambda: Schedule.parse("schedule name=x stages=1 chunks=1 microbatches=4\nrank 0: P2[3-1].0"),
     ValueError, r"bad micro-batch range"),
    ("parse-rank-order", lambda: Schedule.parse("schedule name=x stages=2 chunks=1 microbatches=1\nrank 1: F0.0"),
     ValueError, r"expected 'rank 0: <actions>'"),
    ("schedule-stages", lambda: Schedule(ranks=(), stages=0, microbatches=1), ValueError, r"positive int"),
    ("schedule-ranks", lambda: Schedule(ranks=((F(0),),), stages=2, microbatches=1), ValueError,
     r"give one list per rank"),
    ("schedule-name", lambda: Schedule(ranks=((F(0),),), stages=1, microbatches=1, name="a b"), ValueError,
     r"without spaces"),
    ("schedule-carry", lambda: _sched(((F(0), P1(0), P2(0)),), carry=(1, 1)), ValueError, r"one int >= 0 per rank"),
    ("validate-type", lambda: validate("1f1b"), TypeError, r"validate takes a Schedule"),
    ("validate-order", lambda: validate(_sched(((P1(0), F(0), P2(0)),))), ScheduleError, r"runs before F0\.0"),
    ("validate-missing-p2", lambda: validate(_sched(((F(0), P1(0)),))), ScheduleError, r"P2"),
    ("validate-carry", lambda: validate(_sched(((F(0), P1(0), P2(0)),), carry=(2,))), ScheduleError,
     r"carry=2 on rank 0 but its list ends with only 1 P2"),
    # ---- models and data ----------------------------------------------------------------------------
    ("model-name", lambda: models.build("gpt5"), ValueError, r"known: llama"),
    ("model-preset", lambda: models.build("llama", "13b"), ValueError, r"known: tiny"),
    ("model-field", lambda: models.build("llama", "tiny", depth=3), ValueError, r"has no field\(s\) \['depth'\]"),
    ("llama-heads", lambda: models.build("llama", "tiny", dim=66), ValueError, r"divisible by n_heads"),
    ("llama-kv", lambda: models.build("llama", "tiny", n_kv_heads=3), ValueError, r"divisible by n_kv_heads"),
    ("llama-theta", lambda: models.build("llama", "tiny", rope_theta=0.0), ValueError, r"rope_theta must be > 0"),
    ("bert-mask-id", lambda: models.build("bert", "tiny", mask_token_id=999), ValueError, r"mask_token_id=999"),
    ("resnet-layers", lambda: models.build("resnet", "tiny", layers=()), ValueError, r"non-empty sequence"),
    ("resnet-stem", lambda: models.build("resnet", "tiny", stem="vgg"), ValueError, r"'imagenet' or 'cifar'"),
    ("bert-too-long", lambda: models.build("bert", "tiny")(torch.zeros(1, 100, dtype=torch.long)), ValueError,
     r"exceeds the 64 learned positions"),
    ("corpus-seq", lambda: twobp.data.ByteCorpus(seq_len=0), ValueError, r"seq_len must be a positive int"),
    ("corpus-split", lambda: twobp.data.ByteCorpus(seq_len=8, split="dev"), ValueError, r"split must be one of"),
    # ---- command line: one-line errors before any rank starts ---------------------------------------
    ("cli-stages", lambda: _cli("train", "--stages", "20"), SystemExit, r"use at most 6 stages"),
    ("cli-zbh1-no2bp", lambda: _cli("train", "--schedule", "zb-h1", "--no-2bp"), SystemExit, r"drop --no-2bp"),
    ("cli-preset", lambda: _cli("train", "--preset", "7x"), SystemExit, r"known: tiny"),
    ("cli-family-preset", lambda: _cli("train", "--model", "bert", "--preset", "7b"), SystemExit,
     r"unknown preset '7b' for bert"),
    ("cli-1f1b-chunks", lambda: _cli("train", "--chunks", "2"), SystemExit,
     r"one chunk per rank \(--chunks 2\); use 'interleaved-1f1b'"),
    ("cli-layout-v-1f1b", lambda: _cli("train", "--schedule", "1f1b", "--layout", "v", "--chunks", "2"), SystemExit,
     r"built by 'auto' \(or 'gpipe'\): use auto with --layout v$"),
    ("cli-layout-v-one-chunk", lambda: _cli("train", "--schedule", "gpipe", "--layout", "v"), SystemExit,
     r"--layout v needs --chunks >= 2 .*add --chunks 2$"),
    ("cli-interleaved-m", lambda: _cli("train", "--schedule", "interleaved-1f1b", "--chunks", "2",
                                       "--microbatches", "3", "--batch-size", "6"), SystemExit,
     r"\(--microbatches 3, --stages 2\); use --microbatches 4$"),
    ("cli-resume", lambda: _cli("train", "--resume", "/nonexistent/ck"), SystemExit, r"a previous --checkpoint"),
    ("cli-lr-nan", lambda: _cli("train", "--lr", "nan"), SystemExit, r"--lr must be a finite number"),
    ("cli-lr-negative", lambda: _cli("train", "--lr", "-1"), SystemExit, r"--lr must be a finite number >= 0"),
    ("cli-dp-batch", lambda: _cli("train", "--dp", "3"), SystemExit,
     r"--batch-size 8 must split into --dp 3 equal replica shares .*use --batch-size 12"),
    ("cli-dtype", lambda: _cli("train", "--dtype", "fp8"), SystemExit, r""),
    ("cli-clip", lambda: _cli("train", "--clip-grad-norm", "-1"), SystemExit, r"--clip-grad-norm must be"),
    ("cli-tied-bert", lambda: _cli("train", "--model", "bert", "--tie-embeddings"), SystemExit,
     r"--tie-embeddings is for llama"),
    ("cli-out", lambda: _cli("train", "--out", "/proc/twobp-nope"), SystemExit, r"choose another folder"),
    ("cli-json", lambda: _cli("train", "--json", "/proc/x/r.json"), SystemExit, r"--json .*choose another folder"),
    ("cli-checkpoint", lambda: _cli("train", "--checkpoint", "/proc/ck"), SystemExit, r"--checkpoint"),
    ("cli-timeout", lambda: _cli("train", "--timeout", "0"), SystemExit, r"--timeout must be a finite number > 0"),
    ("cli-schedule", lambda: _cli("train", "--schedule", "fancy"), SystemExit, r"choose one of gpipe"),
    ("cli-2bp-suffix", lambda: _cli("train", "--schedule", "1f1b-2bp"), SystemExit, r"with --2bp .*so write '1f1b'"),
    ("cli-auto-no2bp", lambda: _cli("train", "--schedule", "auto", "--no-2bp"), SystemExit,
     r"auto places each layer's P2.*drop --no-2bp"),
    ("cli-interleaved-1chunk", lambda: _cli("train", "--schedule", "interleaved-1f1b"), SystemExit,
     r"add --chunks 2"),
    ("cli-auto-cap-chunks", lambda: _cli("train", "--schedule", "auto@1", "--chunks", "2"), SystemExit,
     r"cap must be >= 2 \(auto@2\)"),
    ("cli-json-folder", lambda: _cli("train", "--json", _foreign_checkpoint()), SystemExit,
     r"--json .* is a folder; give a file name"),
    ("cli-resume-untied-into-tied", lambda: _cli("train", "--tie-embeddings", "--resume", _untied_checkpoint()),
     SystemExit, r"this model ties 0.weight and \S+, but the checkpoint holds different values.*--tie-embeddings"),
    ("cli-resume-other-model", lambda: _cli("train", "--resume", _foreign_checkpoint()), SystemExit,
     r"does not fit llama --preset tiny: \d+ tensors missing.*Resume with the model and preset that wrote it"),
    ("sim-cap-in-name", lambda: _sim("-p", "2", "-m", "4", "--schedules", "auto@1-2bp"), SystemExit,
     r""),
    ("sched-cap-in-name", lambda: make_schedule("auto@2", stages=2, microbatches=4, twobp=True), ValueError,
     r"takes the cap as memory_limit= \(twobp simulate: --memory-limit 2\)"),
    ("cli-batch", lambda: _cli("run", "--batch-size", "2", "--microbatches", "4"), SystemExit,
     r"use --batch-size >= 4"),
    ("cli-warmup", lambda: _cli("run", "--steps", "2", "--warmup", "5"), SystemExit, r"lower --warmup"),
    ("cli-compare-zbh1", lambda: _cli("compare", "--schedules", "zb-h1"), SystemExit, r""),
    ("cli-compare-unknown", lambda: _cli("compare", "--schedules", "1f1b,fancy"), SystemExit, r""),
    ("cli-threads", lambda: _cli("train", "--threads", "0"), SystemExit, r"threads must be a positive integer"),
    ("cli-steps", lambda: _cli("train", "--steps", "0"), SystemExit, r"steps must be a positive integer"),
    ("sim-zero", lambda: _sim("-p", "2", "-m", "4", "--costs", "F=0,P1=0,P2=0"), SystemExit, r""),
    ("sim-inf", lambda: _sim("-p", "2", "-m", "4", "--costs", "F=inf,P1=1,P2=1"), SystemExit, r""),
    ("sim-word", lambda: _sim("-p", "2", "-m", "4", "--costs", "F=a"), SystemExit, r""),
    ("sim-pair", lambda: _sim("-p", "2", "-m", "4", "--costs", "F1"), SystemExit, r""),
    ("sim-stages", lambda: _sim("-p", "0", "-m", "4"), SystemExit, r""),
    ("sim-schedule", lambda: _sim("-p", "2", "-m", "4", "--schedules", "bogus"), SystemExit, r""),
    ("sim-json", lambda: _sim("-p", "2", "-m", "4", "--costs-json", "/nonexistent.json"), SystemExit, r""),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_gets_an_error_that_names_the_fix(call, exc, pattern, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as info:
            call()
    text = str(info.value)
    if exc is SystemExit and isinstance(info.value.code, int):
        text = capsys.readouterr().err  # argparse and simulate print their message, then exit 2
        assert info.value.code == 2 and text.strip(), "an exit code without a message"
    assert len(text.strip().splitlines()[0]) > 10, f"too terse: {text!r}"
    assert re.search(pattern, text), f"{text!r} does not match {pattern!r}"
    twobp.default_store().clear()


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


# ---- legal but unusual: exactly plain torch's result ----------------------------------------------
def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_twins_under_no_grad_and_eval_are_their_torch_twins():
    torch.manual_seed(0)
    for ref, ours, x in ((nn.Linear(4, 3), twobp.TwoBPLinear(4, 3), torch.randn(2, 4)),
                         (nn.LayerNorm(4), twobp.TwoBPLayerNorm(4), torch.randn(2, 4)),
                         (nn.Conv2d(2, 3, 3), twobp.TwoBPConv2d(2, 3, 3), torch.randn(1, 2, 5, 5))):
        ours.load_state_dict(ref.state_dict())
        with torch.no_grad(), twobp.split_backward(microbatch=0):
            torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
        assert twobp.default_store().is_empty(), "nothing is kept for a forward without gradients"


def test_frozen_weight_trainable_bias_in_split_mode_matches_torch():
    torch.manual_seed(1)
    ref, ours = nn.Linear(4, 3), twobp.TwoBPLinear(4, 3)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        m.weight.requires_grad_(False)
    x = torch.randn(5, 4)
    ref(x).square().sum().backward()
    with twobp.split_backward(microbatch=0):
        y = ours(x)
    y.square().sum().backward()
    twobp.backward_p2(ours)
    assert ours.weight.grad is None
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_convert_leaves_what_it_cannot_split_and_the_model_stays_equal():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.Flatten(), nn.Linear(4 * 9, 2))
    x = torch.randn(2, 4, 3, 3)
    want = model(x)
    model, report = twobp.convert(model, return_report=True)
    assert any("groups=2" in why for _, _, why in report.left)
    _same(model(x), want)


def test_split_backward_nests_and_the_inner_id_wins():
    m = _lin()
    x = torch.randn(2, 4, requires_grad=True)
    with twobp.split_backward(microbatch=0):
        with twobp.split_backward(microbatch=1):
            y = m(x)
    y.sum().backward()
    assert twobp.pending_microbatches(m) == [1]
    twobp.backward_p2(m, microbatches=1)


def test_unbatched_conv_and_attention_inputs_work_as_in_torch():
    torch.manual_seed(3)
    ref, ours = nn.Conv2d(2, 3, 3), twobp.TwoBPConv2d(2, 3, 3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 6)
    torch.testing.assert_close(ours(x), ref(x))
    mha, att = nn.MultiheadAttention(8, 2, batch_first=True), TwoBPAttention(8, 2)
    att.load_state_dict(mha.state_dict())
    s = torch.randn(5, 8)
    torch.testing.assert_close(att(s, s, s)[0], mha(s, s, s, need_weights=False)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, expected", [
    (("--schedules", "1f1b", "--chunks", "2"), r"one chunk per rank \(--chunks 2\)"),
    (("--schedules", "interleaved-1f1b", "--chunks", "2", "--microbatches", "3"),
     r"\(--microbatches 3, --stages 4\); use --microbatches 4"),
    (("--schedules", "auto-2bp", "--chunks", "2", "--memory-limit", "1"),
     r"fits --memory-limit 1 micro-batch chunks per rank; use --memory-limit 2 or more"),
])
def test_simulate_names_the_fix_in_its_own_flags(argv, expected, capsys):
    """make_schedule's keyword spelling (chunks=2, memory_limit=1) comes out as the flags the
    user typed, so the fix can be typed as it stands."""
    assert simulate_main(["--stages", "4", "--microbatches", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert not re.search(r"\b(chunks|microbatches|stages|memory_limit)=", err), err
