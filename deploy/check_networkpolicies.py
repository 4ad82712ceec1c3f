#!/usr/bin/env python3
"""Asserts the network policies of a rendered overlay (docs/security.md,
"Network policies"), so they cannot regress:

  python3 deploy/check_networkpolicies.py RENDERED.yaml

- a default deny of ingress AND egress for every pod of the namespace;
- no rule that allows everything: every ingress rule names its sources and
  ports, every egress rule its destinations and ports, no 0.0.0.0/0 or ::/0;
- gateway port 8000 only from the ingress controller's pods (their
  namespace and their label in one peer);
- admin port 9000 only from the monitoring namespace or Prometheus pods;
- egress per service: DNS (to kube-dns only), NATS 4222, OTLP 4318, and
  Postgres 5432 for the recorder alone; NATS and Postgres pods (dev) only
  DNS. Each service must have DNS and NATS (and the recorder Postgres).

Exit 0 when all hold, 1 (listing what does not) otherwise.
"""

import sys

import yaml

INGRESS_NS = "ingress-nginx"
MONITORING_NS = "monitoring"
NS_LABEL = "kubernetes.io/metadata.name"
# Allowed and required egress (port, protocol) per kind of pod.
DNS = {(53, "UDP"), (53, "TCP")}
EGRESS = {
    "gateway": (DNS | {(4222, "TCP"), (4318, "TCP")}, DNS | {(4222, "TCP")}),
    "presence": (DNS | {(4222, "TCP"), (4318, "TCP")}, DNS | {(4222, "TCP")}),
    "recorder": (
        DNS | {(4222, "TCP"), (4318, "TCP"), (5432, "TCP")},
        DNS | {(4222, "TCP"), (5432, "TCP")},
    ),
    "nats": (DNS, set()),
    "postgres": (DNS, set()),
}
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}


def selects(selector, labels):
    """Whether a label selector matches `labels` (an empty one matches all)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def kind_of(labels):
    if labels.get("app.kubernetes.io/name") == "pingapp":
        return labels.get("app.kubernetes.io/component")
    return labels.get("app.kubernetes.io/name")


def ports_of(rule):
    return {(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports") or []}


def bounded(where, rule, peers_key):
    """What is wrong with one rule: it must name its peers and its ports,
    and no peer may be the whole internet or every pod of the cluster."""
    problems = []
    if not rule.get(peers_key):
        problems.append(f"{where} allows every peer")
    if not rule.get("ports"):
        problems.append(f"{where} allows every port")
    for peer in rule.get(peers_key) or []:
        if (peer.get("ipBlock") or {}).get("cidr") in OPEN_CIDRS:
            problems.append(f"{where} allows the whole internet")
        if peer.get("namespaceSelector") == {} and not peer.get("podSelector"):
            problems.append(f"{where} allows every pod of every namespace")
    return problems


def check(docs):
    problems = []
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    pods = {}
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"].get("labels") or {}
            pods[d["metadata"]["name"]] = labels
    if not policies:
        return ["no NetworkPolicy rendered"]

    deny = [
        p for p in policies
        if p["spec"].get("podSelector") == {}
        and {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes") or [])
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    if not deny:
        problems.append("no default-deny policy for both ingress and egress (podSelector: {})")

    for p in policies:
        name = p["metadata"]["name"]
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(p["spec"].get(direction) or []):
                problems += bounded(f"{name}: {direction} rule {i}", rule, peers_key)
        for i, rule in enumerate(p["spec"].get("egress") or []):
            where = f"{name}: egress rule {i}"
            if any(port == 53 for port, _ in ports_of(rule)):
                for peer in rule.get("to") or []:
                    ns = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                    pod = (peer.get("podSelector") or {}).get("matchLabels") or {}
                    if ns.get(NS_LABEL) != "kube-system" or pod.get("k8s-app") != "kube-dns":
                        problems.append(f"{where}: DNS to something else than kube-dns")

    for pod, labels in sorted(pods.items()):
        kind = kind_of(labels)
        mine = [p for p in policies if selects(p["spec"].get("podSelector"), labels)]
        if not any(p in deny for p in mine):
            problems.append(f"{pod}: not under the default deny")
        # Ingress.
        for p in mine:
            for rule in p["spec"].get("ingress") or []:
                for port, _ in ports_of(rule):
                    for peer in rule.get("from") or []:
                        ns = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                        podsel = peer.get("podSelector")
                        if port == 8000:
                            if ns.get(NS_LABEL) != INGRESS_NS or not podsel:
                                problems.append(
                                    f"{pod}: port 8000 admitted from {peer} "
                                    f"(only the ingress controller's pods in {INGRESS_NS})"
                                )
                        elif port == 9000:
                            from_monitoring = ns.get(NS_LABEL) == MONITORING_NS
                            from_prometheus = "namespaceSelector" not in peer and (
                                (podsel or {}).get("matchLabels") or {}
                            ).get("app.kubernetes.io/name") == "prometheus"
                            if not (from_monitoring or from_prometheus):
                                problems.append(f"{pod}: admin port 9000 admitted from {peer}")
        # Egress.
        if kind not in EGRESS:
            problems.append(f"{pod}: unknown kind of pod {labels}, no egress expectation")
            continue
        allowed, required = EGRESS[kind]
        egress = set()
        for p in mine:
            for rule in p["spec"].get("egress") or []:
                egress |= ports_of(rule)
        if egress - allowed:
            problems.append(f"{pod}: egress to {sorted(egress - allowed)} is more than it needs")
        if required - egress:
            problems.append(f"{pod}: egress to {sorted(required - egress)} is missing")
    if "pingapp-gateway" not in pods:
        problems.append("no pingapp-gateway Deployment rendered")
    return problems


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
    problems = check(docs)
    for p in problems:
        print(f"network policies: {p}")
    if not problems:
        n = sum(1 for d in docs if d.get("kind") == "NetworkPolicy")
        print(f"network policies: {n} policies, default deny in and out, every rule bounded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
