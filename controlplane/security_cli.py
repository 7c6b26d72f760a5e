"""`headroom-controlplane certs init|issue` and `headroom-controlplane token issue`: credentials for running the
control plane beyond localhost (see README "Beyond localhost"). Text by default; `--json`
prints one JSON document instead (paths; the token itself for `token issue`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from headroom_sidecar.controlplane import certs
from headroom_sidecar.controlplane.auth import Role, issue_token, load_token_key, parse_ttl_s
from headroom_sidecar.controlplane.cliout import add_json_flag, write_json

TOKEN_KEY_ENV = "HEADROOM_CP_TOKEN_KEY_FILE"
ROLES = [r.name.lower() for r in Role]


def _operator(text: str) -> tuple[str, str]:
    name, sep, role = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:ROLE, e.g. alice:approver")
    try:
        Role.parse(role)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, role.lower()


def add_security_commands(sub) -> None:
    c = sub.add_parser("certs", help="a CA and certificates for TLS").add_subparsers(
        dest="certs_command", required=True)
    init = c.add_parser("init", help="CA, server, agent and operator certificates, token key")
    init.add_argument("dir")
    init.add_argument("--agent", action="append", default=None,
                      help="agent id (certificate CN); repeatable (default agent-1)")
    init.add_argument("--operator", action="append", type=_operator, default=None,
                      help="NAME:ROLE, roles viewer/operator/approver/admin; repeatable "
                           "(default admin:admin)")
    init.add_argument("--server-name", action="append", default=None,
                      help="DNS name or IP clients use for the server; repeatable "
                           "(default localhost, 127.0.0.1)")
    add_json_flag(init)
    init.set_defaults(handler=_certs_init)
    issue = c.add_parser("issue", help="one more client certificate from DIR's CA")
    issue.add_argument("dir")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--agent", help="agent id")
    who.add_argument("--operator", type=_operator, help="NAME:ROLE")
    add_json_flag(issue)
    issue.set_defaults(handler=_certs_issue)
    t = sub.add_parser("token", help="signed operator tokens").add_subparsers(
        dest="token_command", required=True)
    ti = t.add_parser("issue", help="print a token for --subject with --role, valid --ttl")
    ti.add_argument("--subject", required=True)
    ti.add_argument("--role", required=True, choices=ROLES)
    ti.add_argument("--ttl", default="8h", help="e.g. 15m, 8h, 7d (default 8h)")
    ti.add_argument("--key-file", default=None, help=f"HMAC key (env {TOKEN_KEY_ENV})")
    add_json_flag(ti)
    ti.set_defaults(handler=_token_issue)


def _pair_doc(pair: certs.Issued) -> dict:
    return {"cert_file": str(pair.cert_file), "key_file": str(pair.key_file)}


def _serve_env(root: Path) -> dict:
    """The server's environment for this folder's TLS files and token key."""
    return {"HEADROOM_CP_TLS_CERT": f"{root}/server.pem", "HEADROOM_CP_TLS_KEY": f"{root}/server.key",
            "HEADROOM_CP_TLS_CLIENT_CA": f"{root}/ca.pem", TOKEN_KEY_ENV: f"{root}/token.key"}


def _certs_init(args: argparse.Namespace, out) -> int:
    made = certs.init_dir(args.dir, agents=args.agent or ("agent-1",),
                          operators=args.operator or (("admin", "admin"),),
                          server_names=args.server_name or certs.DEFAULT_SERVER_NAMES)
    root = Path(args.dir).resolve()
    if args.json:
        write_json({"dir": str(root), "ca_file": str(made.ca_file),
                     "ca_key_file": str(made.ca_key_file), "server": _pair_doc(made.server),
                     "agents": {a: _pair_doc(p) for a, p in made.agents.items()},
                     "operators": {o: _pair_doc(p) for o, p in made.operators.items()},
                     "token_key_file": str(made.token_key_file), "serve_env": _serve_env(root)},
                    out)
        return 0
    out.write(f"wrote {root}: ca.pem (keep ca.key offline), server.pem/.key, "
              f"{', '.join(f'agent-{a}' for a in made.agents)}, "
              f"{', '.join(f'operator-{o}' for o in made.operators)}, token.key\n"
              f"serve:  HEADROOM_CP_TLS_CERT={root}/server.pem HEADROOM_CP_TLS_KEY={root}/server.key "
              f"HEADROOM_CP_TLS_CLIENT_CA={root}/ca.pem HEADROOM_CP_TOKEN_KEY_FILE={root}/token.key\n")
    return 0


def _certs_issue(args: argparse.Namespace, out) -> int:
    cn, ou = (args.agent, certs.AGENT_OU) if args.agent else args.operator
    pair = certs.issue_into(Path(args.dir), cn, ou)
    if args.json:
        write_json({"cn": cn, "ou": ou, **_pair_doc(pair)}, out)
        return 0
    out.write(f"{pair.cert_file}\n{pair.key_file}\n")
    return 0


def _token_issue(args: argparse.Namespace, out) -> int:
    key_file = args.key_file or os.environ.get(TOKEN_KEY_ENV)
    if not key_file:
        raise ValueError(f"token issue: give --key-file or set {TOKEN_KEY_ENV} (the server's "
                         "token key, e.g. DIR/token.key from `headroom-controlplane certs init DIR`)")
    token = issue_token(load_token_key(key_file), args.subject, Role.parse(args.role),
                        parse_ttl_s(args.ttl))
    if args.json:
        write_json({"token": token, "subject": args.subject, "role": args.role,
                     "ttl_s": parse_ttl_s(args.ttl)}, out)
        return 0
    out.write(token + "\n")
    return 0
