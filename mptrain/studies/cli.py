"""`mptrain-study`: will this model train in FP16, BF16, FP8, with which loss scale and which layers kept in
higher precision? The numerics scan, one run per mode and seed, and the report with its verdicts, in one command.

    mptrain-study model=timm model.name=resnet18 dataset=image_folder dataset.path=$HOME/data/pets --steps 300
    mptrain-study model=custom model.net._target_=my_pkg.nets.MyNet --modes fp32,mixed,bf16 --seeds 3
    mptrain-study model=transformer --steps 500 --out studies/transformer
    mptrain-study model=transformer --layers mxfp4 --steps 600     # which layers must stay bf16 under MXFP4

Any argument that is not an option is a Hydra override of mptrain's config, as for `mptrain` (precision and seed
excepted: the study sets them). What it runs is mptrain.studies.study.run_study, the same as `mptrain.study(...)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mptrain.console import OneLineParser, positive
from mptrain.errors import UserError
from mptrain.schema.precision import BLOCK_FORMATS
from mptrain.studies.study import DEFAULT_MODES


def parse_args(argv):
    parser = OneLineParser(prog="mptrain-study", description=__doc__.split("\n\n")[0],
                           epilog="Other arguments: Hydra overrides (model=..., dataset=..., optim=..., trainer=...).")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"precision modes, fp32 among them (default {','.join(DEFAULT_MODES)})")
    parser.add_argument("--seeds", type=positive(int), default=3, help="seeds per mode, paired across modes (3)")
    parser.add_argument("--steps", type=positive(int), help="training steps per run (default: the config's epochs)")
    parser.add_argument("--numerics-steps", type=positive(int), default=20, help="FP32 steps scanned first (20)")
    parser.add_argument("--layers", choices=BLOCK_FORMATS, metavar="FORMAT",
                        help="instead of modes: which Linear layers must stay bf16 under this block format "
                             "(mptrain.studies.layers: each layer group alone in the format, ranked against bf16, then "
                             "the smallest keep-list that is equivalent)")
    parser.add_argument("--by", choices=("kind", "layer"), default="kind",
                        help="--layers: group layers by kind across blocks (blocks.*.attn.qkv; default) or one by one")
    parser.add_argument("--margin", action="append", metavar="[METRIC=]X",
                        help="equivalence margin of the verdicts, as mptrain-report's: accuracy in points (default "
                             "0.5), other metrics in %% of the control (default 1), e.g. --margin perplexity=2")
    parser.add_argument("--out", type=Path, help="a new folder for runs/, report/ and numerics.json "
                                                 "(default studies/<date>_<time>)")
    return parser.split_overrides(argv)


def main(argv=None) -> None:
    from mptrain.studies.study import describe, run_study

    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        announce = lambda line: print(f"mptrain-study: {line}", file=sys.stderr, flush=True)  # noqa: E731
        if args.layers:
            from mptrain.studies.layers import run_layer_study

            print(run_layer_study(overrides, args.layers, args.seeds, args.steps, args.by, args.out, announce,
                                  args.margin))
            return
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        result = run_study(overrides, modes, args.seeds, args.steps, args.numerics_steps, args.out, announce,
                           args.margin)
    except UserError as e:
        print(f"mptrain-study: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(describe(result))


if __name__ == "__main__":
    main()
