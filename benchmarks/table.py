"""The README table of a benchmark's `--json` rows (bench_loss, bench_output_layer).

python -m benchmarks.table docs/bench/loss_cpu.json
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import markdown_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="the file --json wrote")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        print(markdown_table(json.load(f)))


if __name__ == "__main__":
    main()
