"""The `imagestore` command: arguments, the five subcommands, one-line errors, exit codes."""

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from imagestore_client import __version__
from imagestore_client.cache import Cache, prune
from imagestore_client.config import load_config
from imagestore_client.errors import INTERRUPTED, NETWORK, ClientError, UsageError
from imagestore_client.progress import human
from imagestore_client.pull import pull
from imagestore_client.push import PIECE_SIZE, push
from imagestore_client.server import Server, find_image, in_namespace

SIZE = re.compile(r"([0-9]+)([KMG]?)(?:i?B)?", re.IGNORECASE)
AGE = re.compile(r"([0-9]{1,9})([smhd]?)")
DEFAULT_AGE = "30d"
SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
EXIT_CODES = """exit codes: 0 done; 1 the server refused (its message is printed); 2 usage or
configuration; 3 network or local I/O (run again to resume a push or pull); 4 no such image;
5 a download that does not match its sha256 (nothing cached); 130 interrupted"""


def size(text):
    """A piece size: bytes, or with K, M or G (binary)."""
    match = SIZE.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def age(text):
    """An age: seconds, or with s, m, h or d."""
    match = AGE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (e.g. 30d, 12h)")
    return int(match.group(1)) * SECONDS[match.group(2)]


def age_text(seconds):
    """An age in its largest whole unit: 2592000 -> '30d'."""
    unit = next(u for u in "dhms" if seconds % SECONDS[u] == 0)
    return f"{seconds // SECONDS[unit]}{unit}"


def cache_of(config, args):
    """The cache folder: --cache, else the configured one."""
    return Cache(Path(args.cache).expanduser() if args.cache else config.cache)


def run_push(server, config, args):
    print(push(server, config, args.file, args.name, args.namespace, args.piece_size, args.quiet))


def run_pull(server, config, args):
    print(pull(server, args.image, args.namespace, cache_of(config, args), config.retries,
               args.quiet))


def run_prune(server, config, args):
    pruned = prune(cache_of(config, args), args.older_than, args.dry_run)
    for path in pruned.removed:
        print(path)
    if not args.quiet:
        verb = "would remove" if args.dry_run else "removed"
        busy = f"; {len(pruned.busy)} left, a pull holds them" if pruned.busy else ""
        files = f"{len(pruned.removed)} file{'' if len(pruned.removed) == 1 else 's'}"
        print(f"imagestore: {verb} {files} ({human(pruned.size)}) not used for "
              f"{age_text(args.older_than)}{busy}", file=sys.stderr)


def namespace_label(image):
    """path@owner of an image's namespace, '-' for none."""
    namespace = image.get("namespace")
    return f"{namespace['path']}@{namespace['user']['username']}" if namespace else "-"


def run_ls(server, config, args):
    params = {"search": args.search} if args.search else {}
    if args.namespace is not None:
        params["namespace"] = args.namespace
    # Checked here too, as find_image does, for a server without the exact filters.
    images = [image for image in server.pages("/images", params)
              if args.namespace is None or in_namespace(image, args.namespace)]
    if args.json:
        print(json.dumps(images, indent=2))
        return
    rows = [("ID", "NAMESPACE", "NAME", "SIZE", "CREATED")] + [
        (str(i["id"]), namespace_label(i), i["name"],
         human(i["size"]) if i.get("size") is not None else "-", i["created_at"])
        for i in images]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def run_rm(server, config, args):
    image = find_image(server, args.image, args.namespace)
    server.send("DELETE", f"/images/{image['id']}", expect=(204,))
    print(f"deleted {image['id']} {image['name']}")


def run_link(server, config, args):
    image = find_image(server, args.image, args.namespace)
    params = {} if args.expires_in is None else {"expires_in": str(args.expires_in)}
    answer = server.json("POST", f"/images/{image['id']}/links", expect=(201,), params=params)
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    print(answer["url"])
    print(shlex.join(["qemu-system-x86_64", *answer["qemu_args"]]))
    print(shlex.join(["qemu-img", *answer["qemu_img_args"], "-O", "qcow2",
                      f"{image['name']}.qcow2"]))
    print(f"imagestore: the link expires at {answer['expires_at']}", file=sys.stderr)


def add_image_argument(parser):
    parser.add_argument("image", metavar="NAME|ID", help="an image's name, or its id")
    add_namespace(parser)


def add_namespace(parser):
    parser.add_argument("--namespace", "-n", metavar="PATH[@OWNER]",
                        help="the image's namespace (default: outside namespaces)")


def add_cache_commands(command):
    """pull and prune, the cache's commands; command(name, run, text, server) makes one."""
    pull_command = command("pull", run_pull, "download an image into the cache; print its path")
    add_image_argument(pull_command)
    prune_command = command("prune", run_prune, "remove cached images not pulled or read for "
                            "AGE; print their paths", server=False)
    prune_command.add_argument("--older-than", type=age, default=age(DEFAULT_AGE),
                               metavar="AGE", help="unused for this long: seconds, or with s, "
                               f"m, h, d (default {DEFAULT_AGE})")
    prune_command.add_argument("--dry-run", action="store_true",
                               help="only print what would go")
    for sub in (pull_command, prune_command):
        sub.add_argument("--cache", metavar="DIR",
                         help="the cache folder (default ~/.cache/imagestore)")


def build_parser():
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="imagestore", epilog=EXIT_CODES,
        description="Push, pull (into a cache that prune trims), list, link and delete images "
                    "of an imagestore server (IMAGESTORE_URL, IMAGESTORE_TOKEN, or "
                    "~/.config/imagestore/config.toml).")
    parser.add_argument("--version", action="version", version=f"imagestore {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar or summary on standard error")
    network = argparse.ArgumentParser(add_help=False)
    network.add_argument("--retries", type=int, metavar="N",
                         help="tries after a broken connection, in a row (default 8)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, text, server=True):
        parents = [common, network] if server else [common]
        sub = commands.add_parser(name, parents=parents, help=text, description=text,
                                  epilog=EXIT_CODES)
        sub.set_defaults(run=run, server=server)
        return sub

    sub = command("push", run_push, "upload FILE as image NAME (resumable); print its URL")
    sub.add_argument("file", metavar="FILE")
    sub.add_argument("name", metavar="NAME")
    add_namespace(sub)
    sub.add_argument("--piece-size", type=size, default=PIECE_SIZE, metavar="SIZE",
                     help="bytes sent in one request (default 64M)")
    add_cache_commands(command)
    sub = command("ls", run_ls, "list images, newest first (SEARCH: part of the name)")
    sub.add_argument("search", nargs="?", metavar="SEARCH")
    sub.add_argument("--namespace", "-n", metavar="PATH[@OWNER]",
                     help="only this namespace ('' for images outside namespaces)")
    sub.add_argument("--json", action="store_true", help="the image objects, as JSON")
    add_image_argument(command("rm", run_rm, "delete an image"))
    sub = command("link", run_link, "make a signed link; print its URL and QEMU lines")
    add_image_argument(sub)
    sub.add_argument("--expires-in", type=int, metavar="SECONDS",
                     help="how long the link works (default 3600, at most 604800)")
    sub.add_argument("--json", action="store_true", help="the server's answer, as JSON")
    return parser


def main(argv=None):
    """Run the command; the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(server=args.server)
        if getattr(args, "retries", None) is not None:
            if args.retries < 0:
                raise UsageError("--retries must be 0 or more")
            config.retries = args.retries
        args.run(Server(config) if args.server else None, config, args)
    except ClientError as error:
        print(f"imagestore: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"imagestore: {error}", file=sys.stderr)
        return NETWORK
    except KeyboardInterrupt:
        print("imagestore: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0
