"""The ``chanstore`` command.

::

    chanstore serve                      run the daemon (flags or CHANSTORE_* variables)
    chanstore check-config FILE          check a db_config file; non-zero with the reasons
    chanstore reload                     ask the running daemon to reload; exit says the verdict
    chanstore get CHANNEL CONTAINER KEY  print a value
    chanstore set CHANNEL CONTAINER KEY JSON
    chanstore delete CHANNEL CONTAINER KEY
    chanstore keys CHANNEL CONTAINER     every key, a line each, as its page arrives
    chanstore watch CHANNEL              every change as it happens, a JSON line each
    chanstore stats                      request rate, errors, p99s, cache, reloads
    chanstore export                     every stored key as JSON lines (backends, no daemon)
    chanstore import [FILE]              store JSON lines that export wrote; idempotent
    chanstore migrate --from OLD --to NEW
                                         copy every channel's data to other backends

``get`` prints and ``set`` takes a value in its stored form, the JSON document
the daemon holds: a set is ``{"_moobius_type": "builtins.set", "_moobius_val": [...]}``
both ways, so what ``get`` prints can be given to ``set`` as it is.

``watch`` prints one line per event of the change feed, flushed as it comes::

    {"event": "ready", "id": "...", "container": null, "key": null, "etag": null, "value": null}
    {"event": "set", "id": "...", "container": "stats", "key": "HP", "etag": "...", "value": 5}
    {"event": "delete", "id": "...", "container": "stats", "key": "HP", "etag": null, "value": null}

(``value`` in its stored form too). It resumes by itself when the connection
drops, saying so on stderr, and runs until interrupted (Ctrl-C, or its reader
going away: exit status 0). ``--since ID`` starts after the event of that id; when
the daemon no longer holds the events after it, the exit status is 5: read the
state again, then watch without ``--since``.

``export``, ``import`` and ``migrate`` work on the backends themselves, as the
db_config files name them (see :mod:`chanstore.transfer`). They report per
container on the way out; the exit status is 1 when a value could not be read
or a check failed, and 130 when interrupted: the same command run again then
finishes the job, copying nothing twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import chanstore
from chanstore.errors import ConfigError

__all__ = ["main"]

#: Exit statuses, as sysexits(3) would have them where one fits.
OK, FAILED, USAGE, UNREACHABLE, NOT_FOUND = 0, 1, 2, 3, 4
#: ``watch --since``: the daemon no longer holds the events after that cursor.
CURSOR_EXPIRED = 5


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chanstore`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"chanstore: {problem}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    from chanstore.server.settings import add_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="chanstore", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=chanstore.__version__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    add_arguments(serve)
    serve.set_defaults(command=_serve)

    check = commands.add_parser("check-config", help="check a db_config file")
    check.add_argument("path", help="the db_config JSON file")
    check.set_defaults(command=_check_config)

    client_flags = ("listen", "token-file")
    reload = commands.add_parser("reload", help="reload the running daemon's db_config")
    add_arguments(reload, client_flags)
    reload.set_defaults(command=_reload)

    stats = commands.add_parser("stats", help="summarize a running daemon's metrics")
    stats.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds between the two scrapes that give rates (default 2)",
    )
    add_arguments(stats, client_flags)
    stats.set_defaults(command=_stats)

    for name, params, help_text in (
        ("get", ("channel", "container", "key"), "print the JSON value of a key"),
        ("set", ("channel", "container", "key", "value"), "store a JSON value"),
        ("delete", ("channel", "container", "key"), "delete a key"),
        ("keys", ("channel", "container"), "list a container's keys"),
    ):
        sub = commands.add_parser(name, help=help_text)
        for param in params:
            sub.add_argument(param, help="JSON text" if param == "value" else None)
        if name == "keys":
            sub.add_argument("--limit", type=_positive, metavar="N",
                             help="stop after N keys (default: every key)")  # fmt: skip
            sub.add_argument("--page-size", type=_positive, metavar="N",
                             help="keys per request (default 1000, at most 10000)")  # fmt: skip
        add_arguments(sub, client_flags)
        sub.set_defaults(command=_data_command, action=name)

    watch = commands.add_parser("watch", help="print a channel's changes as JSON lines")
    watch.add_argument("channel")
    watch.add_argument(
        "--containers", metavar="A,B", help="only the changes of these containers (default: all)"
    )
    watch.add_argument("--since", metavar="CURSOR",
                       help="start after the event of this id, not now")  # fmt: skip
    add_arguments(watch, client_flags)
    watch.set_defaults(command=_watch)
    _add_transfer_commands(commands)
    return parser


def _add_transfer_commands(commands: Any) -> None:
    from chanstore.server.settings import add_arguments  # noqa: PLC0415

    export = commands.add_parser("export", help="write every stored key as JSON lines")
    add_arguments(export, ("db-config", "service-id"))
    _add_selection(export)
    export.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE (complete or not at all), not standard output",
    )
    export.set_defaults(command=_export)

    load = commands.add_parser("import", help="store JSON lines that export wrote")
    add_arguments(load, ("db-config", "service-id"))
    load.add_argument("file", nargs="?", help="the lines (default: standard input)")
    load.add_argument(
        "--dry-run",
        action="store_true",
        help="check the lines and count what would be stored; store nothing",
    )
    load.set_defaults(command=_import)

    migrate = commands.add_parser("migrate", help="copy every channel's data between backends")
    migrate.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="OLD",
        help="db_config whose backends hold the data",
    )
    migrate.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="NEW",
        help="db_config whose backends receive it",
    )
    add_arguments(migrate, ("service-id",))
    _add_selection(migrate)
    migrate.add_argument(
        "--dry-run",
        action="store_true",
        help="read both sides and report what would be copied; write nothing",
    )
    migrate.add_argument(
        "--verify",
        action="store_true",
        help="after copying, compare every value (counts are always compared)",
    )
    migrate.add_argument(
        "--delete-extra",
        action="store_true",
        help="delete target keys the source does not hold (never deletes from the source)",
    )
    migrate.add_argument("--batch-size", type=_positive, default=1000, metavar="N",
                         help="keys read and written per backend call (default 1000)")  # fmt: skip
    migrate.set_defaults(command=_migrate)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--channel",
        action="append",
        metavar="C",
        help="only this channel (repeat for more; default: every channel)",
    )
    parser.add_argument(
        "--container",
        action="append",
        metavar="N",
        help="only this container (repeat for more; default: all)",
    )


def _positive(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not 1 or more")
    return number


def _serve(args: argparse.Namespace) -> int:
    from chanstore.server.memory import exec_with_malloc  # noqa: PLC0415

    # First, before a thread or a socket exists: so that the memory of channels
    # that left goes back to the system (see chanstore.server.memory).
    exec_with_malloc()
    from chanstore.server.daemon import serve  # noqa: PLC0415
    from chanstore.server.settings import settings_from_arguments  # noqa: PLC0415

    return serve(settings_from_arguments(args))


def _check_config(args: argparse.Namespace) -> int:
    from chanstore.config import load_db_config  # noqa: PLC0415 - the other commands need none of it

    try:
        config = load_db_config(Path(args.path))
    except ConfigError as exc:
        print(f"{args.path}: invalid", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return FAILED
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    names = ", ".join(f"{spec.name} ({spec.implementation})" for spec in config)
    count = f"{len(config)} container" + ("" if len(config) == 1 else "s")
    print(f"{args.path}: ok, {count}: {names or 'none'}")
    return OK


def _client(args: argparse.Namespace) -> Any:
    from chanstore.client import Client  # noqa: PLC0415
    from chanstore.server.settings import settings_from_arguments  # noqa: PLC0415

    settings = settings_from_arguments(args)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    host = f"[{host}]" if ":" in host else host
    return Client(f"http://{host}:{settings.port}", token=settings.read_token())


def _reload(args: argparse.Namespace) -> int:
    from chanstore.client import ClientError  # noqa: PLC0415

    with _client(args) as client:
        try:
            verdict = client.reload()
        except ClientError as exc:
            print(f"chanstore reload: {exc}", file=sys.stderr)
            return UNREACHABLE if exc.status is None else FAILED
    if verdict.get("ok"):
        changes = verdict.get("changes", {})
        summary = "; ".join(f"{k}: {', '.join(v)}" for k, v in changes.items() if v)
        print(f"reloaded ({summary or 'no changes'})")
        return OK
    print("reload rejected; the daemon keeps its running config:", file=sys.stderr)
    for problem in verdict.get("problems", []):
        print(f"  {problem}", file=sys.stderr)
    return FAILED


def _stats(args: argparse.Namespace) -> int:
    from chanstore import stats  # noqa: PLC0415
    from chanstore.client import ClientError  # noqa: PLC0415

    with _client(args) as client:
        try:
            before, after = stats.scrape_samples(client.metrics_text, max(args.interval, 0.1))
            problems = client.readiness()
        except ClientError as exc:
            print(f"chanstore stats: {exc}", file=sys.stderr)
            return UNREACHABLE if exc.status is None else FAILED
    print(stats.render(before, after, problems))
    return OK


def _data_command(args: argparse.Namespace) -> int:
    from chanstore.client import ClientError  # noqa: PLC0415

    with _client(args) as client:
        try:
            if args.action == "get":
                document = client.get_document(args.channel, args.container, args.key)
                print(json.dumps(document, indent=2))
            elif args.action == "set":
                try:
                    document = json.loads(args.value, parse_constant=_not_json)
                except ValueError as exc:
                    print(f"chanstore set: VALUE is not JSON: {exc}", file=sys.stderr)
                    return USAGE
                client.set_document(args.channel, args.container, args.key, document)
            elif args.action == "delete":
                client.delete(args.channel, args.container, args.key)
            else:
                return _print_keys(client, args)
        except KeyError:
            print(f"chanstore {args.action}: no key {args.key!r}", file=sys.stderr)
            return NOT_FOUND
        except ClientError as exc:
            print(f"chanstore {args.action}: {exc}", file=sys.stderr)
            return UNREACHABLE if exc.status is None else FAILED
    return OK


def _watch(args: argparse.Namespace) -> int:
    """Print the channel's change feed, a JSON line per event, until interrupted."""
    from chanstore.client import ClientError, CursorExpired  # noqa: PLC0415

    containers = None
    if args.containers is not None:
        containers = [name for name in args.containers.split(",") if name]
        if not containers:
            print("chanstore watch: --containers names no container", file=sys.stderr)
            return USAGE
    # The client says on its logger when it resumes a stream: show it, on stderr.
    notes = logging.StreamHandler(sys.stderr)
    notes.setFormatter(logging.Formatter("chanstore watch: %(message)s"))
    client_log = logging.getLogger("chanstore.client")
    level = client_log.level
    client_log.addHandler(notes)
    client_log.setLevel(logging.INFO)
    try:
        with _client(args) as client, client.watch(args.channel, containers,
                                                   since=args.since) as events:  # fmt: skip
            for event in events:
                line = {"event": event.kind, "id": event.cursor, "container": event.container,
                        "key": event.key, "etag": event.etag, "value": event.document}  # fmt: skip
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()
    except KeyboardInterrupt:
        return OK
    except BrokenPipeError:
        # The reader went away (``chanstore watch ... | head -3``): stop, quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except ValueError as exc:  # a --since that is no cursor
        print(f"chanstore watch: {exc}", file=sys.stderr)
        return USAGE
    except CursorExpired as exc:
        print(f"chanstore watch: the daemon no longer holds the events after cursor "
              f"{exc.cursor!r} ({exc}); read the state again, then watch without --since",
              file=sys.stderr)  # fmt: skip
        return CURSOR_EXPIRED
    except ClientError as exc:
        print(f"chanstore watch: {exc}", file=sys.stderr)
        return UNREACHABLE if exc.status is None else FAILED
    finally:
        client_log.removeHandler(notes)
        client_log.setLevel(level)
    return OK


def _export(args: argparse.Namespace) -> int:
    from chanstore.config import load_db_config  # noqa: PLC0415
    from chanstore.transfer import export  # noqa: PLC0415

    settings = _transfer_settings(args)
    config = load_db_config(settings.db_config)
    finished: list[bool] = []

    def run(out: Any) -> list[Any]:
        tallies = export(config, settings.service_id, out, channels=args.channel,
                         containers=args.container, progress=sys.stderr)  # fmt: skip
        finished.append(True)
        return tallies

    if args.output is None:
        return _transferred("export", lambda: run(sys.stdout), report=sys.stderr)
    # Written beside, then renamed: an interrupted export leaves no file that looks whole.
    output = Path(args.output)
    partial = output.with_name(f".{output.name}.partial")
    try:
        with partial.open("w", encoding="ascii") as out:
            status = _transferred("export", lambda: run(out), report=sys.stderr)
            out.flush()
            os.fsync(out.fileno())
        if finished:  # to the end, damaged values (reported) or not
            partial.replace(output)
        return status
    finally:
        partial.unlink(missing_ok=True)


def _import(args: argparse.Namespace) -> int:
    from chanstore.config import load_db_config  # noqa: PLC0415
    from chanstore.transfer import import_lines  # noqa: PLC0415

    settings = _transfer_settings(args)
    config = load_db_config(settings.db_config)
    try:
        source = open(args.file, "rb") if args.file else sys.stdin.buffer  # noqa: SIM115
    except OSError as exc:
        print(f"chanstore import: {args.file}: {exc.strerror}", file=sys.stderr)
        return USAGE
    with source:
        return _transferred("import", lambda: import_lines(
            config, settings.service_id, source, dry_run=args.dry_run,
            progress=sys.stderr), dry_run=args.dry_run)  # fmt: skip


def _migrate(args: argparse.Namespace) -> int:
    from chanstore.config import load_db_config  # noqa: PLC0415
    from chanstore.transfer import migrate  # noqa: PLC0415

    settings = _transfer_settings(args)
    source, target = load_db_config(Path(args.source)), load_db_config(Path(args.target))
    return _transferred("migrate", lambda: migrate(
        source, target, settings.service_id, channels=args.channel, containers=args.container,
        dry_run=args.dry_run, verify=args.verify, delete_extra=args.delete_extra,
        progress=sys.stderr,
        batch_size=args.batch_size),
        dry_run=args.dry_run, verified=args.verify)  # fmt: skip


def _transfer_settings(args: argparse.Namespace) -> Any:
    from chanstore import logs  # noqa: PLC0415
    from chanstore.server.settings import settings_from_arguments  # noqa: PLC0415

    # What a backend finds on the way (a planted link, a damaged file) is told on stderr.
    logs.configure("console", "warning", stream=sys.stderr)
    return settings_from_arguments(args)


def _transferred(name: str, run: Callable[[], list[Any]], *, report: Any = None,
                 dry_run: bool = False, verified: bool = False) -> int:  # fmt: skip
    """Run a transfer, print its report; the exit status it earns."""
    from chanstore.errors import BackendError  # noqa: PLC0415
    from chanstore.transfer import render  # noqa: PLC0415

    rerun = "nothing stored is lost: run the same command again to finish"
    try:
        tallies = run()
    except KeyboardInterrupt:
        print(f"chanstore {name}: interrupted; {rerun}", file=sys.stderr)
        return 130
    except BackendError as exc:
        print(f"chanstore {name}: {exc}; {rerun}", file=sys.stderr)
        return FAILED
    print(render(tallies, dry_run=dry_run, verified=verified), file=report or sys.stdout)
    return OK if all(tally.ok for tally in tallies) else FAILED


def _not_json(constant: str) -> None:
    # json.loads takes NaN and Infinity, which are not JSON and which no value can hold.
    raise ValueError(f"{constant} is not a JSON value")


def _print_keys(client: Any, args: argparse.Namespace) -> int:
    """Print the container's keys a line each, each page as soon as it arrives."""
    from chanstore.client import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE  # noqa: PLC0415

    limit: int | None = args.limit
    page_size: int = args.page_size or DEFAULT_PAGE_SIZE
    if page_size > MAX_PAGE_SIZE:
        print(f"chanstore keys: --page-size is at most {MAX_PAGE_SIZE}", file=sys.stderr)
        return USAGE
    if limit is not None:
        page_size = min(page_size, limit)
    printed = 0
    try:
        for page in client.key_pages(args.channel, args.container, page_size):
            if limit is not None:
                page = page[: limit - printed]  # noqa: PLW2901 - the page, cut to the limit
            sys.stdout.write("".join(f"{key}\n" for key in page))
            sys.stdout.flush()
            printed += len(page)
            if limit is not None and printed >= limit:
                break
    except BrokenPipeError:
        # The reader went away (``chanstore keys ... | head``): stop, quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILED
    return OK


if __name__ == "__main__":
    sys.exit(main())
