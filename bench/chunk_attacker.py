"""The attacker of bench/chunk_attack.sh: PORT SUBJECT SETS PARTS KIB. Speaks
the NATS protocol directly (no client library): SETS sets announced as 1024
parts (the most a reassembler accepts), PARTS of each sent, KIB KiB each,
with the Pingapp-Chunk header; none completes. Then a PING round trip."""

import socket, sys
port, subject = int(sys.argv[1]), sys.argv[2]
sets, parts, kib = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = socket.create_connection(("127.0.0.1", port))
s.recv(4096)  # INFO
s.sendall(b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n')
payload = b"x" * (kib * 1024)
for n in range(sets):
    for i in range(parts):
        hdr = f"NATS/1.0\r\nPingapp-Chunk: evil{n} {i} 1024\r\n\r\n".encode()
        s.sendall(f"HPUB {subject} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode()
                  + hdr + payload + b"\r\n")
s.sendall(b"PING\r\n")
buf = b""
while b"PONG" not in buf:
    buf += s.recv(4096)
