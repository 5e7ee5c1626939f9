"""Export a finished run as a standalone model folder, optionally pushed to the Hugging Face Hub:

    python scripts/export.py RUN_DIR [--out DIR] [--dtype bf16|fp32|fp16] [--push-to-hub REPO]

LoRA adapters are merged into the base weights (a 4-bit run's base is de-quantized first, and
the model card says so); a full fine-tuning run's weights are copied. The folder (default
RUN_DIR/export) holds the weights, the tokenizer with its chat template, and a model card
(README.md: base model, task, algorithm, key settings, steps, held-out results before/after,
the command that reproduces the run); `transformers.AutoModelForCausalLM.from_pretrained` and
`vllm.LLM` load it. --push-to-hub uploads it with huggingface_hub under your own login
(`hf auth login` or HF_TOKEN). Logic: grpo/run/export.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from grpo.run.export import DTYPES, export_run, push_to_hub  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (outputs/DATE/TIME)")
    parser.add_argument("--out", type=Path, help="the folder to write (default: RUN_DIR/export)")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="weight dtype (default: the run's model.dtype)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload to this model repo")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} to {out}")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private or None)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
