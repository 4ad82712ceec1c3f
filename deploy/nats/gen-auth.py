#!/usr/bin/env python3
"""Generates the NATS identities, permissions and TLS material of one PingApp
deployment (docs/security.md, "The bus"). Nothing it writes is committed.

    python3 deploy/nats/gen-auth.py OUT_DIR [--prefix pingapp]
        [--gateways gateway-0,gateway-1] [--hosts nats,localhost,127.0.0.1]
        [--seed-mode 600]

OUT_DIR gets:
  nats-server.conf   the shipped deploy/nats/nats-server.conf
  auth.conf          one nkey user per service and per gateway id, with
                     its subject permissions (included by nats-server.conf)
  nkeys/<user>.nk    each user's nkey seed: the file its service reads with
                     --nats-creds (PINGAPP_NATS_CREDS); a secret
  tls/ca.pem         the CA the services verify the server with
                     (--nats-tls-ca, PINGAPP_NATS_TLS_CA)
  tls/server.pem, tls/server-key.pem
                     the server's certificate (SANs: --hosts) and key
  tls/ca-key.pem     the CA's key: keep it out of the cluster

Users: `presence`, `recorder`, and `gateway-<id>` for each gateway id (the
gateway runs with --gateway-id <id>). Existing seeds and the CA in OUT_DIR
are kept (a re-run with more gateways adds users); the permissions and the
server certificate are written anew.

Only python3's standard library and the openssl command are needed: an nkey
is an ed25519 key pair, which openssl generates, in NATS's base32 encoding.
"""

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# nkeys prefix bytes (github.com/nats-io/nkeys, strkey.go).
PREFIX_SEED = 18 << 3
PREFIX_USER = 20 << 3


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum of nkeys."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def encode(raw: bytes) -> str:
    raw += crc16(raw).to_bytes(2, "little")
    return base64.b32encode(raw).decode().rstrip("=")


def new_user_nkey() -> tuple[str, str]:
    """A fresh user nkey: (seed `SU...`, public key `U...`)."""
    with tempfile.TemporaryDirectory() as tmp:
        key = os.path.join(tmp, "k.pem")
        run(["openssl", "genpkey", "-algorithm", "ED25519", "-out", key])
        private = run(["openssl", "pkey", "-in", key, "-outform", "DER"], capture=True)
        public = run(
            ["openssl", "pkey", "-in", key, "-pubout", "-outform", "DER"], capture=True
        )
    seed, pub = private[-32:], public[-32:]
    prefix = bytes([PREFIX_SEED | (PREFIX_USER >> 5), (PREFIX_USER & 31) << 3])
    return encode(prefix + seed), encode(bytes([PREFIX_USER]) + pub)


def public_of(seed: str) -> str:
    """The public key of an existing seed file's seed."""
    padded = seed + "=" * (-len(seed) % 8)
    raw = base64.b32decode(padded)[2:34]
    # PKCS#8 wrapping of a raw ed25519 seed, for openssl to derive the key.
    der = bytes.fromhex("302e020100300506032b657004220420") + raw
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.der")
        with open(path, "wb") as f:
            f.write(der)
        public = run(
            ["openssl", "pkey", "-inform", "DER", "-in", path, "-pubout", "-outform", "DER"],
            capture=True,
        )
    return encode(bytes([PREFIX_USER]) + public[-32:])


def run(cmd, capture=False):
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    return out.stdout


def token(s: str) -> str:
    """services::subjects::token: one subject token."""
    t = "".join("_" if c in ".*>" or c.isspace() or not c.isprintable() else c for c in s)
    return t or "_"


def quote(subjects) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def permissions(role: str, prefix: str, gateway: str | None) -> str:
    """The subject permissions of one user (docs/security.md, "The bus")."""
    p = prefix
    stream = prefix.upper().replace("-", "_") + "_SAMPLES"
    bucket = prefix.replace("-", "_") + "_leases"
    js = "$JS.API"
    if role == "gateway":
        g = token(gateway)
        inbox = f"_INBOX.gateway-{g}.>"
        pub = [
            f"{p}.presence.gw.{g}",
            f"{p}.samples.{g}",
            f"{p}.presence.roster",
            f"{p}.recorder.samples",
            f"{p}.recorder.stats",
            f"{p}.recorder.device_history",
            f"{p}.recorder.forget_device",
            f"{js}.STREAM.INFO.{stream}",
            inbox,
        ]
        sub = [f"{p}.broadcast", f"{p}.presence.sync", inbox]
        responses = False
    elif role == "presence":
        inbox = "_INBOX.presence.>"
        pub = [
            f"{p}.broadcast",
            f"{p}.presence.sync",
            f"$KV.{bucket}.>",
            f"{js}.STREAM.INFO.KV_{bucket}",
            f"{js}.STREAM.CREATE.KV_{bucket}",
            f"{js}.STREAM.MSG.GET.KV_{bucket}",
            f"{js}.DIRECT.GET.KV_{bucket}.>",
            inbox,
        ]
        sub = [f"{p}.presence.gw.*", f"{p}.presence.roster", inbox]
        responses = True
    elif role == "recorder":
        inbox = "_INBOX.recorder.>"
        pub = [
            f"{js}.STREAM.INFO.{stream}",
            f"{js}.STREAM.CREATE.{stream}",
            f"{js}.STREAM.UPDATE.{stream}",
            f"{js}.STREAM.DELETE.{stream}",
            f"{js}.CONSUMER.INFO.{stream}.recorder",
            f"{js}.CONSUMER.CREATE.{stream}.>",
            f"{js}.CONSUMER.CREATE.{stream}",
            f"{js}.CONSUMER.DURABLE.CREATE.{stream}.recorder",
            f"{js}.CONSUMER.LIST.{stream}",
            f"{js}.CONSUMER.MSG.NEXT.{stream}.recorder",
            f"$JS.ACK.{stream}.recorder.>",
            inbox,
        ]
        sub = [
            f"{p}.recorder.samples",
            f"{p}.recorder.stats",
            f"{p}.recorder.device_history",
            f"{p}.recorder.forget_device",
            inbox,
        ]
        responses = True
    else:
        raise ValueError(role)
    lines = [
        "      permissions: {",
        f"        publish: {{ allow: {quote(pub)} }}",
        f"        subscribe: {{ allow: {quote(sub)} }}",
    ]
    if responses:
        # Answers to requests: only to the reply subject of a request it
        # received, within a minute, in at most 1024 parts (a large reply is
        # sent in parts).
        lines.append("        allow_responses: { max: 1024, expires: \"1m\" }")
    lines.append("      }")
    return "\n".join(lines)


def seed_for(out: str, user: str, mode: int) -> str:
    path = os.path.join(out, "nkeys", f"{user}.nk")
    if os.path.exists(path):
        with open(path) as f:
            seed = f.read().strip()
        os.chmod(path, mode)
        return public_of(seed)
    seed, public = new_user_nkey()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed + "\n")
    os.chmod(path, mode)
    return public


def tls(out: str, hosts: list[str]) -> None:
    d = os.path.join(out, "tls")
    os.makedirs(d, exist_ok=True)
    ca, ca_key = os.path.join(d, "ca.pem"), os.path.join(d, "ca-key.pem")
    if not os.path.exists(ca):
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", ca_key, "-out", ca, "-days", "3650",
             "-subj", "/CN=PingApp NATS CA"])
    key, csr, cert = (os.path.join(d, n) for n in ("server-key.pem", "server.csr", "server.pem"))
    ext = os.path.join(d, "server.ext")
    sans = ",".join(
        ("IP:" if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+:[0-9a-fA-F:]*", h) else "DNS:") + h
        for h in hosts
    )
    with open(ext, "w") as f:
        f.write(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", f"/CN={hosts[0]}"])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "825", "-extfile", ext])
    for n in ("server.csr", "server.ext", "ca.srl"):
        if os.path.exists(os.path.join(d, n)):
            os.remove(os.path.join(d, n))
    for n in ("server-key.pem", "ca-key.pem"):
        os.chmod(os.path.join(d, n), 0o600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--prefix", default="pingapp", help="the services' --subject-prefix")
    ap.add_argument("--gateways", default="gateway-0,gateway-1,gateway-2,gateway-3",
                    help="comma-separated gateway ids (each gateway's --gateway-id)")
    ap.add_argument("--hosts", default="nats,localhost,127.0.0.1",
                    help="names and addresses in the server certificate")
    ap.add_argument("--seed-mode", default="600",
                    help="file mode of the seed files (644 for bind mounts into containers "
                         "that run as another user on a single-user development host)")
    args = ap.parse_args()
    if not re.fullmatch(r"[0-7]{3}", args.seed_mode):
        print(f"--seed-mode {args.seed_mode!r}: three octal digits", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.prefix):
        print(f"--prefix {args.prefix!r}: letters, digits, '-' or '_'", file=sys.stderr)
        return 2
    gateways = [g.strip() for g in args.gateways.split(",") if g.strip()]
    if not gateways:
        print("--gateways: at least one gateway id", file=sys.stderr)
        return 2
    if shutil.which("openssl") is None:
        print("openssl is needed (apt-get install openssl)", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "nkeys"), exist_ok=True)
    users = [("presence", "presence", None), ("recorder", "recorder", None)]
    users += [(f"gateway-{token(g)}", "gateway", g) for g in gateways]
    blocks = []
    for user, role, gateway in users:
        public = seed_for(args.out, user, int(args.seed_mode, 8))
        blocks.append(
            f"    # {user}\n    {{\n      nkey: {public}\n"
            + permissions(role, args.prefix, gateway)
            + "\n    }"
        )
    with open(os.path.join(args.out, "auth.conf"), "w") as f:
        f.write(
            "# Generated by deploy/nats/gen-auth.py: one nkey user per service and per\n"
            f"# gateway, subject prefix {args.prefix!r}. Anyone else is refused.\n"
            "authorization {\n  users: [\n" + "\n".join(blocks) + "\n  ]\n}\n"
        )
    tls(args.out, [h.strip() for h in args.hosts.split(",") if h.strip()])
    shutil.copy(os.path.join(HERE, "nats-server.conf"), os.path.join(args.out, "nats-server.conf"))
    print(f"wrote {args.out}: {len(users)} users ({', '.join(u for u, _, _ in users)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
