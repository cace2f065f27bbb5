"""The ``openim-bizplugin`` command. Thin: each command calls the services.

``run(argv, stdout, stderr)`` returns the exit code so tests can call it with
injected streams; every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from . import logs
from .client import BizClient, BizClientError
from .config import CONFIG_ENV, Config, config_path, load_config
from .errors import BizError, ConfigError
from .signing import signature_headers

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENTS_COUNTED = 10_000  # `subscribers` counts the events a cursor waits for up to this many


class CommandError(Exception):
    """A command failed; the message is the one line to print."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openim-bizplugin", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, config: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        if config:
            sub.add_argument("-c", "--config", help="config file (default: $BIZPLUGIN_CONFIG)")
        return sub

    serve = command("serve", "run the HTTP server with its delivery workers")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0 picks a free port)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="of the JSON lines on stderr")

    worker = command("worker", "run delivery workers only (no HTTP), sharing the store with the servers")
    worker.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="of the JSON lines on stderr")

    dlq = command("dlq", "the dead-letter list: messages with recipients that failed for good", config=False)
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="show dead letters, newest first")
    dlq_list.add_argument("-c", "--config", help="config file (default: $BIZPLUGIN_CONFIG)")
    dlq_replay = dlq_commands.add_parser("replay", help="queue the failed recipients again")
    dlq_replay.add_argument("-c", "--config", help="config file (default: $BIZPLUGIN_CONFIG)")
    which = dlq_replay.add_mutually_exclusive_group(required=True)
    which.add_argument("message_id", nargs="?", help="one message")
    which.add_argument("--all", action="store_true", help="every dead letter")

    subscribers = command("subscribers", "list the subscribers' cursors in the store: where each stands")
    subscribers.add_argument("--forget-unconfigured", action="store_true",
                             help="delete the cursors of subscribers no longer in the config, and the events"
                                  " only they waited for")

    command("vacuum", "rewrite the SQLite files with incremental auto-vacuum, giving free space back"
                      " (once after upgrading a large file; best with the sidecar stopped)")

    doctor = command("doctor", "check config, OpenIM, sender account and the callback URL")
    doctor.add_argument("--public-url", help="how OpenIM reaches this sidecar (default: server address); "
                        "also posts a harmless callback there to check the URL end to end")
    doctor.add_argument("--from", dest="from_file", metavar="FILE",
                        help="OpenIM's webhooks.yml: check that it points at this sidecar")

    webhooks = command("webhooks", "print OpenIM's webhooks.yml with the sidecar's keys changed in place")
    webhooks.add_argument("--from", dest="from_file", metavar="FILE", required=True,
                          help="the webhooks.yml OpenIM reads now (config/webhooks.yml)")
    webhooks.add_argument("--public-url", help="how OpenIM reaches this sidecar (default: server address)")

    demo = command("demo", "run the fake OpenIM and a sidecar, send each type, show what apps receive")
    demo.add_argument("--schemas", help="catalogue folder (default: the config's schemas.dir with -c, "
                      "else the example catalogue shipped with the package)")

    init = command("init", "write DIR/config.toml with fresh secrets and DIR/schemas/ with the example types")
    init.add_argument("dir", nargs="?", default=".", help="folder to write into (default: the current one)")

    keygen = command("keygen", "print a new random secret for [clients.<id>] secrets")  # -c accepted, ignored
    keygen.add_argument("--bytes", type=int, default=32, help="random bytes (default 32)")

    schemas = command("schemas", "work with the type catalogue", config=False)
    schema_commands = schemas.add_subparsers(dest="schemas_command", required=True, metavar="ACTION")
    check = schema_commands.add_parser("check", help="validate every schema and example, show version changes")
    check.add_argument("-c", "--config", help="config file (default: $BIZPLUGIN_CONFIG)")
    check.add_argument("--dir", help="catalogue folder (default: the config's schemas.dir)")
    docs = schema_commands.add_parser("docs", help="write a browsable catalogue of the types (Markdown or HTML)")
    docs.add_argument("-c", "--config", help="config file (default: $BIZPLUGIN_CONFIG)")
    docs.add_argument("--dir", help="catalogue folder (default: the config's schemas.dir)")
    docs.add_argument("--out", default="-", help="file to write (.md or .html), or - for standard output (default)")
    docs.add_argument("--format", choices=("markdown", "html"),
                      help="default: html when --out ends in .html or .htm, else markdown")

    sign = command("sign", "print the two signature headers for a request")
    sign.add_argument("--client", required=True)
    sign.add_argument("--method", required=True)
    sign.add_argument("--path", required=True, help="path and query as sent, e.g. /v1/messages")
    sign.add_argument("--body-file", help="file holding the body, or - for stdin (default: empty)")
    sign.add_argument("--idempotency-key", help="sent as the Idempotency-Key header: signed, and printed too")

    send = command("send", "sign and post a message, print the answer")
    send.add_argument("--client", required=True)
    send.add_argument("--type", required=True)
    send.add_argument("--version", required=True, type=int)
    send.add_argument("--data", required=True, help="the data object as JSON")
    send.add_argument("--user", action="append", default=[], help="recipient user id (repeatable)")
    send.add_argument("--group", action="append", default=[], help="recipient group id (repeatable)")
    send.add_argument("--priority", choices=("high", "normal", "low"))
    send.add_argument("--idempotency-key")
    send.add_argument("--url", help="sidecar base URL (default: the config's server address)")

    status = command("status", "print a message and its recipients")
    status.add_argument("--client", required=True)
    status.add_argument("message_id")
    status.add_argument("--url", help="sidecar base URL (default: the config's server address)")
    return parser


def run(argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    """Run one command; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and one error line
        return EXIT_USAGE if exc.code else EXIT_OK
    handler = _HANDLERS[args.command]
    args.stderr = stderr  # for commands whose standard output is data (webhooks): their notes
    try:
        return handler(args, stdout)
    except ConfigError as exc:
        print(f"openim-bizplugin: config error: {exc}", file=stderr)
        return EXIT_USAGE
    except (CommandError, BizClientError, BizError) as exc:
        print(f"openim-bizplugin: {exc}", file=stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def main() -> None:
    sys.exit(run(sys.argv[1:], sys.stdout, sys.stderr))


def _config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _serve(args: argparse.Namespace, stdout: TextIO) -> int:
    from .web.server import serve  # Flask and the store are only needed here

    config = _config(args)
    logs.setup(args.log_level.upper(), config)
    return serve(config, host=args.host, port=args.port, announce=stdout)


def _worker(args: argparse.Namespace, stdout: TextIO) -> int:
    from .web.server import run_workers

    config = _config(args)
    logs.setup(args.log_level.upper(), config)
    return run_workers(config, announce=stdout)


def _dlq(args: argparse.Namespace, stdout: TextIO) -> int:
    from .store import open_store

    config = _config(args)
    with contextlib.closing(open_store(config.storage)) as store:
        if args.dlq_command == "list":
            letters = store.dead_letters()
            for letter in letters:
                print(f"{letter.message_id}  {letter.client}  {letter.type}  {letter.failed} failed  "
                      f"{letter.last_error or ''}", file=stdout)
            print(f"{len(letters)} dead letters", file=stdout)
        else:
            count = store.replay_dead_letters(None if args.all else args.message_id, int(time.time() * 1000))
            if count == 0 and not args.all:
                raise CommandError(f"no dead letter {args.message_id!r}")
            print(f"{count} recipients queued again", file=stdout)
    return EXIT_OK


def _subscribers(args: argparse.Namespace, stdout: TextIO) -> int:
    from .callbacks.subscribers import subscribers_from
    from .store import open_store, shown_url

    config = _config(args)
    configured = {sub.name for sub in subscribers_from(config.subscribers)}
    with contextlib.closing(open_store(config.storage)) as store:
        for name in store.subscriber_names():
            cursor = store.subscriber_cursor(name)
            waiting = len(store.events_after(cursor.last_seq, EVENTS_COUNTED + 1))
            shown = f"{EVENTS_COUNTED}+" if waiting > EVENTS_COUNTED else str(waiting)
            if name in configured:
                print(f"{shown_url(name)}  configured  after event {cursor.last_seq}, {shown} waiting", file=stdout)
            elif args.forget_unconfigured:
                store.forget_subscriber(name)
                print(f"{shown_url(name)}  forgotten  ({shown} events it had not received)", file=stdout)
            else:
                print(f"{shown_url(name)}  NOT CONFIGURED  its {shown} events are kept until"
                      " `subscribers --forget-unconfigured`", file=stdout)
    return EXIT_OK


def _vacuum(args: argparse.Namespace, stdout: TextIO) -> int:
    from .store.sqlite import SqliteStore

    config = _config(args)
    if config.storage.sqlite_path is None:
        raise CommandError("vacuum is for SQLite storage (Redis gives memory back by itself)")
    with contextlib.closing(SqliteStore(config.storage.sqlite_path)) as store:
        for file in store.files():
            before = os.path.getsize(file.path)
            file.vacuum()
            print(f"{file.path}: {before // 1024} KB -> {os.path.getsize(file.path) // 1024} KB,"
                  " incremental auto-vacuum", file=stdout)
    return EXIT_OK


def _doctor(args: argparse.Namespace, stdout: TextIO) -> int:
    from .doctor import run_doctor

    ok = run_doctor(_config(args), stdout, args.public_url, args.from_file)
    return EXIT_OK if ok else EXIT_FAILED


def _webhooks(args: argparse.Namespace, stdout: TextIO) -> int:
    from .webhooks import WebhooksFileError, edit_webhooks, read_webhooks

    config = _config(args)
    try:
        edited = edit_webhooks(read_webhooks(args.from_file), config, args.public_url, name=args.from_file)
    except WebhooksFileError as exc:
        raise CommandError(str(exc)) from None
    stdout.write(edited.text)
    summary = ", ".join(edited.changed) if edited.changed else "nothing: it already points at this sidecar"
    print(f"openim-bizplugin: changed {summary}", file=args.stderr)
    for note in edited.notes:
        print(f"openim-bizplugin: note: {note}", file=args.stderr)
    return EXIT_OK


def _demo(args: argparse.Namespace, stdout: TextIO) -> int:
    from .demo import run_demo
    from .scaffold import EXAMPLE_SCHEMAS

    if args.schemas:
        schemas = Path(args.schemas)
    elif args.config or os.environ.get(CONFIG_ENV):
        schemas = _config(args).schemas_dir
    else:
        schemas = EXAMPLE_SCHEMAS
    if not schemas.is_dir():
        raise CommandError(f"no catalogue at {schemas}: pass --schemas DIR or -c CONFIG")
    logs.setup(logging.WARNING)  # the demo tells its own story on stdout; only trouble goes to stderr
    return run_demo(schemas.resolve(), stdout)


def _init(args: argparse.Namespace, stdout: TextIO) -> int:
    from .scaffold import InitError, init_folder, next_steps

    try:
        config, schemas = init_folder(Path(args.dir))
    except InitError as exc:
        raise CommandError(f"init: {exc}") from None
    print(next_steps(config, schemas), file=stdout)
    return EXIT_OK


def _keygen(args: argparse.Namespace, stdout: TextIO) -> int:
    if not 16 <= args.bytes <= 1024:
        raise CommandError("--bytes must be between 16 and 1024")
    print(secrets.token_urlsafe(args.bytes), file=stdout)
    return EXIT_OK


def _schemas(args: argparse.Namespace, stdout: TextIO) -> int:
    from .catalog.check import run_check

    directory = Path(args.dir) if args.dir else _config(args).schemas_dir
    if args.schemas_command == "docs":
        return _schemas_docs(directory, args, stdout)
    return run_check(directory, stdout)


def _schemas_docs(directory: Path, args: argparse.Namespace, stdout: TextIO) -> int:
    from .catalog.docs import DocsError, write_docs

    try:
        summary = write_docs(directory, args.out, args.format, stdout)
    except ConfigError as exc:  # an invalid catalogue: not a config problem here
        raise CommandError(f"{exc} (`schemas check --dir {directory}` lists every problem)") from None
    except DocsError as exc:
        raise CommandError(str(exc)) from None
    if args.out != "-":  # standard output holds the catalogue itself
        print(summary, file=stdout)
    return EXIT_OK


def _client_secret(config: Config, client_id: str) -> str:
    client = config.clients.get(client_id)
    if client is None:
        raise CommandError(f"no client {client_id!r} in [clients] of {config.path}")
    return client.secrets[-1]  # the newest secret signs


def _sign(args: argparse.Namespace, stdout: TextIO) -> int:
    config = _config(args)
    body = _read_body_arg(args.body_file)
    headers = signature_headers(args.client, _client_secret(config, args.client), args.method.upper(),
                                args.path, body, idempotency_key=args.idempotency_key)
    for name, value in headers.items():
        print(f"{name}: {value}", file=stdout)
    return EXIT_OK


def _read_body_arg(name: str | None) -> bytes:
    if name is None:
        return b""
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CommandError(f"--body-file {name}: {exc.strerror}") from None


def _client(args: argparse.Namespace) -> BizClient:
    config = _config(args)
    url = args.url or f"http://{config.server.host}:{config.server.port}"
    return BizClient(url, args.client, _client_secret(config, args.client))


def _send(args: argparse.Namespace, stdout: TextIO) -> int:
    if bool(args.user) == bool(args.group):
        raise CommandError("give recipients with --user or with --group (one kind, repeatable)")
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise CommandError(f"--data is not valid JSON: {exc}") from None
    answer = _client(args).send(args.type, args.version, data, users=args.user or None,
                                groups=args.group or None, priority=args.priority,
                                idempotency_key=args.idempotency_key)
    _print_json(answer, stdout)
    return EXIT_OK


def _status(args: argparse.Namespace, stdout: TextIO) -> int:
    _print_json(_client(args).status(args.message_id), stdout)
    return EXIT_OK


def _print_json(value: Any, stdout: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=stdout)


_HANDLERS = {"serve": _serve, "worker": _worker, "dlq": _dlq, "subscribers": _subscribers, "vacuum": _vacuum,
             "doctor": _doctor,
             "webhooks": _webhooks, "demo": _demo, "init": _init, "keygen": _keygen, "schemas": _schemas,
             "sign": _sign,
             "send": _send, "status": _status}
