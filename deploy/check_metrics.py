#!/usr/bin/env python3
"""Checks that every metric name the Grafana dashboards and the alert rules
query is one the services expose.

    python3 deploy/check_metrics.py [--known FILE] [FILES...]

FILES: dashboards (*.json) and Prometheus rule files (*.yml); default: every
dashboard under deploy/grafana/dashboards/ and deploy/prometheus-rules.yml.
The known names are, by default, the families of docs/metrics.md (with the
_bucket/_sum/_count series of their histograms) plus Prometheus's own `up`;
with --known FILE, the names in FILE, one a line (e.g. what a running
Prometheus lists at /api/v1/label/__name__/values). Exits 1 naming every
unknown metric and where it is used, 0 after printing what it checked.
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "inf", "nan",
}


def documented_names():
    names = {"up"}
    for line in (ROOT / "docs/metrics.md").read_text().splitlines():
        m = re.match(r"\| `(pingapp_[a-z0-9_]+)` \| (\w+) \|", line)
        if not m:
            continue
        name, kind = m.groups()
        names.add(name)
        if kind == "histogram":
            names.update(name + s for s in ("_bucket", "_sum", "_count"))
    if len(names) < 30:
        sys.exit("check_metrics.py: docs/metrics.md lists no metric families")
    return names


def metric_names(expr):
    """The metric names one PromQL expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges, subqueries
    # label lists of aggregations and vector matching
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if word.lower() in KEYWORDS or rest.startswith("("):
            continue  # a keyword or a function call
        before = e[:m.start()]
        if re.search(r"[0-9.]$", before):
            continue  # the exponent or unit of a number (1e3, 5m)
        names.add(word)
    return names


def exprs_of_dashboard(path):
    out = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "expr" and isinstance(v, str):
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for x in o:
                walk(x)

    walk(json.loads(path.read_text()))
    return out


def exprs_of_rules(path):
    import yaml  # PyYAML (comes with kubernetes-validate)

    doc = yaml.safe_load(path.read_text())
    return [r["expr"] for g in doc.get("groups", []) for r in g.get("rules", [])]


def main(argv):
    known = None
    if argv[:1] == ["--known"]:
        known = set(pathlib.Path(argv[1]).read_text().split())
        argv = argv[2:]
    if known is None:
        known = documented_names()
    files = [pathlib.Path(f) for f in argv] or [
        *sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")),
        ROOT / "deploy/prometheus-rules.yml",
    ]
    unknown, checked = [], 0
    for f in files:
        exprs = exprs_of_dashboard(f) if f.suffix == ".json" else exprs_of_rules(f)
        if not exprs:
            unknown.append(f"{f}: no queries found")
        for expr in exprs:
            for name in sorted(metric_names(expr)):
                checked += 1
                if name not in known:
                    unknown.append(f"{f.name}: unknown metric {name} in: {expr}")
    if unknown:
        print("\n".join(unknown), file=sys.stderr)
        return 1
    print(f"check_metrics.py: {checked} metric uses in {len(files)} files: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
