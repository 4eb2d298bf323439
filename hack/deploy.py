#!/usr/bin/env python3
"""The Helm chart is the source of truth for deploy/: render it, lint it, check values.

Runs in the tools venv (hack/test-deps.sh makes it: helm-python-sdk bundles Helm's Go SDK,
so no helm binary is needed).

  deploy.py render            write deploy/qcow2-csi.yaml from the chart's default values
  deploy.py render --stdout   print it instead (the drift check compares the two)
  deploy.py render --values FILE
                              print the chart rendered with FILE's values
  deploy.py lint [CHART]      helm lint: exit 1 on any warning or error
  deploy.py values FILE...    validate values files against values.schema.json: exit 1 if
                              any is rejected (prints the reason)
"""

import sys
from pathlib import Path

import helm_python

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "qcow2-csi"
OUT = ROOT / "deploy" / "qcow2-csi.yaml"
RELEASE = "qcow2-csi"
NAMESPACE = "qcow2-csi"

HEADER = f"""\
# Generated from charts/qcow2-csi with its default values (release {RELEASE}, namespace
# {NAMESPACE}) by `make deploy` (hack/deploy.py). Do not edit: change the chart and render
# again; CI fails when this file and the chart disagree.
---
# Node plugins are privileged (mounts, loop devices, nbd): the namespace must allow it.
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    pod-security.kubernetes.io/enforce: privileged
"""


def render(chart: Path = CHART, values: dict | None = None) -> str:
    with helm_python.Chart.load(str(chart)) as ch:
        out = ch.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [HEADER]
    # Templates in a fixed order (Helm returns a map); NOTES.txt is not a manifest.
    for path in sorted(out):
        body = out[path].strip()
        if not path.endswith(".yaml") or not body:
            continue
        if not body.startswith("---"):
            body = "---\n" + body
        docs.append(f"{body}\n")
    return "".join(docs)


def lint(chart: Path) -> int:
    report = helm_python.lint(str(chart), strict=True)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    for m in report["messages"]:
        print(f"{m['path']}: {m['error']} (severity {m['severity']})")
    for e in report["errors"]:
        print(e)
    return 1 if bad or report["errors"] else 0


def check_values(files: list[str]) -> int:
    rc = 0
    for f in files:
        values = helm_python.values_from_yaml(Path(f).read_text())
        with helm_python.Chart.load(str(CHART)) as ch:
            try:
                ch.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
                print(f"{f}: accepted")
            except helm_python.HelmError as e:
                print(f"{f}: rejected: {e}")
                rc = 1
    return rc


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "render":
        if len(args) == 2 and args[0] == "--values":
            values = helm_python.values_from_yaml(Path(args[1]).read_text())
            sys.stdout.write(render(values=values))
            return 0
        text = render()
        if args == ["--stdout"]:
            sys.stdout.write(text)
        else:
            OUT.parent.mkdir(exist_ok=True)
            OUT.write_text(text)
            print(f"wrote {OUT.relative_to(ROOT)}")
        return 0
    if cmd == "lint":
        return lint(Path(args[0]) if args else CHART)
    if cmd == "values":
        return check_values(args)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
