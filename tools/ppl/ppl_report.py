"""PPL report of scored datasets: histogram PNG, percentile table, curriculum boundaries.

    python tools/ppl/ppl_report.py --data-prefix out/web-cn_text_document out/book-cn_text_document \
        --output-dir out/ppl-report --num-buckets 4
"""

from __future__ import annotations

import argparse
import sys

from megatron_syne.data.metadata import MetadataError
from megatron_syne.scoring.report import format_report, ppl_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-prefix", nargs="+", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--group-by", default="source,lang", help="comma-separated metadata columns")
    p.add_argument("--num-buckets", type=int, default=4, help="k of the k-quantile boundaries")
    args = p.parse_args(argv)
    group_by = tuple(c.strip() for c in args.group_by.split(",") if c.strip())
    try:
        groups = ppl_report(args.data_prefix, args.output_dir, group_by, args.num_buckets)
    except (MetadataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(groups, group_by, args.num_buckets))
    print(f"\nwritten: {args.output_dir}/ppl_report.{{md,json}}, ppl_histogram.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
