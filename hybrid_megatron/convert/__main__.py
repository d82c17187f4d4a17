"""CLI: ``python -m hybrid_megatron.convert to-hf|from-hf ...`` (see --help)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Parse arguments and run one conversion; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m hybrid_megatron.convert")
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="training checkpoint -> Hugging Face directory")
    to.add_argument("--checkpoint", required=True, help="checkpoint root (with 'latest') or step dir")
    to.add_argument("--output", required=True)
    to.add_argument("--target", default="auto", choices=["auto", "nemotron_h", "falcon_h1", "remote_code"])
    to.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    to.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    fr = sub.add_parser("from-hf", help="NemotronH / Falcon-H1 directory -> our model config + weights")
    fr.add_argument("--hf", required=True, help="Hugging Face model directory")
    fr.add_argument(
        "--output",
        required=True,
        help="directory for a megatron-core checkpoint (model weights only; a recipe "
        "starts from it with checkpoint.init_from) and model.yaml (its 'model:' "
        "section)",
    )
    fr.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)

    from hybrid_megatron import runtime
    from hybrid_megatron.errors import InputError

    runtime.setup()
    try:
        if args.command == "to-hf":
            from hybrid_megatron.convert.export import to_hf

            path, target, why = to_hf(args.checkpoint, args.output, args.target, args.dtype, args.overwrite)
            print(f"wrote {path} as {target}: {why}")
            if target == "remote_code":
                print("load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
                # AutoTokenizer reads config.json first and would ask about the code it names
                print(
                    "tokenizer (a plain fast tokenizer, no code): "
                    "AutoTokenizer.from_pretrained(path, trust_remote_code=False)"
                )
        else:
            from hybrid_megatron.convert.export import from_hf_to_checkpoint

            out, _ = from_hf_to_checkpoint(args.hf, args.output, args.overwrite)
            print(
                f"wrote {out} (megatron-core checkpoint, model weights only) and {out}/model.yaml;"
                f" train from it with checkpoint.init_from: {out}"
            )
    # Bad input: an unreadable checkpoint or tokenizer, a path that cannot be read or written,
    # a Hugging Face directory that is not one (ValueError, naming the file).
    except (InputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
