#!/usr/bin/env python3
"""The client's bar of issue 14 at full size, run once by hand (the test suite runs the same
at tens of MiB: tests/test_client_push.py, tests/test_client_pull.py).

    .venv/bin/python bench/client.py [--size 2G] [--cut-every 300M] [--piece 64M]

On loopback: imagestore (gunicorn from the Procfile), the LoopbackProxy of the tests in front
of it, and the `imagestore` command of this checkout (client/) as a user runs it:

1. push FILE (a qcow2 of --size, its clusters allocated) with no cut, then again through the
   proxy cutting the connection every --cut-every bytes of pieces: bytes sent, cuts, pieces
   sent twice, and the stored sha256 against the file's;
2. pull it into an empty cache with no cut, then again cut at 60%: what the proxy passed on
   after the cut against the missing 40%; then a second pull: file bytes moved (0, a 304).

Prints a table with PASS/MISS for each goal and writes bench/out/client.json.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from loopback_proxy import LoopbackProxy, cut_every, cut_once_after  # noqa: E402

from harness import start_server, stop_server  # noqa: E402 - found through the line above

MiB = 1 << 20
PULL_PIECE = MiB  # what the client reads at a time (client/imagestore_client/pull.py)


def size_arg(text):
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_image(folder, size):
    """A qcow2 whose file is about size bytes (clusters allocated by fallocate: quick)."""
    path = folder / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
                    str(path), str(size)], check=True)
    return path


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(4 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


class User:
    """The imagestore command in a home folder of its own, talking to url."""

    def __init__(self, home, url, token):
        self.env = {**os.environ, "HOME": str(home), "IMAGESTORE_URL": url,
                    "IMAGESTORE_TOKEN": token,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "client"),
                                                                os.environ.get("PYTHONPATH")]))}

    def run(self, *args):
        """(seconds, CompletedProcess) of `imagestore ARGS`; fails loudly on an error."""
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "imagestore_client", *map(str, args)],
                              env=self.env, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"imagestore {' '.join(map(str, args))}: {done.stderr}")
        return seconds, done


def patch_bytes(proxy, since=0):
    return sum(e.sent for e in proxy.exchanges[since:] if e.method == "PATCH")


def file_bytes(proxy, since=0):
    return [e for e in proxy.exchanges[since:] if e.is_file]


def bench_push(server, proxy, token, folder, image, args):
    """Push without cuts, then through cuts; the figures."""
    size, results = image.stat().st_size, {}
    plain, _ = User(folder / "home-push", server.url, token).run(
        "push", image, "plain", "--piece-size", args.piece, "-q")
    results["push_plain_mib_s"] = size / MiB / plain
    proxy.on_request_body = cut_every(args.cut_every)
    seconds, done = User(folder / "home-push", proxy.url, token).run(
        "push", image, "cut", "--piece-size", args.piece)
    proxy.on_request_body = None
    url = done.stdout.strip()
    stored = json.loads(subprocess.run(
        ["curl", "-sf", "-H", f"Authorization: Bearer {token}",
         server.url + url[url.index("/images/"):]], capture_output=True, check=True).stdout)
    cuts = sum(e.cut for e in proxy.exchanges)
    extra = patch_bytes(proxy) - size
    results.update(push_cut_mib_s=size / MiB / seconds, cuts=cuts, extra_bytes=extra,
                   pieces_sent_twice=extra / size_arg(args.piece),
                   sha256_matches=stored["sha256"] == sha256_of(image), stderr=done.stderr)
    return results


def bench_pull(server, proxy, token, folder, size):
    """Pull without cuts, then cut at 60%, then again; the figures."""
    plain, _ = User(folder / "home-plain", server.url, token).run("pull", "cut", "-q")
    user = User(folder / "home-pull", proxy.url, token)
    start = len(proxy.exchanges)
    proxy.on_response_body = cut_once_after(size * 6 // 10)
    seconds, _ = user.run("pull", "cut")
    cut, *rest = file_bytes(proxy, start)
    again = len(proxy.exchanges)
    user.run("pull", "cut", "-q")
    second = file_bytes(proxy, again)
    return {"pull_plain_mib_s": size / MiB / plain, "pull_cut_mib_s": size / MiB / seconds,
            "pull_before_cut": cut.received, "pull_after_cut": sum(e.received for e in rest),
            "pull_missing": size - size * 6 // 10,
            "second_pull_file_bytes": sum(e.received for e in second)}


def table(results, size, args):
    """The figures, each goal with PASS or MISS."""
    piece = size_arg(args.piece)
    after_goal = results["pull_missing"] + PULL_PIECE
    rows = [
        ("push, no cut", f"{results['push_plain_mib_s']:.0f} MiB/s", "", None),
        (f"push, cut every {args.cut_every >> 20} MiB", f"{results['push_cut_mib_s']:.0f} MiB/s",
         f"{results['cuts']} cuts", None),
        ("  bytes sent again", f"{results['extra_bytes'] / MiB:.1f} MiB "
         f"({results['pieces_sent_twice']:.2f} pieces)", f"<= {results['cuts']} pieces",
         results["extra_bytes"] <= results["cuts"] * piece),
        ("  stored sha256 is the file's", str(results["sha256_matches"]), "True",
         results["sha256_matches"]),
        ("pull, no cut", f"{results['pull_plain_mib_s']:.0f} MiB/s", "", None),
        ("pull, cut at 60%", f"{results['pull_cut_mib_s']:.0f} MiB/s", "", None),
        ("  bytes after the cut", f"{results['pull_after_cut'] / MiB:.1f} MiB",
         f"<= {after_goal / MiB:.1f} MiB", results["pull_after_cut"] <= after_goal),
        ("second pull: file bytes", str(results["second_pull_file_bytes"]), "0",
         results["second_pull_file_bytes"] == 0),
    ]
    lines = [f"{'what':40} {'measured':26} {'goal':18} verdict"]
    for what, measured, goal, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"{what:40} {measured:26} {goal:18} {verdict}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=size_arg, default=2 << 30)
    parser.add_argument("--cut-every", type=size_arg, default=300 * MiB)
    parser.add_argument("--piece", default="64M")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-client-") as temporary:
        folder = Path(temporary)
        server = start_server(folder / "instance", log_path=OUT / "client-gunicorn.log",
                              access_log=False)
        proxy = LoopbackProxy(server.port)
        try:
            token = server.token("bench")
            image = make_image(folder, args.size)
            results = bench_push(server, proxy, token, folder, image, args)
            results.update(bench_pull(server, proxy, token, folder, image.stat().st_size),
                           size=image.stat().st_size)
        finally:
            proxy.close()
            stop_server(server)
    results.update(load=os.getloadavg(), command=" ".join(sys.argv))
    (OUT / "client.json").write_text(json.dumps(results, indent=2))
    print(f"$ {' '.join(sys.argv)}   (load average {os.getloadavg()[0]:.1f})")
    print(table(results, args.size, args))


if __name__ == "__main__":
    main()
