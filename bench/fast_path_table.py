"""Print the Markdown table of a fast-path benchmark JSON (bench/test_bench_fast_path.py --benchmark-json).

    python bench/fast_path_table.py fast_path.json
"""

import json
import sys


def main(path: str) -> None:
    rows = [b["extra_info"] for b in json.load(open(path))["benchmarks"]]
    print("| case | ms | vs fastest BP | vs BP bf16-cl-graph | speed-up vs authors | memory vs BP (same precision) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r.get('median_step_ms')} | {r.get('time_ratio_vs_fastest_bp', '')} | "
              f"{r.get('time_ratio_vs_bp_graph', '')} | {r.get('speedup_vs_authors', '')} | "
              f"{r.get('memory_ratio_vs_bp_same_precision', '')} |")


if __name__ == "__main__":
    main(sys.argv[1])
