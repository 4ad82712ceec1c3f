#!/usr/bin/env python3
"""Second half of the Kubernetes check in deploy/validate.sh.

kubernetes-validate knows only the built-in Kubernetes kinds. For any other
kind (a CRD such as the Prometheus Operator's ServiceMonitor) it prints
"WARN ... Couldn't find schema for kind ..." and still exits 0, so a CRD, or a
built-in kind with a mistyped apiVersion, would pass unchecked.

This script closes that gap. Given the rendered manifests and the output of
kubernetes-validate for them, it
  * validates every document whose apiVersion/kind has a schema in
    deploy/schemas/ against that schema (strict: unknown fields fail);
  * fails on every WARN line of kubernetes-validate that is not about a kind
    covered by deploy/schemas/, and on any line it does not understand;
  * fails if kubernetes-validate passed no resource at all.

Usage: validate_crds.py RENDERED_YAML KUBERNETES_VALIDATE_OUTPUT
Needs PyYAML and jsonschema, which `pip install kubernetes-validate` brings.
"""

import json
import pathlib
import re
import sys

try:
    import jsonschema
    import yaml
except ImportError as err:  # pragma: no cover - depends on the machine
    print(
        f"FAIL: python3 lacks {err.name}; install it with `pip install kubernetes-validate` "
        "(which brings PyYAML and jsonschema)",
        file=sys.stderr,
    )
    sys.exit(127)

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent / "schemas"
WARN_MISSING = re.compile(
    r"^WARN \S+ Couldn't find schema for kind (?P<kind>\S+) with api version "
    r"(?P<api>\S+) for kubernetes version \S+$"
)


def load_schemas():
    """Map (apiVersion, kind) to (path, schema) for every file in deploy/schemas."""
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        props = schema["properties"]
        key = (props["apiVersion"]["const"], props["kind"]["const"])
        schemas[key] = (path, schema)
    return schemas


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    rendered, kv_output = argv[1], argv[2]
    schemas = load_schemas()
    errors = []

    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]

    # 1. Every document of a kind with a local schema validates against it.
    checked = 0  # documents that passed
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in schemas:
            continue
        path, schema = schemas[key]
        name = doc.get("metadata", {}).get("name", "?")
        validator = jsonschema.Draft202012Validator(schema)
        problems = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        for p in problems:
            where = ".".join(str(x) for x in p.path) or "(root)"
            errors.append(f"{key[1]}/{name}: {where}: {p.message} (schema {path.name})")
        if not problems:
            print(f"INFO {key[1].lower()}/{name} ({key[0]}) passed against deploy/schemas/{path.name}")
            checked += 1

    # 2. Every line of kubernetes-validate is understood, and every kind it
    #    had no schema for is one that step 1 checked.
    passed = 0
    for line in pathlib.Path(kv_output).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("INFO ") and " passed for resource " in line:
            passed += 1
            continue
        m = WARN_MISSING.match(line)
        if m and (m["api"], m["kind"]) in schemas:
            continue
        if m:
            errors.append(
                f"kind {m['kind']} with apiVersion {m['api']} is unknown to kubernetes-validate "
                "and has no schema in deploy/schemas/ (a typo in apiVersion/kind, or a CRD "
                "that needs a schema there)"
            )
        else:
            errors.append(f"unexpected kubernetes-validate output: {line}")
    if passed == 0:
        errors.append("kubernetes-validate validated no resource at all")

    print(
        f"INFO {passed} resources passed kubernetes-validate, "
        f"{checked} custom resources passed deploy/schemas"
    )
    for e in dict.fromkeys(errors):  # each distinct error once, in order
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
