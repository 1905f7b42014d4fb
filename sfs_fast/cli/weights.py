"""sfs-weights: the named weights (list, download, path, verify)."""
from __future__ import annotations

import argparse
import json
import sys

from sfs_fast.cli.common import EXIT_ERROR, CommandError, add_debug_flag, run_command

PROG = "sfs-weights"

DESCRIPTION = """\
Named weights: the official SfSNet (fetched once into the cache, checked by its git blob
id, converted exactly to safetensors) and the bundled demo checkpoints. Every command's
--weights takes these names as well as files.

  sfs-weights list                 names, methods, source, size, whether on this machine
  sfs-weights download sfsnet      fetch, verify, convert and cache the official SfSNet
  sfs-weights path sfsnet          print the local file (no network)
  sfs-weights verify [NAME]        check cached and bundled files; a damaged cache entry is
                                   removed and fetched again (unless --no-fetch)

Cache: $SFS_FAST_HOME, else $XDG_CACHE_HOME/sfs_fast, else ~/.cache/sfs_fast.
SFS_FAST_OFFLINE=1 forbids the network; SFS_FAST_WEIGHTS_MIRROR=URL fetches every file
from URL/<file name> instead of the public hosts.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,download,path,verify}")
    lst = sub.add_parser("list", help="the registered names")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    dl = sub.add_parser("download", help="fetch, verify, convert and cache NAME")
    dl.add_argument("name")
    dl.add_argument("--force", action="store_true", help="fetch again even when cached")
    pa = sub.add_parser("path", help="print the local file of NAME (no network)")
    pa.add_argument("name")
    ve = sub.add_parser("verify", help="check NAME (default: every name on this machine)")
    ve.add_argument("name", nargs="?")
    ve.add_argument("--no-fetch", action="store_true", help="report a damaged entry, do not refetch it")
    for s in (lst, dl, pa, ve):
        add_debug_flag(s)
    return p


def _size(path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB" if path is not None else "-"


def _rows():
    from sfs_fast import weights

    for name, e in weights.REGISTRY.items():
        path = weights.local_path(name)
        source = "bundled" if e.bundled else e.urls[0].split("/")[2]
        state = ("bundled" if path else "missing") if e.bundled else ("cached" if path else "not cached")
        yield {"name": name, "method": e.method, "source": source, "size": _size(path), "state": state,
               "demo": e.demo, "description": e.description, "path": str(path) if path else None}


def list_names(args) -> int:
    rows = list(_rows())
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'name':<8} {'method':>6}  {'source':<12} {'size':>8}  {'here':<10} description")
    for r in rows:
        print(f"{r['name']:<8} {r['method']:>6}  {r['source']:<12} {r['size']:>8}  {r['state']:<10} {r['description']}")
    return 0


def download(args) -> int:
    from sfs_fast import weights

    path = weights.fetch(args.name, force=args.force)
    print(path)
    return 0


def path(args) -> int:
    from sfs_fast import weights

    found = weights.local_path(args.name)
    if found is None:
        raise CommandError(f"{args.name}: not on this machine; run sfs-weights download {args.name}")
    print(found)
    return 0


def verify(args) -> int:
    from sfs_fast import download as dl
    from sfs_fast import weights

    names = [args.name] if args.name else list(weights.REGISTRY)
    failed = 0
    for name in names:
        status, detail = weights.verify(name)
        if status == "damaged" and not args.no_fetch and not dl.offline() and not weights.entry(name).bundled:
            print(f"{name}: damaged ({detail}); fetching again", file=sys.stderr)
            weights.remove_cached(name)
            weights.fetch(name)
            status, detail = weights.verify(name)
        print(f"{name}: {status} ({detail})")
        # Asked about one name, "not cached" is a failure; across all names it is just a state.
        failed += status in ("damaged", "missing") or (args.name is not None and status != "ok")
    return EXIT_ERROR if failed else 0


ACTIONS = {"list": list_names, "download": download, "path": path, "verify": verify}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, ACTIONS[args.action], args)


if __name__ == "__main__":
    sys.exit(main())
