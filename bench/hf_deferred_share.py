"""Share of parameter elements whose gradient twobp.convert defers to p2, for Hugging Face models at
their real config's size, built on the meta device (no memory, no download, random init skipped).

    python bench/hf_deferred_share.py [--out bench/results/hf_deferred_share.md]

The configs are transformers' defaults (each family's reference size: Llama-7B, Mistral-7B,
GPT-2 small, BERT base, T5-small, ViT-B/16, ...), with RoBERTa-base's vocabulary and a
Pythia-160M shape for GPT-NeoX. What is not deferred is listed per model: parameters used
outside any twin (ViT's class token and position table, Gemma's 1 + w RMSNorm weights, the
MLM bias that BERT-like heads hold besides their decoder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def cases():
    import transformers as T

    return {
        "Llama-7B": (T.LlamaForCausalLM, T.LlamaConfig()),
        "Mistral-7B": (T.MistralForCausalLM, T.MistralConfig()),
        "Qwen2 (default config)": (T.Qwen2ForCausalLM, T.Qwen2Config()),
        "Gemma-7B": (T.GemmaForCausalLM, T.GemmaConfig()),
        "Phi (default config)": (T.PhiForCausalLM, T.PhiConfig()),
        "GPT-2 small": (T.GPT2LMHeadModel, T.GPT2Config()),
        "Pythia-160M-like GPT-NeoX": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(
            vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
        "BERT base": (T.BertForMaskedLM, T.BertConfig()),
        "RoBERTa base": (T.RobertaForMaskedLM, T.RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                               type_vocab_size=1)),
        "ALBERT base": (T.AlbertForMaskedLM, T.AlbertConfig()),
        "T5-small": (T.T5ForConditionalGeneration, T.T5Config()),
        "ViT-B/16": (T.ViTForImageClassification, T.ViTConfig()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    import twobp

    rows = ["| model | parameters | deferred to p2 | not deferred (and why) |", "|---|---:|---:|---|"]
    for name, (cls, cfg) in cases().items():
        with torch.device("meta"):
            model = cls(cfg)
        _, report = twobp.convert(model, return_report=True)
        why = sorted({f"{kind}" for _, kind, _ in report.left} |
                     {f"tied {names[0]} (also held by an unconverted module)" for names, where in report.tied
                      if "not converted" in where})
        rows.append(f"| {name} | {report.total_elements / 1e6:,.1f} M | {report.deferred_share:.3%} | "
                    f"{'; '.join(why) or '-'} |")
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"`python bench/hf_deferred_share.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
                                  f" (transformers {__import__('transformers').__version__}, meta device)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
