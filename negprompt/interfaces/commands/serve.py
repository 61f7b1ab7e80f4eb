"""``negprompt serve``: a web page over the model (the web extra)."""

from __future__ import annotations

import argparse
import sys

from negprompt.interfaces.options import (
    MODEL_HELP,
    CommandError,
    add_device_options,
    check_device_names,
    positive_int,
    session_from_args,
    whole_number,
)

WEB_EXTRA = "negprompt serve needs the web extra: pip install 'negprompt[web]'"

ORDER = 60  # its place in negprompt --help


def port_number(text: str) -> int:
    """A TCP port, 1–65535."""
    value = whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r}: give 1–65535")
    return value


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Address, model and the limits of one request (one --max-… flag per field of ServerLimits)."""
    from negprompt.interfaces.web.settings import ServerLimits

    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=7860, help="port, 1–65535 (default 7860)")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other machines can reach; the page has no login (default: refused)",
    )
    limits = parser.add_argument_group("limits of one request (beyond them the page says which flag to raise)")
    for name, what, default, ceiling in ServerLimits.described():
        limits.add_argument(
            ServerLimits.flag(name),
            dest=f"max_{name}",
            type=positive_int,
            default=default,
            metavar="N",
            help=f"most {what}, 1–{ceiling} (default {default})",
        )
    add_device_options(parser)


def check_serve_address(args: argparse.Namespace) -> None:
    """Before the model loads: a --host other machines reach needs --allow-remote, the web extra is
    installed, and the port is free."""
    import importlib.util
    import socket

    from negprompt.interfaces.web.settings import is_loopback

    if not is_loopback(args.host) and not args.allow_remote:
        raise CommandError(
            f"--host {args.host} can be reached from other machines and the page has no login; "
            "add --allow-remote to serve there anyway, or keep the default 127.0.0.1"
        )
    if importlib.util.find_spec("gradio") is None:
        raise CommandError(WEB_EXTRA)
    try:  # a port in use is found before the model loads
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host.strip("[]"), args.port))  # [::1] as a URL writes it, or ::1
    except OSError as error:
        raise CommandError(
            f"cannot listen on {args.host}:{args.port} ({error.strerror}); give another --port"
        ) from None


def command_serve(args: argparse.Namespace) -> int:
    """Checks the address, loads the model and serves the page until stopped."""
    from negprompt.interfaces.web.settings import ServerLimits, is_loopback

    limits = ServerLimits(**{name: getattr(args, f"max_{name}") for name, *_ in ServerLimits.described()})
    check_device_names(args)
    check_serve_address(args)
    if not is_loopback(args.host):
        print(
            f"negprompt: warning: serving on {args.host}:{args.port}, reachable from other machines; "
            "anyone who reaches it can run the model (there is no login)",
            file=sys.stderr,
        )
    session = session_from_args(args)
    from negprompt.interfaces.web.app import serve

    serve(session, args.host, args.port, limits)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``serve``."""
    serve = commands.add_parser("serve", help="a web page over the model: generate, attention, edit (the web extra)")
    add_serve_options(serve)
    serve.set_defaults(handler=command_serve)
